"""A quick stdio front for the one-process bundle: answers the listings from a cache at once.

Importing FastMCP and the MCP SDK takes the bundle (``servers.bundle``) over a second before it can
answer anything, and Claude Code waits for every MCP server before its first model request. This
front imports only the standard library. It answers what a client asks while connecting
(``server/discover``, ``initialize``, ``tools/list``, ``prompts/list``, ``resources/list``,
``resources/templates/list``) from answers the bundle gave earlier, and starts the real bundle as
its child once the client has its tool list (or at the first request the cache cannot answer);
everything else (tool calls, cancellations, progress, the bundle's own notifications and
requests) passes through unchanged, line by line, in both directions.

    python -m servers.stdio_front [--only NAME ...] [--directory DIR]   # the bundle's arguments

The cache (``DATA_DIR/stdio_front/<key>.json``, owner-only, written atomically) is keyed by
everything that can change an answer: the content of every source file under ``servers/``, Valor's
version (``serverInfo.version``: the installed metadata and ``pyproject.toml``), the installed
fastmcp and mcp, the python, the bundle's arguments and the principal (``VALOR_CHAT_ID``
from the environment or ``.env``); each answer within it by the request's method, protocol version
and parameters. A file that is not valid, not owner-only, or written for another key is ignored.
On a miss the front passes the request on and stores the bundle's answer. After serving from the
cache it asks the bundle the same questions and rewrites any answer that differs, so a stale entry
lives at most one session. When a client opened with ``initialize`` answered from the cache, the
bundle receives that handshake (``initialize``, then ``notifications/initialized``) before anything
else. If the bundle cannot start or dies, every request waiting for it gets a JSON-RPC error.
Closing stdin (or SIGTERM) ends the bundle and its descendants.

``VALOR_STDIO_FRONT=off`` runs the bundle directly instead (the escape hatch);
``VALOR_STDIO_FRONT_START`` says when the bundle starts: ``eager`` (at once), ``listed`` (the
default) or ``lazy`` (only when a request needs it).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from servers.core.env_file import setting

BUNDLE_MODULE = "servers.bundle"
CACHE_FORMAT = 1
CACHE_FOLDER = "stdio_front"
CACHE_LIMIT_BYTES = 8 * 2**20
CACHEABLE = frozenset(
    {
        "server/discover",
        "initialize",
        "tools/list",
        "prompts/list",
        "resources/list",
        "resources/templates/list",
    }
)
OWN_ID_PREFIX = "valor-front-"  # ids of the front's own requests to the bundle
PROTOCOL_META = "io.modelcontextprotocol/protocolVersion"
UNAVAILABLE = -32000  # JSON-RPC "server error": the tools are not there to answer
ANSWER_GRACE_SECONDS = 10.0  # after stdin closes: for answers the bundle still owes
EXIT_GRACE_SECONDS = 1.0  # then for the bundle to leave on its own
START_POLICIES = ("eager", "listed", "lazy")  # when the bundle starts (VALOR_STDIO_FRONT_START)
# After the client has its tool list (or at the first miss): the bundle's import then overlaps the
# client's first model call instead of competing with the client's own start on a busy machine.
DEFAULT_START = "listed"
SERVERS_DIR = os.path.dirname(os.path.abspath(__file__))
PYPROJECT = os.path.join(os.path.dirname(SERVERS_DIR), "pyproject.toml")


# -- where and what: settings the front needs without pydantic ---------------------------------
# The environment, else Valor's one .env (VALOR_ENV_FILE, else the repository's), as Settings and
# the hooks read it.
def data_dir() -> str:
    configured = setting("VALOR_DATA_DIR")
    if configured:
        return os.path.abspath(os.path.expanduser(configured))
    from servers.core.paths import default_data_dir

    return str(default_data_dir())


def installed_version(distribution: str) -> str:
    """The installed version of ``distribution`` from its ``.dist-info`` folder name
    (importlib.metadata would cost more than the whole front)."""
    pattern = re.compile(rf"^{re.escape(distribution)}-([^-]+)\.dist-info$", re.IGNORECASE)
    for folder in sys.path:
        try:
            names = os.listdir(folder or ".")
        except OSError:
            continue
        for name in names:
            found = pattern.match(name)
            if found:
                return found.group(1)
    return "absent"


def file_digest(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError:
        return "absent"


def source_digest(root: str = SERVERS_DIR) -> str:
    """A digest of every python file under ``root`` (where the tools are defined)."""
    digest = hashlib.sha256()
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as handle:
                digest.update(hashlib.sha256(handle.read()).digest())
    return digest.hexdigest()


def cache_key(bundle_args: Sequence[str]) -> str:
    """What every cached answer depends on, as one hex digest."""
    parts = {
        "format": CACHE_FORMAT,
        "sources": source_digest(),
        "valor": installed_version("valor"),  # serverInfo.version
        "pyproject": file_digest(PYPROJECT),  # the version when Valor runs uninstalled
        "fastmcp": installed_version("fastmcp"),
        "mcp": installed_version("mcp"),
        "python": sys.version,
        "bundle_args": list(bundle_args),
        "chat": setting("VALOR_CHAT_ID"),  # the principal the bundle serves
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def signature(message: dict, session_version: str | None) -> str | None:
    """The cache slot of a listing request: method, protocol version and parameters (without the
    per-request ``_meta`` identity of the client); None for anything not cached."""
    method = message.get("method")
    if method not in CACHEABLE:
        return None
    params = message.get("params")
    params = dict(params) if isinstance(params, dict) else {}
    meta = params.pop("_meta", None)
    if method == "initialize":
        version = params.get("protocolVersion")
        params = {}  # the answer does not depend on who the client is
    elif isinstance(meta, dict) and PROTOCOL_META in meta:
        version = meta[PROTOCOL_META]
    else:
        version = session_version
    if not isinstance(version, str):
        return None
    return json.dumps([method, version, params], sort_keys=True)


# -- the cache ----------------------------------------------------------------------------------
class AnswerCache:
    """Answers of the bundle for one key, in one owner-only file."""

    def __init__(self, folder: str, key: str):
        self.folder = folder
        self.key = key
        self.path = os.path.join(folder, f"{key}.json")
        self.answers: dict[str, Any] = self._load()
        self._lock = threading.Lock()

    def _load(self) -> dict[str, Any]:
        from servers.core.safe_files import UnsafeFile, read_regular

        try:
            status = os.stat(self.path, follow_symlinks=False)
            if status.st_uid != os.getuid() or status.st_mode & 0o077:
                warn(f"ignoring {self.path}: not owner-only")
                return {}
            content = json.loads(read_regular(self.path, CACHE_LIMIT_BYTES))
        except FileNotFoundError:
            return {}
        except (OSError, UnsafeFile, ValueError) as exc:
            warn(f"ignoring the cache file {self.path}: {exc}")
            return {}
        if (
            not isinstance(content, dict)
            or content.get("format") != CACHE_FORMAT
            or content.get("key") != self.key
            or not isinstance(content.get("answers"), dict)
        ):
            warn(f"ignoring the cache file {self.path}: not an answer cache for this key")
            return {}
        return {
            slot: answer
            for slot, answer in content["answers"].items()
            if isinstance(slot, str) and isinstance(answer, dict)
        }

    def get(self, slot: str) -> dict | None:
        return self.answers.get(slot)

    def put(self, slot: str, answer: dict) -> None:
        """Store ``answer`` (a result object) and write the file, unless it is already there."""
        with self._lock:
            if self.answers.get(slot) == answer:
                return
            self.answers[slot] = answer
            try:
                self._write()
            except OSError as exc:
                warn(f"could not write the cache file {self.path}: {exc}")

    def _write(self) -> None:
        from servers.core.safe_files import ensure_private_dir

        ensure_private_dir(self.folder)
        content = {"format": CACHE_FORMAT, "key": self.key, "answers": self.answers}
        fd, temporary = tempfile.mkstemp(prefix=".answers.", suffix=".tmp", dir=self.folder)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(content, handle, separators=(",", ":"))
            os.replace(temporary, self.path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)


def warn(text: str) -> None:
    """One line on stderr, which MCP clients keep as the server's log."""
    sys.stderr.write(f"valor stdio front: {text}\n")
    sys.stderr.flush()


# -- the front ----------------------------------------------------------------------------------
def id_key(message_id: Any) -> str:
    return json.dumps(message_id)  # 1 and "1" are different ids


class Front:
    """Answers listings from ``cache`` and relays everything else to the bundle child."""

    def __init__(
        self,
        command: Sequence[str],
        cache: AnswerCache,
        output: IO[bytes],
        *,
        start: str = "eager",
    ):
        self.command = list(command)
        self.cache = cache
        self.output = output
        self.start_policy = start  # eager: at once; listed: after a cached tools/list; lazy
        self.lock = threading.RLock()
        self.output_lock = threading.Lock()
        self.child: subprocess.Popen | None = None
        self.failure: str | None = None  # why the bundle cannot answer
        self.ready = False  # the bundle may receive the client's messages
        self.flow_known = False  # the first client message said whether a handshake is replayed
        self.handshake: dict | None = None  # the client's initialize, answered from the cache
        self.session_version: str | None = None  # an initialize's protocol version
        self.queued: list[bytes] = []  # until the bundle may receive
        self.outbound: queue.Queue[bytes | None] = queue.Queue()  # to the writer thread
        self.outstanding: set[str] = set()  # client requests the bundle still owes an answer
        self.to_store: dict[str, str] = {}  # client request id -> cache slot of its answer
        self.own: dict[str, Callable[[dict], None]] = {}
        self.own_counter = 0
        self.closing = False
        self.settled = threading.Condition(self.lock)
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self.relay_thread: threading.Thread | None = None
        self.stderr_thread: threading.Thread | None = None

    # the bundle child
    def start(self) -> None:
        if self.start_policy == "eager":
            with self.lock:
                self._ensure_child()

    def _ensure_child(self) -> None:
        if self.child is not None or self.failure is not None:
            return
        try:
            self.child = subprocess.Popen(
                self.command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            self._fail(f"the tool process could not start ({exc})")
            return
        threading.Thread(target=self._write_bundle, daemon=True).start()
        self.relay_thread = threading.Thread(target=self._relay_bundle, daemon=True)
        self.relay_thread.start()
        self.stderr_thread = threading.Thread(target=self._relay_stderr, daemon=True)
        self.stderr_thread.start()
        if self.flow_known:
            self._open_flow()

    def _open_flow(self) -> None:
        """The child exists and the client's flow is known: replay the handshake or open up."""
        if self.handshake is not None:
            self._send_own("initialize", self.handshake, self._handshake_answered, first=True)
        else:
            self._open()

    def _handshake_answered(self, message: dict) -> None:
        if "result" in message:
            slot = signature({"method": "initialize", "params": self.handshake}, None)
            self._verify(slot, message["result"])
        self._write_child(
            json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode() + b"\n"
        )
        self._open()

    def _open(self) -> None:
        self.ready = True
        queued, self.queued = self.queued, []
        for line in queued:
            self._write_child(line)

    def _write_child(self, line: bytes) -> None:
        # Through the writer thread: a full pipe never blocks a thread holding the lock (the
        # bundle may be blocked writing to us, waiting for the relay, waiting for that lock).
        self.outbound.put(line)

    def _write_bundle(self) -> None:
        stdin = self.child.stdin
        while (line := self.outbound.get()) is not None:
            try:
                stdin.write(line)
                stdin.flush()
            except (OSError, ValueError):
                pass  # the child is gone: its stdout's end reports it
        with contextlib.suppress(OSError):
            stdin.close()

    def _to_child(self, line: bytes, *, first: bool = False) -> None:
        """Send now, or queue until the bundle may receive (``first``: before the queue)."""
        if self.failure is not None:
            return
        if first or self.ready:
            self._write_child(line)
        else:
            self.queued.append(line)

    def _send_own(
        self, method: str, params: Any, handler: Callable[[dict], None], first: bool = False
    ) -> None:
        self.own_counter += 1
        request_id = f"{OWN_ID_PREFIX}{self.own_counter}"
        self.own[id_key(request_id)] = handler
        request = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            request["params"] = params
        self._to_child(json.dumps(request).encode() + b"\n", first=first)

    def _verify(self, slot: str | None, answer: Any) -> None:
        if slot is not None and isinstance(answer, dict) and self.cache.get(slot) != answer:
            warn("the bundle's answer differs from the cached one: cache updated")
            self.cache.put(slot, answer)

    # the client's side
    def from_client(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            with self.lock:
                self._note_flow(None)
                self._forward(line, None)
            return
        method, request_id = message.get("method"), message.get("id")
        is_request = isinstance(method, str) and "id" in message
        with self.lock:
            if method == "initialize" and isinstance(message.get("params"), dict):
                self.session_version = message["params"].get("protocolVersion")
            slot = signature(message, self.session_version) if is_request else None
            answer = self.cache.get(slot) if slot is not None else None
            if answer is not None:
                if method == "initialize":
                    self.handshake = message.get("params")
                self._note_flow(message)
                self._reply({"jsonrpc": "2.0", "id": request_id, "result": answer})
                if method == "tools/list" and self.start_policy == "listed":
                    self._ensure_child()  # the client is connected: start while it works on
                if method != "initialize":  # the replayed handshake checks initialize
                    self._send_own(
                        method, message.get("params"), lambda m, s=slot: self._checked(s, m)
                    )
                return
            self._note_flow(message)
            if method == "notifications/initialized" and self.handshake is not None:
                return  # the front sends the bundle its own after the replayed initialize
            if is_request and slot is not None:
                self.to_store[id_key(request_id)] = slot
            self._forward(line, request_id if is_request else None)

    def _checked(self, slot: str, message: dict) -> None:
        if "result" in message:
            self._verify(slot, message["result"])

    def _note_flow(self, message: dict | None) -> None:
        if self.flow_known:
            return
        self.flow_known = True  # a handshake from the cache is replayed, else none is needed
        if self.child is not None:
            self._open_flow()

    def _forward(self, line: bytes, request_id: Any) -> None:
        if self.failure is None:
            self._ensure_child()
        if self.failure is not None:
            if request_id is not None:
                self._reply_unavailable(request_id)
            return
        if request_id is not None:
            self.outstanding.add(id_key(request_id))
        self._to_child(line if line.endswith(b"\n") else line + b"\n")

    def _reply(self, message: dict) -> None:
        self._write_client(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def _reply_unavailable(self, request_id: Any) -> None:
        self._reply(
            {
                "jsonrpc": "2.0",
                "id": request_id,
                "error": {"code": UNAVAILABLE, "message": self.failure or "unavailable"},
            }
        )

    def _write_client(self, data: bytes) -> None:
        with self.output_lock:
            try:
                self.output.write(data)
                self.output.flush()
            except (OSError, ValueError):
                pass  # the client is gone; stdin's end follows

    # the bundle's side
    def _relay_bundle(self) -> None:
        child = self.child
        for line in child.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                message = None
            if isinstance(message, dict) and "method" not in message and "id" in message:
                key = id_key(message["id"])
                with self.lock:
                    handler = self.own.pop(key, None)
                    if handler is not None:
                        handler(message)
                        continue
                    self.outstanding.discard(key)
                    slot = self.to_store.pop(key, None)
                    self.settled.notify_all()
                self._write_client(line)
                if slot is not None and isinstance(message.get("result"), dict):
                    self.cache.put(slot, message["result"])
                continue
            self._write_client(line)
        code = child.wait()
        self.stderr_thread.join(timeout=EXIT_GRACE_SECONDS)  # its last words, for the error
        with self.lock:
            if self.outstanding or self.queued or not self.closing:  # answers still owed
                detail = f"; its last words: {self.stderr_tail[-1]}" if self.stderr_tail else ""
                self._fail(f"the tool process exited (code {code}){detail}")
            self.settled.notify_all()

    def _relay_stderr(self) -> None:
        for raw in self.child.stderr:
            text = raw.decode("utf-8", "replace")
            if text.strip():
                self.stderr_tail.append(text.strip()[:500])
            sys.stderr.write(text)
            sys.stderr.flush()

    def _fail(self, reason: str) -> None:
        """Answer every waiting request with an error; later ones get it at once."""
        self.failure = (
            f"Valor's tools are unavailable: {reason}. Check the MCP server log and "
            "`valor doctor`; `VALOR_STDIO_FRONT=off` runs the bundle without this front."
        )
        warn(self.failure)
        for key in sorted(self.outstanding):
            self._reply_unavailable(json.loads(key))
        self.outstanding.clear()
        self.queued.clear()
        self.own.clear()

    # the end
    def close(self, grace: float = ANSWER_GRACE_SECONDS) -> None:
        """stdin closed: let the bundle finish the answers it owes, then end it and its tree."""
        with self.lock:
            self.closing = True
            child = self.child
            if child is None:
                return
            deadline = time.monotonic() + grace
            while self.outstanding and child.poll() is None and time.monotonic() < deadline:
                self.settled.wait(timeout=max(0.0, deadline - time.monotonic()))
        self.outbound.put(None)  # the writer closes the bundle's stdin after what is queued
        try:
            child.wait(timeout=EXIT_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            end_child(child)
        if self.relay_thread is not None:
            self.relay_thread.join(timeout=EXIT_GRACE_SECONDS)


def end_child(child: subprocess.Popen) -> None:
    """End the bundle and its descendants. While unreaped (``poll`` is None) its pid cannot
    belong to another process, so the pid alone names it exactly."""
    if child.poll() is None:
        from servers.core.processes import end_process_tree_blocking

        end_process_tree_blocking(child.pid)
    try:
        child.wait(timeout=EXIT_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def bundle_command(bundle_args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", BUNDLE_MODULE, *bundle_args]


def run(bundle_args: Sequence[str], stdin: IO[bytes], stdout: IO[bytes]) -> None:
    key = cache_key(bundle_args)
    cache = AnswerCache(os.path.join(data_dir(), CACHE_FOLDER), key)
    start = (setting("VALOR_STDIO_FRONT_START") or DEFAULT_START).lower()
    if start not in START_POLICIES:
        warn(f"VALOR_STDIO_FRONT_START={start!r} is not one of {', '.join(START_POLICIES)}")
        start = DEFAULT_START
    front = Front(bundle_command(bundle_args), cache, stdout, start=start)
    front.start()
    grace = ANSWER_GRACE_SECONDS
    try:
        for line in iter(stdin.readline, b""):
            if line.strip():
                front.from_client(line)
    except SystemExit:
        grace = 0.0  # told to stop (SIGTERM): no waiting for answers
        raise
    finally:
        front.close(grace)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return
    if (setting("VALOR_STDIO_FRONT") or "").lower() in ("off", "0", "false", "no"):
        command = bundle_command(args)
        os.execv(command[0], command)  # noqa: S606 (our own python, fixed arguments)

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    run(args, sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
