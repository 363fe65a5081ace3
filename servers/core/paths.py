"""Default locations, importable without pydantic (hooks run on every prompt and must be quick)."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "valor"


def data_dir_from_env() -> Path:
    """What Settings.data_dir resolves to when only the environment is consulted."""
    configured = os.environ.get("VALOR_DATA_DIR")
    return Path(configured).expanduser() if configured else default_data_dir()
