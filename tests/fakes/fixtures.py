"""Pytest plugin: `pytest_plugins = ["tests.fakes.fixtures"]` in the top conftest."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from .anthropic_api import FakeAnthropic
from .base import FakeService
from .notion_api import FakeNotion
from .openai_api import FakeOpenAI

REPO_ROOT = Path(__file__).resolve().parents[2]
CLAUDE_BIN = REPO_ROOT / "node_modules" / ".bin" / "claude"
FakeServiceT = TypeVar("FakeServiceT", bound=FakeService)


def _serve(fake: FakeServiceT) -> Iterator[FakeServiceT]:
    with fake:
        yield fake
    if fake.errors:  # a crashing responder shows up as its own traceback, not as a vague 500
        raise fake.errors[0]


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    yield from _serve(FakeOpenAI())


@pytest.fixture
def fake_notion() -> Iterator[FakeNotion]:
    yield from _serve(FakeNotion())


@pytest.fixture
def fake_anthropic() -> Iterator[FakeAnthropic]:
    yield from _serve(FakeAnthropic())


@pytest.fixture
def claude_bin() -> Path:
    if not os.access(CLAUDE_BIN, os.X_OK):
        pytest.skip("Claude Code CLI not installed (run `npm ci` in the repo root)")
    return CLAUDE_BIN


@pytest.fixture
def claude_env(fake_anthropic: FakeAnthropic, tmp_path: Path) -> dict[str, str]:
    """Environment for running `claude -p` against `fake_anthropic` with an isolated ~/.claude."""
    home = tmp_path / "home"
    home.mkdir()
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": fake_anthropic.url,
        "ANTHROPIC_API_KEY": "test-key",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_RETRIES": "0",  # otherwise a failing fake is retried for minutes
        "DISABLE_AUTOUPDATER": "1",
        "API_TIMEOUT_MS": "20000",  # a hung fake fails the run instead of the 10-minute default
    }
