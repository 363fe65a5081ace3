"""Claude Code hooks: ``python -m servers.hooks <event>`` reads the hook's JSON on stdin.

Registered in ``.claude/settings.json``:

- ``user-prompt-submit``: in a session the bridge launched (``VALOR_LAUNCHED_BY=bridge``), the
  context block (chat, user, recent history) becomes ``additionalContext`` (read from
  ``VALOR_CONTEXT_BLOCK_FILE`` when the launcher built it, else built here); an interactive
  session gets a one-line workspace summary instead.
- ``post-tool-use`` / ``post-tool-use-failure``: one row in ``tool_calls`` per call to a Valor
  server (name, duration, success), read by monitoring-tools.
- ``session-start`` / ``session-end``: register and close the session in ``claude_sessions``.

In a sandboxed run (``VALOR_HOOK_SPOOL`` set by the runner; see ``servers.core.sandbox``) the
store is out of sight: tool calls and failures are appended as JSON lines to that spool, which the
runner ingests after the run with the chat it fixed; the runner records the session itself, and
the prompt's context comes only from the block the launcher built.

These run on every prompt and tool call, so only json/os/sqlite3/time load at import (no
pydantic, no fastmcp); the rest loads where needed. A hook never breaks a session: any failure
exits 0 with nothing added and is logged to ``<log dir>/hooks.log``.
"""

import json
import os
import sqlite3
import time

SCHEMA_VERSION = 3  # the monitoring migration; older stores are migrated on first use
# The defaults of Settings.hook_history_messages / hook_context_max_tokens (no pydantic here).
HISTORY_MESSAGES_DEFAULT = 20
CONTEXT_MAX_TOKENS_DEFAULT = 2000
ERROR_TEXT_LIMIT = 300
CONTEXT_FILE_LIMIT = 256_000  # characters; a precomputed block larger than this is ignored
LOG_LIMIT_BYTES = 1_000_000
BUSY_TIMEOUT_MS = 2000  # a hook waits briefly for a busy store, then gives up (and logs)


# -- where things are ------------------------------------------------------------------------------
def _dotenv_value(name: str) -> str | None:
    """The value in Valor's .env (``VALOR_ENV_FILE``, else the repository's; not the project
    Claude Code runs in), as Settings reads it, so hooks and servers agree on the store."""
    from servers.core.env_file import dotenv_value  # only when the environment lacks it

    return dotenv_value(name)


def _setting(name: str) -> str | None:
    return os.environ.get(name) or _dotenv_value(name)


def data_dir() -> str:
    configured = _setting("VALOR_DATA_DIR")
    if configured:
        return os.path.expanduser(configured)
    from servers.core.paths import default_data_dir

    return str(default_data_dir())


def log_dir() -> str:
    configured = _setting("VALOR_LOG_DIR")
    return os.path.expanduser(configured) if configured else os.path.join(data_dir(), "logs")


def _int_setting(name: str, default: int) -> int:
    try:
        return int(_setting(name) or default)
    except ValueError:
        return default


# -- the store -------------------------------------------------------------------------------------
def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA synchronous=NORMAL")  # as the store: WAL commits without an fsync
    return conn


def open_store() -> sqlite3.Connection:
    """The Valor store, migrated to at least the monitoring schema."""
    path = os.path.join(data_dir(), "valor.db")
    if os.path.exists(path):
        conn = _connect(path)
        if conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return conn
        conn.close()
    # Missing or old: the store's own migrations, exactly what any server start would apply.
    from servers.core.store import Store

    Store(path).close()
    return _connect(path)


# -- events ----------------------------------------------------------------------------------------
def split_tool_name(name: str) -> tuple[str, str]:
    """``mcp__<server>__<tool>`` -> (server, tool); anything else -> ("", name)."""
    if name.startswith("mcp__"):
        parts = name.split("__", 2)
        if len(parts) == 3:
            return parts[1], parts[2]
    return "", name


def _chat_id() -> int | None:
    try:
        return int(os.environ["VALOR_CHAT_ID"])
    except (KeyError, ValueError):
        return None


def _response_error(response: object) -> str | None:
    """Error text when an MCP tool reported failure in its response, else None."""
    if isinstance(response, dict) and response.get("isError"):
        return json.dumps(response.get("content", ""), ensure_ascii=False)
    if isinstance(response, list):
        for block in response:
            if isinstance(block, dict) and block.get("isError"):
                return json.dumps(block, ensure_ascii=False)
    return None


# -- a sandboxed run: the spool -------------------------------------------------------------------
def spool_path() -> str | None:
    """The run's spool file when it runs in Valor's sandbox (the store is hidden there)."""
    return os.environ.get("VALOR_HOOK_SPOOL") or None


def append_to_spool(path: str, record: dict) -> None:
    """One JSON line; the runner created the file, so it is never created (or followed) here."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.write(fd, line)  # O_APPEND: concurrent hooks never interleave within a line
    finally:
        os.close(fd)


def record_tool_call(payload: dict, failed: bool) -> None:
    server, tool = split_tool_name(str(payload.get("tool_name", "")))
    if not server:  # only MCP tools are Valor's (the matcher in settings.json says which)
        return
    error = None
    if failed:
        error = str(payload.get("error") or payload.get("tool_response") or "failed")
    else:
        error = _response_error(payload.get("tool_response"))
    duration = payload.get("duration_ms")
    duration_ms = float(duration) if isinstance(duration, int | float) else None
    error = error[:ERROR_TEXT_LIMIT] if error is not None else None
    spool = spool_path()
    if spool is not None:  # the runner adds the chat: it never comes from inside the run
        record = {"event": "tool_call", "session_id": str(payload.get("session_id", ""))}
        record.update(server=server, tool=tool, duration_ms=duration_ms, error=error)
        append_to_spool(spool, {**record, "called_at": time.time()})
        return
    conn = open_store()
    try:
        conn.execute(
            "INSERT INTO tool_calls (session_id, server, tool, success, duration_ms, error, "
            "chat_id, called_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                str(payload.get("session_id", "")),
                server,
                tool,
                0 if error is not None else 1,
                duration_ms,
                error,
                _chat_id(),
                time.time(),
            ),
        )
    finally:
        conn.close()


def post_tool_use(payload: dict) -> None:
    record_tool_call(payload, failed=False)


def post_tool_use_failure(payload: dict) -> None:
    record_tool_call(payload, failed=True)


def _proc_stat(pid: int) -> tuple[str, int, float] | None:
    """(command name, parent pid, start ticks) from /proc, or None off Linux."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return name, int(fields[1]), float(fields[19])


def _boot_time() -> float:
    with open("/proc/stat", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("btime"):
                return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def claude_process() -> tuple[int | None, float | None]:
    """The Claude Code process running this hook (pid, create time as psutil computes it)."""
    pid = os.getppid()
    for _ in range(4):  # the hook may run under a shell or two
        stat = _proc_stat(pid)
        if stat is None:
            return None, None
        name, parent, start_ticks = stat
        if name.startswith("claude"):
            return pid, _boot_time() + start_ticks / os.sysconf("SC_CLK_TCK")
        if parent <= 1:
            break
        pid = parent
    return None, None


def session_start(payload: dict) -> None:
    session_id = str(payload.get("session_id", ""))
    if not session_id or spool_path() is not None:  # sandboxed: the runner records sessions
        return
    pid, create_time = claude_process()
    launched_by = "bridge" if os.environ.get("VALOR_LAUNCHED_BY") == "bridge" else "interactive"
    conn = open_store()
    try:
        conn.execute(
            "INSERT INTO claude_sessions (session_id, launched_by, chat_id, pid, create_time, "
            "cwd, source, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (session_id) DO UPDATE SET ended_at = NULL, end_reason = NULL, "
            "pid = excluded.pid, create_time = excluded.create_time, source = excluded.source",
            (
                session_id,
                launched_by,
                _chat_id(),
                pid,
                create_time,
                str(payload.get("cwd", "")),
                str(payload.get("source", "")),
                time.time(),
            ),
        )
    finally:
        conn.close()


def session_end(payload: dict) -> None:
    session_id = str(payload.get("session_id", ""))
    if not session_id or spool_path() is not None:
        return
    conn = open_store()
    try:
        conn.execute(
            "UPDATE claude_sessions SET ended_at = ?, end_reason = ? "
            "WHERE session_id = ? AND ended_at IS NULL",
            (time.time(), str(payload.get("reason", ""))[:100], session_id),
        )
    finally:
        conn.close()


def chat_context(chat_id: int) -> str:
    """The context block for a bridge session: chat, user and recent history.

    The bridge builds the same block from the same settings (``Bridge._context_block``)."""
    from servers.core.context_markup import plain_block, recent_history

    user_name = os.environ.get("VALOR_USER_NAME", "")
    user_id = os.environ.get("VALOR_USER_ID", "")
    limit = _int_setting("VALOR_HOOK_HISTORY_MESSAGES", HISTORY_MESSAGES_DEFAULT)
    max_tokens = _int_setting("VALOR_HOOK_CONTEXT_MAX_TOKENS", CONTEXT_MAX_TOKENS_DEFAULT)
    conn = open_store()
    try:
        try:  # the chat's memory and recent turns, as the bridge builds them
            from servers.core.chat_memory import chat_block

            return chat_block(
                conn, chat_id, user_name, user_id, max_messages=limit, max_tokens=max_tokens
            )
        except ImportError:  # the same markup and escaping, without the optimizer
            messages = recent_history(conn, chat_id, limit)
            return plain_block(chat_id, user_name, user_id, messages, max_tokens)
    finally:
        conn.close()


def workspace_summary(cwd: str) -> str:
    """One line for interactive sessions: where we are, the git branch, how many files changed."""
    import subprocess

    try:
        completed = subprocess.run(
            ["git", "status", "--porcelain=v1", "--branch"],
            cwd=cwd or None,
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return f"Workspace: {cwd} (git status unavailable)."
    if completed.returncode != 0:
        return f"Workspace: {cwd} (not a git repository)."
    lines = completed.stdout.splitlines()
    branch = "?"
    if lines and lines[0].startswith("## "):
        branch = lines[0][3:].removeprefix("No commits yet on ").split("...")[0]
    changed = sum(1 for line in lines if not line.startswith("## "))
    return f"Workspace: {cwd} (git branch {branch}, {changed} changed files)."


def precomputed_context() -> str | None:
    """The block the launcher already built (``VALOR_CONTEXT_BLOCK_FILE``), if it did.

    A long-lived bridge has the tokenizer loaded; building the block there, just before it
    starts Claude Code, spares every prompt the ~0.2 s of loading it in this short process.
    """
    path = os.environ.get("VALOR_CONTEXT_BLOCK_FILE")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(CONTEXT_FILE_LIMIT + 1)
    except OSError:
        return None  # gone (e.g. cleaned up): build it here instead
    if not text.strip() or len(text) > CONTEXT_FILE_LIMIT:
        return None
    return text


def user_prompt_submit(payload: dict) -> dict | None:
    if os.environ.get("VALOR_LAUNCHED_BY") == "bridge":
        chat_id = _chat_id()
        if chat_id is None:
            raise ValueError("VALOR_LAUNCHED_BY=bridge without a valid VALOR_CHAT_ID")
        context = precomputed_context()
        if context is None and spool_path() is None:  # sandboxed: no store to build it from
            context = chat_context(chat_id)
        if context is None:
            return None
    else:
        context = workspace_summary(str(payload.get("cwd") or os.getcwd()))
    return {
        "hookSpecificOutput": {"hookEventName": "UserPromptSubmit", "additionalContext": context}
    }


HANDLERS = {
    "user-prompt-submit": user_prompt_submit,
    "post-tool-use": post_tool_use,
    "post-tool-use-failure": post_tool_use_failure,
    "session-start": session_start,
    "session-end": session_end,
}


# -- running -------------------------------------------------------------------------------------
# Errors whose text describes the failure, not the payload (which may hold private text).
_DESCRIPTIVE_ERRORS = (OSError, sqlite3.Error, json.JSONDecodeError, LookupError, ValueError)


def describe_failure(exc: BaseException) -> str:
    """Type, where it was raised, and the message only for errors known not to echo payloads."""
    where = ""
    trace = exc.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    if trace is not None:
        frame = trace.tb_frame.f_code
        where = f" at {os.path.basename(frame.co_filename)}:{trace.tb_lineno}"
    text = f"{type(exc).__name__}{where}"
    if isinstance(exc, _DESCRIPTIVE_ERRORS):
        text += ": " + str(exc).replace("\n", " ")[:300]
    return text


def write_log_lines(directory: str, lines: list[str]) -> None:
    """Append time-stamped lines to ``<directory>/hooks.log`` (rotated past its size limit)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "hooks.log")
    if os.path.exists(path) and os.path.getsize(path) > LOG_LIMIT_BYTES:
        os.replace(path, path + ".1")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(path, "a", encoding="utf-8") as handle:
        handle.writelines(f"{stamp} {line}\n" for line in lines)


def log_failure(event: str, exc: BaseException) -> None:
    """One line in hooks.log (or, sandboxed, in the spool for the runner to log); importing
    nothing more (a failing hook stays fast)."""
    try:
        spool = spool_path()
        if spool is not None:
            record = {"event": "hook_failure", "hook": event, "detail": describe_failure(exc)}
            append_to_spool(spool, record)
        else:
            write_log_lines(log_dir(), [f"{event} failed: {describe_failure(exc)}"])
    except Exception:  # noqa: S110 - nothing more can be done; the session must go on
        pass


def run(event: str, stdin_text: str) -> str:
    """Handle one event; returns what to print. Never raises."""
    try:
        handler = HANDLERS[event]
        payload = json.loads(stdin_text) if stdin_text.strip() else {}
        if not isinstance(payload, dict):
            raise ValueError("hook input is not a JSON object")
        output = handler(payload)
        return json.dumps(output, ensure_ascii=False) if output else ""
    except BaseException as exc:
        log_failure(event, exc)
        return ""


def main(argv: list[str]) -> int:
    import sys

    event = argv[0] if argv else ""
    try:
        stdin_text = sys.stdin.read()
    except Exception as exc:
        log_failure(event, exc)
        stdin_text = ""
    output = run(event, stdin_text)
    if output:
        sys.stdout.write(output)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
