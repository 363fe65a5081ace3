"""Helpers for the development-tools tests: settings for the fakes and screenshot files."""

from __future__ import annotations

import base64
import os
import re
import sys
import time
from pathlib import Path

from tests.fakes.anthropic_api import ToolUse, turn_text
from tests.fakes.openai_api import FakeOpenAI
from tests.support.settings import configure


def use_vision_fake(monkeypatch, fake: FakeOpenAI) -> None:
    configure(
        monkeypatch,
        OPENAI_API_KEY="sk-test-openai-key-000",
        VALOR_OPENAI_BASE_URL=f"{fake.url}/v1",
        VALOR_OPENAI_MAX_RETRIES="0",
    )


def use_claude(monkeypatch, claude_bin: Path, claude_env: dict[str, str], workdir: Path) -> None:
    """Runs started inside the server (which builds its own ClaudeRun) reach the fake Anthropic
    API through the environment and settings, as in production."""
    workdir.mkdir(parents=True, exist_ok=True)
    configure(
        monkeypatch,
        **claude_env,
        VALOR_CLAUDE_BIN=str(claude_bin),
        VALOR_CLAUDE_WORKDIR=str(workdir),
        VALOR_CLAUDE_MAX_RETRIES="0",
    )


def write_screenshot(base: Path, task_id: str, name: str, data: bytes, age_seconds: float) -> Path:
    folder = base / task_id
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    moment = time.time() - age_seconds
    os.utime(path, (moment, moment))
    return path


def prompt_screenshot_path(request: dict) -> str:
    """The file path the bug-report prompt tells Claude Code to save its screenshot as."""
    found = re.search(r'page\.screenshot\(path="([^"]+)"\)', turn_text(request))
    assert found, "the prompt names no screenshot path"
    return found.group(1)


def bash_writing_png(data: bytes):
    """A script step: a Bash tool call that writes ``data`` where the prompt says to."""

    def step(request: dict) -> ToolUse:
        target = prompt_screenshot_path(request)
        encoded = base64.b64encode(data).decode()
        code = f"import base64; open({target!r}, 'wb').write(base64.b64decode({encoded!r}))"
        return ToolUse("Bash", {"command": f'{sys.executable} -c "{code}"'})

    return step
