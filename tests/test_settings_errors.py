"""Bad settings stop every entry point at start: one line per problem naming the variable, its
value's problem and the expected form, exit code 2 (the CLI, the daemon, a stdio server, the
bundle). And one .env rule for all of them: VALOR_ENV_FILE, else the repository's .env."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from servers.core import env_file
from servers.core.settings import REPO_ROOT, Settings, settings_problems, validate_settings

# (variable, bad value, words the line must carry): one per kind of setting.
BAD_VALUES = [
    ("VALOR_MAX_CONCURRENT_RUNS", "many", "expected a whole number (at least 1)"),  # int
    ("VALOR_MAX_CONCURRENT_RUNS", "0", "greater than or equal to 1"),  # int bound
    ("VALOR_OPENAI_TIMEOUT_SECONDS", "fast", "expected a number (more than 0)"),  # float
    ("VALOR_TELEGRAM_TYPING", "maybe", "expected true or false"),  # bool
    ("VALOR_ALLOWED_USER_IDS", "abc", "not valid JSON"),  # list of ints, not JSON
    ("VALOR_ALLOWED_USER_IDS", "123", "input should be a valid list"),  # list, a bare number
    ("VALOR_ALLOWED_USER_IDS", '[1, "x"]', "element [1]: input should be a valid integer"),
    ("VALOR_NOTION_WORKSPACES", "[1]", "expected a JSON object"),  # dict
    ("VALOR_SANDBOX", "docker", "expected one of bwrap, off"),  # Literal
    ("VALOR_LOG_LEVEL", "LOUD", "expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("TELEGRAM_API_ID", "abc", "expected a whole number"),  # a standard (aliased) name
]


def run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv,
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line(result: subprocess.CompletedProcess, variable: str, words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one problem, one line: no traceback
    assert lines[0].startswith(f"{variable}="), lines[0]
    assert words in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("variable", "value", "words"), BAD_VALUES)
def test_the_cli_names_each_bad_value_in_one_line(tmp_path, variable, value, words):
    result = run([sys.executable, "-m", "scheduler.cli", "doctor"], {variable: value}, tmp_path)
    assert_one_line(result, variable, words)


def test_every_problem_gets_its_line_and_the_log_level_is_any_case(tmp_path):
    env = {"VALOR_LOG_LEVEL": "debug", "VALOR_HTTP_PORT": "99999", "VALOR_SANDBOX": "none"}
    result = run([sys.executable, "-m", "scheduler.cli", "token", "list"], env, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert [line.split("=")[0] for line in lines] == ["VALOR_HTTP_PORT", "VALOR_SANDBOX"]
    assert "at most 65535" in lines[0]


def test_help_still_works_with_bad_settings(tmp_path):
    result = run(
        [sys.executable, "-m", "scheduler.cli", "doctor", "--help"],
        {"VALOR_LOG_LEVEL": "LOUD"},
        tmp_path,
    )
    assert result.returncode == 0 and "Usage" in result.stdout


def test_the_daemon_refuses_to_start(tmp_path):
    result = run(
        [sys.executable, "-m", "scheduler.cli", "daemon"], {"VALOR_PROMISE_WORKERS": "-1"}, tmp_path
    )
    assert_one_line(result, "VALOR_PROMISE_WORKERS", "at least 0")


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "servers.telegram"],  # as .mcp.json starts a server
        ["-m", "servers.bundle"],  # the one-process bundle
        ["-m", "scheduler.cli", "serve", "monitoring-tools"],
    ],
)
def test_a_stdio_server_refuses_to_start_rather_than_serve_internal_errors(tmp_path, argv):
    result = run([sys.executable, *argv], {"VALOR_ALLOWED_CHAT_IDS": "[1,,2]"}, tmp_path)
    assert_one_line(result, "VALOR_ALLOWED_CHAT_IDS", "not valid JSON")


def test_a_bad_value_in_the_env_file_says_which_file(tmp_path):
    dotenv = tmp_path / "valor.env"
    dotenv.write_text("VALOR_HEALTH_INTERVAL_SECONDS=soon\n")
    result = run(
        [sys.executable, "-m", "scheduler.cli", "doctor"], {"VALOR_ENV_FILE": str(dotenv)}, tmp_path
    )
    assert_one_line(result, "VALOR_HEALTH_INTERVAL_SECONDS", f"(in {dotenv})")


def test_a_secret_is_never_echoed(monkeypatch):
    """A secret setting's line names the variable and hides the value (from env or input)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value-123")
    with pytest.raises(ValidationError) as caught:
        Settings(openai_api_key=987654321)  # not text: the one way a secret can be invalid
    (line,) = settings_problems(caught.value)
    assert line.startswith("OPENAI_API_KEY=<hidden>:") and "expected a secret" in line
    assert "sk-secret" not in line and "987654321" not in line


def test_a_missing_env_file_is_a_problem(monkeypatch, tmp_path):
    monkeypatch.setenv("VALOR_ENV_FILE", str(tmp_path / "nope.env"))
    (problem,) = validate_settings()
    assert problem.startswith("VALOR_ENV_FILE=") and "no such file" in problem


# -- the one .env rule -----------------------------------------------------------------------------
def test_without_valor_env_file_the_repository_env_is_read(monkeypatch):
    monkeypatch.delenv("VALOR_ENV_FILE")
    assert env_file.env_file_path() == REPO_ROOT / ".env"
    monkeypatch.setenv("VALOR_ENV_FILE", "~/valor.env")
    assert env_file.env_file_path() == Path.home() / "valor.env"


def test_every_entry_point_reads_the_same_env_file_from_outside_the_repository(tmp_path):
    """Run from a folder outside the repository that holds a decoy .env: the CLI, a stdio
    server, the hooks and the stdio front all use VALOR_ENV_FILE's data directory."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    decoy = tmp_path / "decoy-data"
    (outside / ".env").write_text(f"VALOR_DATA_DIR={decoy}\nVALOR_LOG_LEVEL=LOUD\n")
    data = tmp_path / "chosen-data"
    dotenv = tmp_path / "chosen.env"
    dotenv.write_text(f"VALOR_DATA_DIR='{data}'\n")
    env = {"VALOR_ENV_FILE": str(dotenv)}
    env_without_data_dir = {k: v for k, v in os.environ.items() if k != "VALOR_DATA_DIR"}
    base = {**env_without_data_dir, **env}

    def run_here(argv: list[str], stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *argv],
            cwd=outside,
            env=base,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )

    cli = run_here(["-m", "scheduler.cli", "token", "list"])  # creates the store
    assert cli.returncode == 0, cli.stderr
    assert (data / "valor.db").exists()
    hook = run_hook_outside(run_here)
    assert hook.returncode == 0
    with sqlite3.connect(data / "valor.db") as conn:
        assert conn.execute("SELECT count(*) FROM tool_calls").fetchone()[0] == 1
    front = run_here(["-c", "from servers import stdio_front; print(stdio_front.data_dir())"])
    assert front.stdout.strip() == str(data)
    server = run_here(
        ["-c", "from servers.core.settings import get_settings as g; print(g().data_dir)"]
    )
    assert server.stdout.strip() == str(data)
    assert not decoy.exists()


def run_hook_outside(run_here) -> subprocess.CompletedProcess:
    payload = '{"session_id": "s", "tool_name": "mcp__monitoring-tools__system_health"}'
    return run_here(["-m", "servers.hooks", "post-tool-use"], payload)


def test_paths_expand_the_home_folder(monkeypatch):
    monkeypatch.setenv("VALOR_DATA_DIR", "~/valor-data")
    monkeypatch.setenv("VALOR_DAYDREAM_WORKSPACES", '["~/one", "/two"]')
    settings = Settings()
    assert settings.data_dir == Path.home() / "valor-data"
    assert settings.daydream_workspaces == [Path.home() / "one", Path("/two")]
