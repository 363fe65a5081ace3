"""`valor login`: everything but the conversation with Telegram's servers (bridge/login.py)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bridge import login
from scheduler.cli import app
from servers.core.errors import Category, ValorError
from servers.core.settings import get_settings
from tests.support import configure


def test_login_needs_api_id_and_hash():
    with pytest.raises(ValorError) as caught:
        login.check_login_settings(get_settings())
    assert caught.value.category is Category.CONFIG and "my.telegram.org" in str(caught.value)


def test_login_reads_api_id_and_hash(monkeypatch):
    configure(monkeypatch, TELEGRAM_API_ID="12345", TELEGRAM_API_HASH="abcdef0123456789")
    assert login.check_login_settings(get_settings()) == (12345, "abcdef0123456789")


def test_env_value_is_replaced_and_the_file_made_private(tmp_path: Path):
    env = tmp_path / ".env"
    env.write_text(
        "# comment\nOPENAI_API_KEY=sk-keep\n# TELEGRAM_SESSION=\nTELEGRAM_SESSION=old\n"
        "export TELEGRAM_SESSION=older\n"
    )
    env.chmod(0o644)
    login.write_env_value(env, "TELEGRAM_SESSION", "1NEWsession-_=")
    assert env.read_text() == (
        "# comment\nOPENAI_API_KEY=sk-keep\n# TELEGRAM_SESSION=\nTELEGRAM_SESSION=1NEWsession-_=\n"
    )
    assert stat.S_IMODE(env.stat().st_mode) == 0o600


def test_env_value_is_appended_to_a_new_file(tmp_path: Path):
    env = tmp_path / "fresh.env"
    login.write_env_value(env, "TELEGRAM_SESSION", "abc")
    assert env.read_text() == "TELEGRAM_SESSION=abc\n"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600


def test_env_value_refuses_what_would_break_the_file(tmp_path: Path):
    with pytest.raises(ValueError):
        login.write_env_value(tmp_path / ".env", "TELEGRAM_SESSION", "a\nB=c")
    with pytest.raises(ValueError):
        login.write_env_value(tmp_path / ".env", "bad key", "x")


def test_cli_login_without_credentials_says_what_to_set():
    result = CliRunner().invoke(app, ["login"])
    assert result.exit_code == 2
    assert "TELEGRAM_API_ID" in result.output


def test_cli_login_stores_the_session_without_printing_it(monkeypatch, tmp_path: Path):
    configure(monkeypatch, TELEGRAM_API_ID="12345", TELEGRAM_API_HASH="abcdef0123456789")
    asked = []

    async def network_login(api_id, api_hash, *, phone, code, password):
        # Stands in for Telegram's servers only: the prompts are the CLI's real ones.
        asked.extend([phone(), code()])
        return "1SECRETSESSION", "Ann Lee"

    monkeypatch.setattr(login, "create_session", network_login)
    env = tmp_path / ".env"
    result = CliRunner().invoke(app, ["login", "--env-file", str(env)], input="+15550100\n12345\n")
    assert result.exit_code == 0, result.output
    assert asked == ["+15550100", "12345"]
    assert "Logged in as Ann Lee" in result.output and "1SECRETSESSION" not in result.output
    assert env.read_text() == "TELEGRAM_SESSION=1SECRETSESSION\n"
