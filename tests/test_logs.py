"""Log files per process kind: rotation, 0600 files, redaction, correlation ids, a quiet console."""

from __future__ import annotations

import logging
import re
import stat

import pytest
from fastmcp import Client

from servers.core.app import create_server
from servers.core.logs import reset_logging, setup_logging
from servers.core.settings import get_settings
from tests.support import configure, texts

OPENAI_KEY = "sk-test-abcdefghijklmnop1234"


@pytest.fixture(autouse=True)
def clean_logging():
    root_level = logging.getLogger().level
    yield
    reset_logging()
    logging.getLogger().setLevel(root_level)
    for name in ("mcp", "fastmcp", "httpx", "uvicorn", "apscheduler"):
        logging.getLogger(name).setLevel(logging.NOTSET)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_rotate_at_the_configured_size_and_stay_owner_only(monkeypatch):
    configure(monkeypatch, VALOR_LOG_MAX_BYTES="2048", VALOR_LOG_BACKUP_COUNT="2")
    path = setup_logging("cli", console=False)
    assert path == get_settings().log_path / "cli.log"
    log = logging.getLogger("valor.test")
    for n in range(200):
        log.info("line %03d %s", n, "x" * 60)
    files = sorted(path.parent.glob("cli.log*"))
    assert [f.name for f in files] == ["cli.log", "cli.log.1", "cli.log.2"]  # two kept, no more
    for file in files:
        assert file.stat().st_size <= 2048
        assert mode(file) == 0o600
    assert mode(path.parent) == 0o700
    assert "line 199" in path.read_text()  # the newest line is in the live file
    assert "line 000" not in "".join(f.read_text() for f in files)  # the oldest rotated away


def test_a_setting_decides_the_size(monkeypatch):
    configure(monkeypatch, VALOR_LOG_MAX_BYTES="100000")
    path = setup_logging("cli", console=False)
    for n in range(200):
        logging.getLogger("valor.test").info("line %03d %s", n, "x" * 60)
    assert [f.name for f in path.parent.glob("cli.log*")] == ["cli.log"]  # under the size


def test_secrets_are_redacted_in_messages_arguments_and_tracebacks(monkeypatch, capsys):
    configure(monkeypatch, OPENAI_API_KEY=OPENAI_KEY)
    path = setup_logging("daemon", verbosity=1)
    log = logging.getLogger("valor.test")
    log.info("calling with %s", OPENAI_KEY)  # the configured value
    log.warning("header Authorization: Bearer abcdefghijklmnopqrstuvwxyz")  # a secret's shape
    try:
        raise RuntimeError(f"upstream said no to {OPENAI_KEY}")
    except RuntimeError:
        log.exception("failed")
    text = path.read_text()
    console = capsys.readouterr().err
    for output in (text, console):
        assert OPENAI_KEY not in output and "abcdefghijklmnopqrstuvwxyz" not in output
        assert "calling with ***" in output and "RuntimeError: upstream said no to ***" in output


async def test_an_internal_errors_correlation_id_is_in_the_log_file():
    server = create_server("logtest-tools", "a test server")

    @server.tool
    def explode() -> str:
        """Fails unexpectedly."""
        raise KeyError("private text")

    path = setup_logging("server-logtest-tools", console=False)
    async with Client(server) as client:
        result = await client.call_tool("explode", {}, raise_on_error=False)
    message = texts(result)
    assert message.startswith("[internal]")
    correlation_id = re.search(r"correlation id ([0-9a-f]{12})", message).group(1)
    lines = [line for line in path.read_text().splitlines() if correlation_id in line]
    assert len(lines) == 1
    assert "ERROR valor.errors: unexpected error in explode" in lines[0]
    assert "private text" not in path.read_text()


async def test_at_debug_a_tool_calls_arguments_stay_out_of_the_log(monkeypatch):
    """FastMCP logs every call's arguments at DEBUG; Valor's DEBUG log keeps only the call."""
    configure(monkeypatch, VALOR_LOG_LEVEL="DEBUG")
    server = create_server("logtest-tools", "a test server")

    @server.tool
    def echo(text: str) -> str:
        """Says it back."""
        return "ok"

    path = setup_logging("server-logtest-tools", console=False)
    async with Client(server) as client:
        await client.call_tool("echo", {"text": "the door code is 4471"})
    logged = path.read_text()
    assert "DEBUG" in logged and "call_tool" in logged  # debug lines are there …
    assert "4471" not in logged  # … but not what was said


def test_console_is_quiet_by_default_and_library_chatter_is_gone(capsys):
    path = setup_logging("cli")
    logging.getLogger("valor.test").info("an info line")
    logging.getLogger("valor.test").warning("a warning line")
    manager = logging.getLogger("mcp.server.streamable_http_manager")
    manager.info("StreamableHTTP session manager started")
    console = capsys.readouterr().err
    assert "a warning line" in console and "an info line" not in console
    text = path.read_text()
    assert "an info line" in text  # the file keeps info
    assert "StreamableHTTP session manager started" not in text + console


def test_v_shows_info_and_vv_the_library_lines(capsys):
    setup_logging("cli", verbosity=1)
    logging.getLogger("valor.test").info("an info line")
    logging.getLogger("mcp.server.streamable_http_manager").info("session manager started")
    console = capsys.readouterr().err
    assert "an info line" in console and "session manager started" not in console
    setup_logging("cli", verbosity=2, force=True)
    logging.getLogger("mcp.server.streamable_http_manager").debug("session manager started")
    assert "session manager started" in capsys.readouterr().err


def test_the_first_entry_point_decides_the_kind():
    first = setup_logging("daemon", console=False)
    assert setup_logging("server-social-tools", console=False) is None  # imported by the daemon
    logging.getLogger("valor.test").warning("from a hosted server")
    assert "from a hosted server" in first.read_text()
    assert not (first.parent / "server-social-tools.log").exists()


def test_a_symlink_in_the_log_files_place_is_never_followed(tmp_path, capsys):
    target = tmp_path / "elsewhere.txt"
    target.write_text("")
    log_dir = get_settings().log_path
    log_dir.mkdir(parents=True)
    (log_dir / "cli.log").symlink_to(target)
    assert setup_logging("cli") is None  # console only
    logging.getLogger("valor.test").warning("still logged")
    assert "still logged" in capsys.readouterr().err
    assert target.read_text() == ""


async def test_a_stdio_server_logs_into_its_own_file(stdio_client_for):
    async with stdio_client_for("context-tools") as session:
        await session.list_tools()
    path = get_settings().log_path / "server-context-tools.log"
    assert path.exists() and mode(path) == 0o600
