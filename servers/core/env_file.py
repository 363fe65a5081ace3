"""Where Valor's ``.env`` is: one rule for every entry point, importable without pydantic.

The rule: ``VALOR_ENV_FILE`` from the process environment when set, else the repository's
``.env`` (beside ``pyproject.toml``). Never the current directory's: the CLI, the daemon, a
server started by an MCP client in its own working directory, the stdio front and the Claude Code
hooks (run in whatever project Claude Code works in) then all read the same file, and a ``.env``
in a workdir the model edits cannot redirect Valor's store or keys.

Settings (``servers.core.settings``) read the file with pydantic-settings; the hooks and the stdio
front, which must start quickly, read single values with ``dotenv_value`` (the same ``KEY=value``
lines, quotes stripped).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_FILE_VARIABLE = "VALOR_ENV_FILE"
REPO_ROOT = Path(__file__).resolve().parents[2]


def env_file_path() -> Path:
    """The ``.env`` every Valor process reads (it may not exist: then there is none)."""
    configured = os.environ.get(ENV_FILE_VARIABLE)
    if configured:
        return Path(os.path.expanduser(configured))
    return REPO_ROOT / ".env"


def dotenv_value(name: str) -> str | None:
    """``name``'s value in the ``.env`` file, as Settings reads it; None when absent or empty."""
    try:
        with open(env_file_path(), encoding="utf-8") as handle:
            for line in handle:
                key, sep, value = line.strip().partition("=")
                if sep and key.strip().removeprefix("export ").strip() == name:
                    return value.strip().strip("'\"") or None
    except OSError:
        return None
    return None


def setting(name: str) -> str | None:
    """A setting from the environment, else the ``.env`` file (the environment wins, as in
    Settings)."""
    return os.environ.get(name) or dotenv_value(name)
