"""Helpers for the bridge and runner tests (see tests/fake_claude.py for the stand-in)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil

from tests.support.settings import configure

FAKE_CLAUDE = Path(__file__).resolve().parents[1] / "fake_claude.py"


def install_fake_claude(directory: Path, monkeypatch) -> Path:
    """An executable `claude` that runs tests/fake_claude.py; VALOR_CLAUDE_BIN points at it.

    That fake answers one `-p` prompt and exits, so warm (resident) sessions are off."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "claude"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_CLAUDE}" "$@"\n')
    script.chmod(0o755)
    configure(monkeypatch, VALOR_CLAUDE_BIN=str(script), VALOR_WARM_SESSIONS="off")
    return script


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()}
    env.update(extra)
    return env
