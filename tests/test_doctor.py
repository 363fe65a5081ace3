"""`valor doctor`: each configured capability exercised for real (against loopback fakes); a
broken one exits 1, one merely not configured is `off` and exits 0."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from telethon.crypto import AuthKey
from telethon.sessions import StringSession

from servers.core.doctor import BROKEN, OFF, OK, diagnose
from servers.core.settings import get_settings
from servers.core.store import get_store
from tests.fakes.anthropic_api import FakeAnthropic
from tests.fakes.openai_api import FakeOpenAI
from tests.support import configure, free_port


def check(name: str) -> tuple[str, str]:
    """(state, detail) of the capability whose name starts with ``name``."""
    found = [item for item in diagnose(get_settings()) if item.capability.startswith(name)]
    assert len(found) == 1, name
    return found[0].state, found[0].detail


def doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **(env or {})},
    )


def test_nothing_configured_is_off_and_exits_zero(tmp_path):
    result = doctor(
        "--json", env={"VALOR_BWRAP_BIN": str(tmp_path / "no-bwrap"), "VALOR_SANDBOX": "off"}
    )
    assert result.returncode == 0, result.stdout
    report = json.loads(result.stdout)
    states = {item["capability"]: item["state"] for item in report["checks"]}
    assert report["ok"] is True and BROKEN not in states.values()
    assert states["Telegram bridge"] == OFF and states["Anthropic API (Claude Code runs)"] == OFF


def test_a_broken_configured_capability_exits_one(tmp_path):
    result = doctor(env={"VALOR_CLAUDE_BIN": "/bin/false"})
    assert result.returncode == 1
    line = next(x for x in result.stdout.splitlines() if "Claude Code CLI" in x)
    assert line.startswith("broken") and "exit code 1" in line


def test_anthropic_key_is_tried_against_the_configured_base_url(monkeypatch):
    with FakeAnthropic(required_api_key="sk-ant-good-key-123") as fake:
        configure(monkeypatch, ANTHROPIC_BASE_URL=fake.url, ANTHROPIC_API_KEY="sk-ant-good-key-123")
        assert check("Anthropic") == (OK, f"{fake.url} accepted ANTHROPIC_API_KEY")
        configure(monkeypatch, ANTHROPIC_API_KEY="sk-ant-wrong-key-456")
        state, detail = check("Anthropic")
        assert state == BROKEN and "refused ANTHROPIC_API_KEY (HTTP 401)" in detail
        assert "wrong-key" not in detail
        assert any(r.path == "/v1/models" for r in fake.requests_to(r"/v1/models", "GET"))
    state, detail = check("Anthropic")  # the fake is gone: nothing answers
    assert state == BROKEN and "cannot reach" in detail


def test_claude_code_version_is_read_from_the_cli():
    state, detail = check("Claude Code CLI")
    if get_settings().resolve_claude_bin() is None:
        pytest.skip("Claude Code CLI not installed")
    assert state == OK and "version 2." in detail


def test_daydream_model_must_be_served(monkeypatch, fake_openai: FakeOpenAI):
    configure(
        monkeypatch,
        VALOR_DAYDREAM_BASE_URL=f"{fake_openai.url}/v1",
        VALOR_DAYDREAM_MODEL="llama3.2",
    )
    assert check("daydream model")[0] == OK
    configure(monkeypatch, VALOR_DAYDREAM_MODEL="gemma3")
    state, detail = check("daydream model")
    assert state == BROKEN and "no model 'gemma3'" in detail and "llama3.2" in detail


def test_the_default_daydream_endpoint_absent_is_only_off(monkeypatch, tmp_path):

    dead = f"http://127.0.0.1:{free_port()}/v1"
    configure(monkeypatch, VALOR_DAYDREAM_BASE_URL=dead)
    assert check("daydream model")[0] == BROKEN  # configured: broken
    monkeypatch.delenv("VALOR_DAYDREAM_BASE_URL")
    configure(monkeypatch)
    # the default (Ollama on 11434) with nothing there is merely not configured
    state, _ = check("daydream model")
    assert state in (OFF, OK)


def test_openai_key_is_tried(monkeypatch):
    with FakeOpenAI(required_api_key="sk-good-openai-key") as fake:
        configure(
            monkeypatch, VALOR_OPENAI_BASE_URL=f"{fake.url}/v1", OPENAI_API_KEY="sk-good-openai-key"
        )
        assert check("images and vision")[0] == OK
        configure(monkeypatch, OPENAI_API_KEY="sk-bad-openai-key")
        assert check("images and vision")[0] == BROKEN


def test_the_transcription_endpoint_is_tried(monkeypatch):
    assert check("voice notes")[0] == OFF
    with FakeOpenAI(required_api_key="sk-good-openai-key") as fake:
        configure(
            monkeypatch,
            VALOR_TRANSCRIPTION_BASE_URL=f"{fake.url}/v1",
            VALOR_TRANSCRIPTION_API_KEY="sk-good-openai-key",
        )
        assert check("voice notes")[0] == OK
        configure(monkeypatch, VALOR_TRANSCRIPTION_API_KEY="sk-bad-openai-key")
        state, detail = check("voice notes")
        assert state == BROKEN and "refused the key" in detail and "sk-bad" not in detail
    dead = f"http://127.0.0.1:{free_port()}/v1"
    configure(monkeypatch, VALOR_TRANSCRIPTION_BASE_URL=dead)
    assert check("voice notes")[0] == BROKEN


def test_telegram_session_is_checked_offline(monkeypatch):
    session = StringSession()
    session.set_dc(2, "149.154.167.51", 443)
    session.auth_key = AuthKey(bytes(range(256)))
    good = session.save()
    configure(
        monkeypatch,
        TELEGRAM_API_ID="12345",
        TELEGRAM_API_HASH="0123456789abcdef" * 2,
        TELEGRAM_SESSION=good,
    )
    assert check("Telegram bridge") == (
        OK,
        "user session decodes (data centre and auth key; checked offline)",
    )
    configure(monkeypatch, TELEGRAM_SESSION=good[:40])  # truncated when pasted
    state, detail = check("Telegram bridge")
    assert state == BROKEN and "valor login" in detail and good[:20] not in detail
    monkeypatch.delenv("TELEGRAM_SESSION")
    configure(monkeypatch)
    assert check("Telegram bridge") == (
        BROKEN,
        "partly configured: TELEGRAM_SESSION or TELEGRAM_BOT_TOKEN missing",
    )
    configure(monkeypatch, TELEGRAM_BOT_TOKEN="123456:" + "A" * 35)
    assert check("Telegram bridge")[0] == OK


def test_store_integrity_and_permissions(valor_env: Path):
    assert check("store")[0] == OFF  # nothing created yet
    get_store()
    state, detail = check("store")
    assert state == OK and "quick_check ok" in detail
    os.chmod(valor_env / "valor.db", 0o644)
    state, detail = check("store")
    assert state == BROKEN and "mode 644" in detail
    os.chmod(valor_env / "valor.db", 0o600)
    from servers.core.store import close_all_stores

    close_all_stores()
    corrupt_a_page(valor_env / "valor.db")
    state, detail = check("store")
    assert state == BROKEN and ("quick_check" in detail or "cannot be read" in detail)


def corrupt_a_page(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("CREATE TABLE filler (x)")
        conn.executemany("INSERT INTO filler VALUES (?)", [("y" * 500,)] * 200)
    data = bytearray(db.read_bytes())
    page = 4096
    data[page * 3 : page * 3 + 200] = b"\xff" * 200  # garbage inside a b-tree page
    db.write_bytes(bytes(data))


def test_sandbox_is_started_for_real(monkeypatch, tmp_path):
    assert check("sandbox")[0] == OK  # bwrap is installed on this machine (`.ci/setup`)
    fake_bwrap = tmp_path / "bwrap"
    fake_bwrap.write_text(
        "#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n"
    )
    fake_bwrap.chmod(0o755)
    configure(monkeypatch, VALOR_BWRAP_BIN=str(fake_bwrap))
    state, detail = check("sandbox")
    assert state == BROKEN and "No permissions to create new namespace" in detail
    configure(monkeypatch, VALOR_SANDBOX="off")
    assert check("sandbox")[0] == OFF


def test_chromium_is_run(monkeypatch):
    configure(monkeypatch, VALOR_BROWSER_EXECUTABLE="/bin/false")
    assert check("screenshots")[0] == BROKEN
    configure(monkeypatch, VALOR_BROWSER_EXECUTABLE="/nonexistent/chromium")
    assert check("screenshots")[0] == BROKEN
