"""The commands in README.md and docs/ run as written: every shell line of a ```bash block that
needs no network, no credentials and does not run forever (SAFE below) runs from a fresh data
directory and a fresh home, with the repository's `.venv/bin/valor`."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from servers.core.settings import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
VALOR = ".venv/bin/valor"

# Commands that need nothing outside this machine and end by themselves (a prefix match on the
# command with `valor` written either way). Anything else (the daemon, chat, login, benchmarks,
# web fetches, bug reports) needs credentials, a network or runs until stopped.
SAFE = (
    "valor --help",
    "valor --version",
    "valor tools",
    "valor doctor",
    "valor mcp-config",
    "valor token create",
    "valor token list",
    "valor call system_health",
    "valor call cleanup_resources\n",  # the dry run only
    "valor call export_metrics",
    "valor call context_health",
    "valor call search_links",
    "valor call list_workspace_screenshots",
)
# Commands whose exit code says something about this machine, not the docs: doctor exits 1 when
# a configured capability is broken (e.g. no bubblewrap on a developer's machine).
MACHINE_DEPENDENT = ("valor doctor",)


def doc_commands() -> list[tuple[str, str]]:
    """(where, command) for every line of every ```bash block, comments removed."""
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
            for line in block.splitlines():
                command = strip_comment(line).strip()
                if command:
                    found.append((str(path.relative_to(REPO_ROOT)), command))
    return found


def strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # inside quotes stays)."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def normalized(command: str) -> str:
    return command.replace(VALOR, "valor") + "\n"


def is_safe(command: str) -> bool:
    return all(
        normalized(part.strip()).startswith(SAFE) for part in command.split("|") if part.strip()
    )


SAFE_COMMANDS = [(where, command) for where, command in doc_commands() if is_safe(command)]


def test_the_docs_show_safe_commands_to_run():
    assert len(SAFE_COMMANDS) >= 8, SAFE_COMMANDS


@pytest.mark.parametrize(("where", "command"), SAFE_COMMANDS, ids=[c for _, c in SAFE_COMMANDS])
def test_a_documented_command_runs_as_written(tmp_path, where, command):
    home = tmp_path / "home"
    home.mkdir()
    cwd = tmp_path / "work"
    cwd.mkdir()
    env = {**os.environ, "HOME": str(home), "VALOR_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run(
        ["bash", "-c", command.replace(VALOR, str(REPO_ROOT / VALOR))],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    allowed = {0, 1} if normalized(command).startswith(MACHINE_DEPENDENT) else {0}
    assert result.returncode in allowed, f"{where}: {command}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr


def test_the_readme_commands_exist_as_written():
    """The README's two commands cannot run here (setup installs, the daemon runs until
    stopped): their parts must exist and parse."""
    readme = [c for where, c in doc_commands() if where == "README.md"]
    assert readme[:2] == [
        "bash .ci/setup && .venv/bin/valor daemon",
        "bash .ci/setup --dev && .venv/bin/python -m pytest",
    ]
    setup = REPO_ROOT / ".ci" / "setup"
    assert subprocess.run(["bash", "-n", str(setup)], check=False).returncode == 0
    assert "--dev" in setup.read_text()
    daemon_help = subprocess.run(
        [str(REPO_ROOT / VALOR), "daemon", "--help"], capture_output=True, text=True, timeout=60
    )
    assert daemon_help.returncode == 0 and "Usage" in daemon_help.stdout


def test_a_comment_is_not_part_of_the_command():
    assert strip_comment("valor tools   # list them").strip() == "valor tools"
    assert strip_comment("""valor call x --args '{"a": "#1"}'  # c""").strip() == (
        """valor call x --args '{"a": "#1"}'"""
    )
    assert Path(VALOR).name == "valor"
