"""The Telegram reply path end to end: the pipeline runs the real Claude Code (fake Anthropic
API), which calls create_image over the hosted HTTP tools (fake OpenAI images API); LiveReply,
the Telegram transport's reply factory, sends the answer and uploads the new image."""

from __future__ import annotations

import asyncio
import json

import pytest

from bridge.live import live_reply_factory
from bridge.memory import MemoryTransport, incoming
from bridge.pipeline import Bridge
from bridge.rate import Limits, RateController
from servers.core.settings import get_settings
from tests.fakes import call_tool, mcp_tool
from tests.support import configure

pytestmark = pytest.mark.e2e  # the real Claude Code CLI

OWNER, CHAT = 1, 4242


async def test_image_made_during_the_run_is_uploaded_with_the_answer(
    store, claude_bin, claude_env, fake_anthropic, fake_openai, monkeypatch
):
    configure(
        monkeypatch,
        VALOR_ALLOWED_USER_IDS=json.dumps([OWNER]),
        VALOR_CLAUDE_BIN=str(claude_bin),
        VALOR_CLAUDE_MAX_RETRIES="0",
        OPENAI_API_KEY="sk-test-openai-key",
        VALOR_OPENAI_BASE_URL=f"{fake_openai.url}/v1",
    )
    fake_anthropic.responder = call_tool(
        mcp_tool("social-tools", "create_image"), {"prompt": "a red square"}, "Here is **it**."
    )
    transport = MemoryTransport()
    factory = live_reply_factory(RateController(Limits(time_scale=0.05)))
    bridge = Bridge(transport, claude_env=claude_env, reply_factory=factory)
    async with bridge.serving():
        assert await bridge.receive(incoming(CHAT, 2, "draw a red square")) == "queued"
        await asyncio.wait_for(bridge.drain(), 90)
    texts = [m for m in transport.messages_in(CHAT) if m.file is None]
    files = [m for m in transport.messages_in(CHAT) if m.file is not None]
    assert texts[-1].text == "Here is it."  # Markdown rendered for Telegram
    assert len(files) == 1 and files[0].reply_to == 2
    media = get_settings().media_path.resolve()
    assert files[0].file.is_relative_to(media) and files[0].file.read_bytes()[:4] == b"\x89PNG"
    row = store.query("SELECT status FROM bridge_inbox")[0]
    assert row["status"] == "done"
