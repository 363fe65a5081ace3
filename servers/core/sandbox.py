"""The OS sandbox every Claude Code run Valor starts runs in: bubblewrap (``bwrap``).

A run serves one chat, and a prompt-injected model holds whatever the run can reach. Deny rules
match only literal paths and a clean environment does not hide the parent's, so the boundary is
the kernel's: ``launch`` wraps the run's argv in ``bwrap`` with

- its own PID, IPC and UTS namespaces and a fresh ``/proc`` (no view of Valor's processes or
  their environment), a new session (no terminal injection), every capability dropped, and
  ``--die-with-parent`` (the run never outlives the process that started it);
- the system read-only (``--ro-bind / /``), then masks: a private ``/tmp``; the operator's home
  and runtime directory; the data directory and any media, screenshots, log or temp directory
  configured outside it; every ``.env`` of the repository, the workdir and Valor's own cwd;
- bound back: the workdir read-write; Valor's installation (``REPO_ROOT``) read-only even when it
  is the workdir, so a run cannot plant code the host loads later; Python's and Claude Code's
  own installations read-only; from the data directory only the run's MCP config and context
  block (read-only), the chat's media (read-write), the chat's screenshots (read-only), a bug
  report's screenshot folder (``VALOR_SCREENSHOT_DIR``, read-write), the chat's own Claude Code
  home (``DATA_DIR/chats/<chat>/claude``, ``HOME`` and ``CLAUDE_CONFIG_DIR``) and the run's hook
  spool;
- the network shared: the model API and the hosted tools on loopback (token-checked) are needed.

The hooks cannot open the hidden store, so inside a sandbox they append JSON lines to the spool
(``VALOR_HOOK_SPOOL``); ``ingest_spool`` turns them into ``tool_calls`` rows after the run, with
the chat fixed by the runner, and the runner records the session itself (``record_session_*``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pwd
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from servers.core.env_file import env_file_path
from servers.core.errors import Category, ValorError
from servers.core.safe_files import UnsafeFile, ensure_private_dir, read_regular

if TYPE_CHECKING:
    from servers.core.claude_command import ClaudeRun
    from servers.core.settings import Settings
    from servers.core.store import Store

log = logging.getLogger("valor.sandbox")

SPOOL_ENV = "VALOR_HOOK_SPOOL"
PRIVATE_TMP = "/tmp"  # noqa: S108 - a fresh tmpfs inside the sandbox, private to the run
SCREENSHOT_DIR_ENV = "VALOR_SCREENSHOT_DIR"
CONTEXT_FILE_ENV = "VALOR_CONTEXT_BLOCK_FILE"
SPOOL_LIMIT_BYTES = 4 * 1024 * 1024  # the spool is written by code inside the run: bounded
SPOOL_MAX_ROWS = 5_000
NAME_LIMIT = 200
ERROR_TEXT_LIMIT = 300  # as servers.hooks
# Valor's own code and what loads it: never writable from a run, even with the repo as workdir.
INSTALLATION_ENTRIES = (
    ".venv", "node_modules", "servers", "bridge", "scheduler", "tests", "bench", ".claude",
    ".ci", ".git", "valor.egg-info",
)  # fmt: skip
DOTENV_TEMPLATES = (".example", ".sample", ".template", ".dist")
# Environment that points into what the sandbox hides (or at sockets of the operator's session).
HIDDEN_ENV = (
    "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR",
    "DBUS_SESSION_BUS_ADDRESS", "SSH_AUTH_SOCK", "GPG_AGENT_INFO",
)  # fmt: skip
# A run authenticates to the model API with one of these (or a login in its own Claude home).
CREDENTIAL_ENV = (
    "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN",
    "CLAUDE_CODE_USE_BEDROCK", "CLAUDE_CODE_USE_VERTEX",
)  # fmt: skip
BWRAP_OPTIONS = (
    "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
    "--unshare-cgroup-try", "--hostname", "valor-run", "--cap-drop", "ALL",
)  # fmt: skip


# -- settings --------------------------------------------------------------------------------------
def enabled(settings: Settings) -> bool:
    return settings.sandbox != "off"


def resolve_bwrap(settings: Settings) -> str:
    """The bwrap executable, or a [config] error saying how to install it or opt out."""
    configured = settings.bwrap_bin or "bwrap"
    found = shutil.which(configured)
    if found is None:
        where = f"VALOR_BWRAP_BIN={configured}" if settings.bwrap_bin else "`bwrap` on PATH"
        raise ValorError(
            Category.CONFIG,
            f"Claude Code runs are sandboxed with bubblewrap, but {where} was not found. "
            "Install it (`sudo apt-get install bubblewrap`, or `bash .ci/setup`), point "
            "VALOR_BWRAP_BIN at it, or set VALOR_SANDBOX=off to allow unsandboxed runs (a run "
            "then reads everything Valor's user can: .env, the store, every chat).",
        )
    return found


_logged_mode = False


def log_sandbox_mode(settings: Settings, logger: logging.Logger | None = None) -> None:
    """One start-up line (once per process) saying how runs are sandboxed."""
    global _logged_mode
    if _logged_mode:
        return
    _logged_mode = True
    logger = logger or log
    if not enabled(settings):
        logger.warning(
            "VALOR_SANDBOX=off: Claude Code runs are NOT sandboxed; a run can read .env, the "
            "store and every chat's files"
        )
        return
    try:
        logger.info("Claude Code runs are sandboxed with %s", resolve_bwrap(settings))
    except ValorError as exc:
        logger.error("%s", exc.detail)


def claude_home(settings: Settings, chat_id: int | None) -> Path:
    """The chat's own Claude Code home and config dir (its sessions and transcripts)."""
    folder = "operator" if chat_id is None else str(int(chat_id))
    return settings.data_dir / "chats" / folder / "claude"


# -- the launch ------------------------------------------------------------------------------------
@dataclass
class Launch:
    """How to start a run: ``argv`` and ``env`` (wrapped in bwrap when ``sandboxed``)."""

    argv: list[str]
    env: dict[str, str]
    sandboxed: bool
    spool: Path | None = None  # hook records of a sandboxed run
    bwrap: str | None = None

    def command_shown(self, persona: bool) -> list[str]:
        """What the registry records: the wrapper (its mounts elided) and the command it runs,
        without an appended system prompt (``persona``: the last two arguments)."""
        command = self.argv[self.argv.index("--") + 1 :] if self.bwrap else list(self.argv)
        command = command[:-2] if persona else command
        return [self.bwrap, "--", *command] if self.bwrap else command


@contextlib.contextmanager
def launch(
    argv: Sequence[str],
    env: Mapping[str, str],
    run: ClaudeRun,
    settings: Settings,
    workdir: Path,
    claude_bin: str,
) -> Iterator[Launch]:
    """The run's launch for the block; a sandboxed run's spool is removed at the end."""
    if not enabled(settings):
        log.debug("sandbox off: a %s run for chat %s starts unsandboxed", run.launched_by,
                  run.chat_id)  # fmt: skip
        yield Launch(list(argv), dict(env), sandboxed=False)
        return
    bwrap = resolve_bwrap(settings)
    home = ensure_private_dir(claude_home(settings, run.chat_id))
    check_credentials(env, home)
    run_dir = ensure_private_dir(settings.data_dir / "run")
    fd, name = tempfile.mkstemp(prefix="spool-", suffix=".jsonl", dir=run_dir)
    os.close(fd)  # mkstemp creates it 0600
    spool = Path(name)
    try:
        sandbox_env = {k: v for k, v in env.items() if k not in HIDDEN_ENV}
        sandbox_env.update(HOME=str(home), CLAUDE_CONFIG_DIR=str(home), TMPDIR=PRIVATE_TMP)
        sandbox_env[SPOOL_ENV] = str(spool)
        plan = mount_plan(run, settings, workdir, home, spool, claude_bin, env)
        yield Launch(
            bwrap_argv(bwrap, plan, workdir, argv), sandbox_env, True, spool=spool, bwrap=bwrap
        )
    finally:
        spool.unlink(missing_ok=True)


def check_credentials(env: Mapping[str, str], home: Path) -> None:
    """A sandboxed run never sees the operator's Claude Code login (``~/.claude``): that file
    holds the account's refresh token, which any chat's run could read and, by refreshing,
    rotate under the operator. Say so instead of letting Claude Code fail with "not logged in"."""
    if any(env.get(name) for name in CREDENTIAL_ENV) or (home / ".credentials.json").exists():
        return
    operator = Path(os.environ.get("CLAUDE_CONFIG_DIR") or Path.home() / ".claude")
    if (operator / ".credentials.json").exists():
        raise ValorError(
            Category.CONFIG,
            "Sandboxed Claude Code runs do not use your Claude Code login "
            f"({operator}/.credentials.json). Set ANTHROPIC_API_KEY, or CLAUDE_CODE_OAUTH_TOKEN "
            "from `claude setup-token`, for Valor.",
        )


# -- the mount view --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mount:
    kind: str  # "ro", "rw", "tmpfs" (hide a folder), "empty" (hide a file behind ``source``)
    path: Path
    source: Path | None = None

    def args(self) -> list[str]:
        path = str(self.path)
        if self.kind == "ro":
            return ["--ro-bind", path, path]
        if self.kind == "rw":
            return ["--bind", path, path]
        if self.kind == "tmpfs":
            return ["--tmpfs", path]
        return ["--ro-bind", str(self.source), path]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(path))


def mount_plan(
    run: ClaudeRun,
    settings: Settings,
    workdir: Path,
    home: Path,
    spool: Path,
    claude_bin: str,
    env: Mapping[str, str],
) -> list[Mount]:
    """Every mount after ``--ro-bind / /``, in the order bwrap must apply them.

    Declared from the widest rule to the narrowest, then stably sorted by depth: a deeper path
    is mounted later, so it wins over the folder it lies in (a workdir under a hidden home, the
    repository inside a writable workdir, a chat's media inside the hidden data directory).
    """
    from servers.core.settings import REPO_ROOT

    workdir, repo = _real(workdir), _real(REPO_ROOT)
    plan = [Mount("tmpfs", Path(PRIVATE_TMP))]
    # The operator's home (~/.ssh, ~/.claude with its login and every old transcript …) and its
    # session sockets; not when the workdir is that home or holds it (the operator's choice).
    private = {_real(Path.home()), _real(pwd.getpwuid(os.getuid()).pw_dir)}
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        private.add(_real(runtime))
    plan += [
        Mount("tmpfs", folder)
        for folder in sorted(private)
        if folder != Path("/") and folder.is_dir() and not _inside(folder, workdir)
    ]
    hidden = [mount.path for mount in plan]
    if not any(_inside(workdir, repo / entry) for entry in INSTALLATION_ENTRIES):
        plan.append(Mount("rw", workdir))
    # Valor's installation (after the workdir: it may be the workdir); Python's and Claude
    # Code's installations when a mask above would hide them.
    plan.append(Mount("ro", repo))
    tools = [_real(sys.base_prefix), Path(os.path.abspath(claude_bin)).parent]
    tools.append(_real(claude_bin).parent)
    plan += [
        Mount("ro", folder)
        for folder in dict.fromkeys(tools)
        if folder.is_dir() and any(_inside(folder, mask) for mask in hidden)
    ]
    # Valor's data, wherever each part is configured.
    data_dirs = [settings.data_dir, settings.media_path, settings.screenshots_path]
    plan += [Mount("tmpfs", ensure_private_dir(folder).resolve()) for folder in data_dirs]
    plan += [
        Mount("tmpfs", folder.resolve())
        for folder in (settings.log_path, settings.temp_path)
        if folder.is_dir()
    ]
    # What the run needs of it.
    media = ensure_private_dir(settings.chat_media_path(run.chat_id)).resolve()
    plan += [Mount("rw", media), Mount("rw", home.resolve()), Mount("rw", spool.resolve())]
    shots = settings.chat_screenshots_path(run.chat_id).resolve()
    if shots.is_dir():
        plan.append(Mount("ro", shots))
    for name, kind in ((CONTEXT_FILE_ENV, "ro"), (SCREENSHOT_DIR_ENV, "rw")):
        if (value := env.get(name)) and Path(value).exists():
            plan.append(Mount(kind, _real(value)))
    if run.mcp_config is not None and Path(run.mcp_config).is_file():
        plan.append(Mount("ro", _real(run.mcp_config)))
    # Every secret file Settings could read, last: nothing above may uncover one. An empty file
    # stands in (bwrap's binds are nodev, so /dev/null would refuse to open at all).
    empty = _empty_file(settings.data_dir / "run")
    for folder in dict.fromkeys([repo, workdir, _real(os.getcwd())]):
        plan += [Mount("empty", secret, empty) for secret in _dotenv_files(folder)]
    configured = _real(env_file_path())  # VALOR_ENV_FILE may name a file anywhere
    if configured.is_file() and all(mount.path != configured for mount in plan):
        plan.append(Mount("empty", configured, empty))
    return sorted(plan, key=lambda mount: len(mount.path.parts))


def _dotenv_files(folder: Path) -> list[Path]:
    """``.env`` and ``.env.*`` in ``folder`` (a file, or a link to one), but not the templates
    a repository ships (``.env.example`` …)."""
    try:
        names = [n for n in os.listdir(folder) if n == ".env" or n.startswith(".env.")]
    except OSError:
        return []
    names = [n for n in names if not n.endswith(DOTENV_TEMPLATES)]
    return [folder / name for name in sorted(names) if (folder / name).is_file()]


def _empty_file(folder: Path) -> Path:
    path = ensure_private_dir(folder) / "empty"
    if not path.is_file() or path.stat().st_size:
        path.unlink(missing_ok=True)
        path.touch(mode=0o400)
    return path


def bwrap_argv(bwrap: str, plan: Sequence[Mount], workdir: Path, argv: Sequence[str]) -> list[str]:
    command = [bwrap, *BWRAP_OPTIONS, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for mount in plan:
        command += mount.args()
    return [*command, "--chdir", str(_real(workdir)), "--", *argv]


def start_failure(stderr: str) -> ValorError | None:
    """bwrap's own failure to set the sandbox up, as a [config] error saying what to do."""
    if not is_sandbox_failure(stderr):
        return None
    return ValorError(
        Category.CONFIG,
        "The sandbox could not start Claude Code: "
        f"{stderr.strip().splitlines()[-1][:300]}. Check that bubblewrap works here (user "
        "namespaces enabled), or set VALOR_SANDBOX=off to allow unsandboxed runs.",
    )


def is_sandbox_failure(stderr: str) -> bool:
    """bwrap itself failed to set the sandbox up (its messages start with ``bwrap:``)."""
    lines = stderr.strip().splitlines()
    return bool(lines) and lines[-1].startswith("bwrap:")


# -- after the run: the hooks' spool and the session record -------------------------------------
@dataclass(frozen=True)
class SpoolIngest:
    tool_calls: int = 0
    hook_failures: int = 0
    rejected_lines: int = 0


def _text(value: object, limit: int = NAME_LIMIT) -> str:
    return "".join(ch for ch in str(value) if ch.isprintable())[:limit]


def ingest_spool(
    store: Store, spool: Path, chat_id: int | None, since: float, log_path: Path
) -> SpoolIngest:
    """The tool calls a sandboxed run's hooks spooled, as ``tool_calls`` rows of ``chat_id``.

    The spool was writable inside the run, so every line is untrusted: the chat is the runner's,
    names and errors are cut to size, times are clamped to the run, and the rows are bounded.
    Hook failures go to ``hooks.log`` as the hooks would have written them.
    """
    try:
        data = read_regular(spool, SPOOL_LIMIT_BYTES)
    except (OSError, UnsafeFile) as exc:
        log.warning("hook spool of a run for chat %s unreadable: %s", chat_id, exc)
        return SpoolIngest()
    rows, failures, rejected = [], [], 0
    now = time.time()
    for line in data.splitlines():
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
            if record.get("event") == "tool_call" and len(rows) < SPOOL_MAX_ROWS:
                rows.append(_tool_call_row(record, chat_id, since, now))
            elif record.get("event") == "hook_failure" and len(failures) < 100:
                hook, detail = _text(record.get("hook"), 40), record.get("detail")
                failures.append(f"{hook} failed: {_text(detail, ERROR_TEXT_LIMIT)} (sandboxed)")
            else:
                rejected += 1
        except (ValueError, TypeError):
            rejected += 1
    if rows:
        with store.transaction() as conn:
            conn.executemany(
                "INSERT INTO tool_calls (session_id, server, tool, success, duration_ms, error, "
                "chat_id, called_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
    if failures:
        _append_hooks_log(log_path, failures)
    if rejected:
        log.warning("ignored %d malformed hook spool line(s) of chat %s", rejected, chat_id)
    return SpoolIngest(len(rows), len(failures), rejected)


def _append_hooks_log(log_path: Path, lines: list[str]) -> None:
    """Lines in ``hooks.log`` as the hooks write them (``<UTC time> <event> failed: …``)."""
    log_path.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(log_path / "hooks.log", "a", encoding="utf-8") as handle:
        handle.writelines(f"{stamp} {line}\n" for line in lines)


def _tool_call_row(record: dict, chat_id: int | None, since: float, now: float) -> tuple:
    server, tool = _text(record["server"]), _text(record["tool"])
    if not server or not tool:
        raise ValueError("no server or tool")
    duration = record.get("duration_ms")
    duration_ms = float(duration) if isinstance(duration, int | float) else None
    if duration_ms is not None and not (math.isfinite(duration_ms) and duration_ms >= 0):
        duration_ms = None
    error = record.get("error")
    called = record.get("called_at")
    called_at = min(max(float(called), since), now) if isinstance(called, int | float) else now
    if not math.isfinite(called_at):
        called_at = now
    return (
        _text(record.get("session_id", "")),
        server,
        tool,
        0 if error is not None else 1,
        duration_ms,
        _text(error, ERROR_TEXT_LIMIT) if error is not None else None,
        chat_id,
        called_at,
    )


def run_process(root_pid: int) -> tuple[int, float]:
    """The Claude Code process inside a sandbox (the first descendant that is not bwrap), or
    the root itself: what ``claude_sessions`` records as the session's process."""
    import psutil

    root = psutil.Process(root_pid)
    with contextlib.suppress(psutil.Error):
        for child in root.children(recursive=True):
            if child.name() != "bwrap":
                return child.pid, child.create_time()
    return root.pid, root.create_time()


def record_session_start(
    store: Store,
    session_id: str,
    run: ClaudeRun,
    pid: int | None,
    create_time: float | None,
    cwd: Path,
) -> None:
    """What the SessionStart hook records outside a sandbox, from the runner's own facts."""
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO claude_sessions (session_id, launched_by, chat_id, pid, create_time, "
            "cwd, source, started_at) VALUES (?, ?, ?, ?, ?, ?, 'sandbox', ?) "
            "ON CONFLICT (session_id) DO UPDATE SET ended_at = NULL, end_reason = NULL, "
            "pid = excluded.pid, create_time = excluded.create_time, source = excluded.source",
            (session_id, run.launched_by, run.chat_id, pid, create_time, str(cwd), time.time()),
        )


def record_session_end(store: Store, session_id: str, reason: str) -> None:
    with store.transaction() as conn:
        conn.execute(
            "UPDATE claude_sessions SET ended_at = ?, end_reason = ? "
            "WHERE session_id = ? AND ended_at IS NULL",
            (time.time(), reason[:100], session_id),
        )
