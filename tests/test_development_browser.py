"""A real browser: Playwright drives Debian's Chromium (no browser download) to screenshot a page
served on 127.0.0.1 into the screenshots folder, and development-tools finds and analyzes it —
directly, and inside the bug-report workflow where the real Claude Code CLI runs the capture."""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastmcp import Client

from servers.development import mcp
from tests.fakes.anthropic_api import Script, ToolUse, turn_text
from tests.support.development import use_claude, use_vision_fake

PAGE = b"""<!doctype html><html><head><title>Login</title></head>
<body style="margin:0;background:#c00;color:#fff">
<h1>Traceback: KeyError 'email'</h1></body></html>"""

pytestmark = [
    pytest.mark.e2e,  # a real browser (and, in one test, the real Claude Code CLI)
    pytest.mark.skipif(
        not (shutil.which("chromium") or shutil.which("chromium-browser")),
        reason="Debian's chromium is not installed (bash .ci/setup --dev installs it with apt)",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="the playwright package is not installed (pip install -e '.[dev]')",
    ),
]


@pytest.fixture
def local_page() -> Iterator[tuple[str, list[str]]]:
    """A page on 127.0.0.1; yields its URL and the paths browsers requested."""
    requested: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            body = PAGE if self.path in ("/", "/login") else b"not found"
            self.send_response(200 if body is PAGE else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/login", requested
    finally:
        server.shutdown()
        server.server_close()


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return struct.unpack(">II", data[16:24])


def capture_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "servers.core.browser_capture", *args],
        capture_output=True,
        text=True,
        timeout=90,
    )


async def test_playwright_screenshot_of_a_local_page_is_found_by_the_tool(
    monkeypatch, fake_openai, local_page, valor_env
):
    url, requested = local_page
    use_vision_fake(monkeypatch, fake_openai)
    fake_openai.chat_reply = "A red page showing 'Traceback: KeyError email'."

    done = capture_cli(url, "--task-id", "ui-check", "--label", "login", "--width", "640",
                       "--height", "360")  # fmt: skip
    assert done.returncode == 0, done.stderr
    saved = done.stdout.strip()
    operator_shots = valor_env / "screenshots" / "chats" / "operator"  # no VALOR_CHAT_ID
    assert saved.startswith(str(operator_shots / "ui-check")) and saved.endswith("-login.png")
    assert "/login" in requested  # the browser really loaded the local page

    async with Client(mcp) as client:
        found = await client.call_tool("retrieve_workspace_screenshot", {"task_id": "ui-check"})
    result = found.structured_content
    assert result["path"] == saved and result["age_seconds"] < 60
    assert result["analysis"] == fake_openai.chat_reply
    with open(saved, "rb") as handle:
        data = handle.read()
    assert png_size(data) == (640, 360)
    sent = fake_openai.chat_requests[0]["messages"][-1]["content"][1]["image_url"]["url"]
    assert base64.b64decode(sent.split(",", 1)[1]) == data


def test_capture_refuses_bad_task_ids_and_reports_unreachable_pages(valor_env):
    bad = capture_cli("http://127.0.0.1:9/", "--task-id", "../escape")
    assert bad.returncode == 1 and "not a valid task id" in bad.stderr
    down = capture_cli("http://127.0.0.1:9/", "--task-id", "down", "--label", "x")
    assert down.returncode == 1 and "[upstream_api]" in down.stderr
    assert not list((valor_env / "screenshots").glob("down/*.png"))


async def test_bug_report_where_claude_code_captures_the_page_with_the_helper(
    monkeypatch, claude_bin, claude_env, fake_anthropic, fake_openai, local_page, tmp_path
):
    url, requested = local_page
    use_claude(monkeypatch, claude_bin, claude_env, tmp_path / "work")
    use_vision_fake(monkeypatch, fake_openai)
    fake_openai.chat_reply = "A stack trace: KeyError 'email'."

    def run_the_helper(request: dict) -> ToolUse:
        # The command exactly as the prompt gives it, with the placeholders filled in.
        line = next(
            line.strip()
            for line in turn_text(request).splitlines()
            if "-m servers.core.browser_capture" in line
        )
        command = line.replace("<URL>", url).replace("<short-label>", "login-error")
        return ToolUse("Bash", {"command": command, "timeout": 90_000})

    findings = {"steps": ["Open /login"], "observed": "KeyError", "expected": "A login form"}
    fake_anthropic.responder = Script([run_the_helper, json.dumps(findings)])
    async with Client(mcp) as client:
        result = await client.call_tool(
            "execute_bug_report_with_screenshot",
            {"task_description": "Login page crashes", "notion_task_id": "BUG-1"},
        )
    report = result.structured_content
    assert report["status"] == "complete", report["notes"]
    assert report["screenshot_path"].endswith("-login-error.png")
    assert "/BUG-1/" in report["screenshot_path"] and "/login" in requested
    with open(report["screenshot_path"], "rb") as handle:
        assert png_size(handle.read()) == (1280, 800)
    assert report["analysis"] == fake_openai.chat_reply and report["steps"] == ["Open /login"]
