"""Settings from the environment, as a test sets them."""

from __future__ import annotations

import pytest

from servers.core.settings import reset_settings_cache


def configure(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    """Set environment variables for this test and make the next ``get_settings()`` read them."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    reset_settings_cache()
