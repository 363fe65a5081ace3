"""Valor's version: one source, ``pyproject.toml``'s ``version``.

Installed (``pip install -e .`` included) it is read from the package metadata; from a source tree
that was never installed, from ``pyproject.toml`` itself. ``valor --version`` and every server's
``serverInfo.version`` (``servers.core.app.create_server``) show it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

DISTRIBUTION = "valor"
UNKNOWN = "0+unknown"
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@lru_cache(maxsize=1)
def valor_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return pyproject_version(PYPROJECT)


def pyproject_version(path: Path) -> str:
    """``[project] version`` of a pyproject file; ``0+unknown`` when it cannot be read."""
    import tomllib

    try:
        project = tomllib.loads(path.read_text(encoding="utf-8")).get("project", {})
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return UNKNOWN
    found = project.get("version") if isinstance(project, dict) else None
    return found if isinstance(found, str) and found else UNKNOWN
