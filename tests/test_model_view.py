"""What the model sees of Valor's tools, asserted on what the fake Anthropic API received from the
real Claude Code CLI: always-loaded tools are called without a ToolSearch request, deferred ones
are found by their search hint, and the loaded definitions stay within their token budget."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from fastmcp import Client

from bridge.memory import MemoryTransport, incoming
from bridge.pipeline import Bridge
from servers.bundle import BUNDLE_NAME, bundle
from servers.core import client_config, history, tokens
from servers.core.app import ALWAYS_LOAD_META, MAX_RESULT_META, SEARCH_HINT_META
from servers.core.history import Message
from tests.fakes import Text, ToolUse, call_tool, mcp_tool
from tests.fakes.anthropic_api import (
    TOOL_SEARCH,
    current_turn,
    last_tool_result,
    tool_names,
)
from tests.support import configure

OWNER = 1
CHAT = 4242
LOADED_TOOL_BUDGET = 4_000  # tokens of always-loaded definitions per request (issue 22)
# The tools a chat uses in most conversations: history, search, images, links.
ALWAYS_LOADED = {
    "search_conversation_history",
    "get_conversation_context",
    "search_current_info",
    "create_image",
    "analyze_shared_image",
    "save_link",
    "search_links",
}


def definition_tokens(definitions: list[dict]) -> int:
    """Tokens of tool definitions as the model receives them (name, description, schema)."""
    return sum(
        tokens.count(json.dumps({k: d[k] for k in ("name", "description", "input_schema")}))
        for d in definitions
    )


async def listed_tools() -> list:
    async with Client(bundle()) as client:
        return await client.list_tools()


async def test_every_tool_is_loaded_or_deferred_with_a_hint():
    listing = await listed_tools()
    loaded = {tool.name for tool in listing if tool.meta[ALWAYS_LOAD_META] is True}
    assert loaded == ALWAYS_LOADED
    for tool in listing:
        assert isinstance(tool.meta[ALWAYS_LOAD_META], bool), tool.name
        if tool.name not in ALWAYS_LOADED:
            hint = tool.meta[SEARCH_HINT_META]
            assert len(hint.split()) >= 3, tool.name  # words a person would ask with
        first_sentence = re.split(r"\.\s", tool.description or "")[0]
        assert 20 <= len(first_sentence) <= 200, tool.name
    declared = {tool.name: tool.meta.get(MAX_RESULT_META) for tool in listing}
    assert declared["get_conversation_context"] and declared["search_conversation_history"]


async def test_the_always_loaded_definitions_fit_the_budget():
    """Counted as Claude Code names them over the bridge (the longest prefix: per server)."""
    from servers import SERVERS, load_server

    definitions = []
    for server in SERVERS:
        async with Client(load_server(server)) as client:
            for tool in await client.list_tools():
                if tool.name in ALWAYS_LOADED:
                    definitions.append(
                        {
                            "name": mcp_tool(server, tool.name),
                            "description": tool.description,
                            "input_schema": tool.input_schema,
                        }
                    )
    assert len(definitions) == len(ALWAYS_LOADED)
    assert definition_tokens(definitions) <= LOADED_TOOL_BUDGET


@pytest.fixture
def real_claude(claude_bin, monkeypatch, tmp_path):
    configure(
        monkeypatch,
        VALOR_ALLOWED_USER_IDS=json.dumps([OWNER]),
        VALOR_CLAUDE_BIN=str(claude_bin),
        VALOR_CLAUDE_WORKDIR=str(tmp_path),  # no repo hooks: fast runs
        VALOR_CLAUDE_MAX_RETRIES="0",
        VALOR_WARM_SESSIONS="off",  # one `claude -p` per message: every request is this turn's
    )
    return claude_bin


async def ask_through_bridge(claude_env, text: str) -> str:
    transport = MemoryTransport()
    bridge = Bridge(transport, claude_env=claude_env)
    async with bridge.serving():
        assert await bridge.receive(incoming(CHAT, 2, text)) == "queued"
        await bridge.drain()
    (reply,) = transport.replies_to(CHAT, 2)
    return reply.text


def tool_uses(requests: list[dict]) -> list[str]:
    """Every tool the model called in the conversations the fake received."""
    return [
        block.get("name", "")
        for request in requests
        for message in request.get("messages") or []
        if isinstance(message.get("content"), list)
        for block in message["content"]
        if block.get("type") == "tool_use"
    ]


@pytest.mark.e2e
async def test_an_always_loaded_tool_takes_two_model_requests(
    store, real_claude, claude_env, fake_anthropic
):
    history.record_message(
        store, Message(CHAT, 1, "We ship the billing service on Friday", "alice", OWNER, "in")
    )
    tool = mcp_tool("telegram-tools", "search_conversation_history")
    fake_anthropic.responder = call_tool(tool, {"query": "billing"}, "Found: {result}")

    reply = await ask_through_bridge(claude_env, "When is billing shipping?")

    assert reply.startswith("Found: ") and "billing" in reply
    requests = fake_anthropic.main_requests
    assert len(requests) == 2  # the call, then the answer: no ToolSearch hop
    assert tool in tool_names(requests[0])  # its definition was there from the first request
    assert TOOL_SEARCH not in tool_uses(requests)
    assert tool_uses(requests) == [tool]
    loaded = [d for d in requests[0]["tools"] if d["name"].startswith("mcp__")]
    assert {d["name"].split("__")[-1] for d in loaded} == ALWAYS_LOADED
    assert definition_tokens(loaded) <= LOADED_TOOL_BUDGET


@pytest.mark.e2e
def test_the_stdio_bundle_config_loads_the_same_tools(
    claude_bin, claude_env, fake_anthropic, tmp_path
):
    """`valor mcp-config`'s default (the bundle behind its stdio front) applies the policy too."""
    config = client_config.build("claude-code", "stdio", client_config_servers())
    config_path = tmp_path / "valor.json"
    config_path.write_text(json.dumps(config))
    loaded_tool = mcp_tool(BUNDLE_NAME, "search_links")
    fake_anthropic.responder = call_tool(loaded_tool, {"query": "billing"}, "Links: {result}")
    completed = subprocess.run(
        [
            str(claude_bin),
            "-p",
            "which links about billing?",
            "--output-format",
            "json",
            "--strict-mcp-config",
            "--mcp-config",
            str(config_path),
            "--allowedTools",
            f"mcp__{BUNDLE_NAME}",
        ],
        env={**claude_env, "VALOR_DATA_DIR": os.environ["VALOR_DATA_DIR"]},
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    result = json.loads(completed.stdout)
    assert result["is_error"] is False, result
    assert result["result"].startswith("Links: ")
    requests = fake_anthropic.main_requests
    assert len(requests) == 2 and TOOL_SEARCH not in tool_uses(requests)
    names = {d["name"] for d in requests[0]["tools"]}
    assert {mcp_tool(BUNDLE_NAME, name) for name in ALWAYS_LOADED} <= names
    assert mcp_tool(BUNDLE_NAME, "list_promises") not in names


def client_config_servers() -> list[str]:
    from servers import SERVERS

    return list(SERVERS)


def search_then_call(tool: str, query: str):
    """A model that looks ``query`` up with ToolSearch, calls ``tool`` if the lookup found it,
    then answers with what came back."""

    def respond(request: dict) -> list:
        turn = current_turn(request)
        if not any(TOOL_SEARCH in tool_uses([{"messages": [m]}]) for m in turn):
            return [ToolUse(TOOL_SEARCH, {"query": query, "max_results": 5})]
        if tool in tool_uses([{"messages": turn}]):
            return [Text("Jobs: " + last_tool_result(request))]
        if tool in tool_references(turn):
            return [ToolUse(tool, {})]
        return [Text("not found")]

    return respond


def tool_references(messages: list[dict]) -> list[str]:
    """The tools ToolSearch returned (``tool_reference`` blocks in its results)."""
    return [
        reference.get("tool_name", "")
        for message in messages
        if isinstance(message.get("content"), list)
        for block in message["content"]
        if block.get("type") == "tool_result" and isinstance(block.get("content"), list)
        for reference in block["content"]
        if reference.get("type") == "tool_reference"
    ]


@pytest.mark.e2e
@pytest.mark.parametrize("with_hint", [True, False], ids=["hint", "control-without-hint"])
async def test_a_deferred_tool_is_found_by_its_search_hint(
    store, real_claude, claude_env, fake_anthropic, monkeypatch, with_hint
):
    from servers.promises import mcp as promise_tools

    tool = mcp_tool("promise-tools", "list_promises")
    component = await promise_tools.get_tool("list_promises")
    listed = component.to_mcp_tool()
    query = "queued"  # a word of the hint only: not in the tool's name, description or schema
    assert query in listed.meta[SEARCH_HINT_META]
    assert query not in json.dumps([listed.name, listed.description, listed.input_schema])
    if not with_hint:  # the control: the same lookup finds nothing without the hint
        meta = {k: v for k, v in component.meta.items() if k != SEARCH_HINT_META}
        monkeypatch.setattr(component, "meta", meta)
    fake_anthropic.responder = search_then_call(tool, query)

    reply = await ask_through_bridge(claude_env, "What background jobs are running?")

    requests = fake_anthropic.main_requests
    assert tool not in tool_names(requests[0])  # deferred: only its name at first
    if not with_hint:
        assert tool not in tool_references(requests[-1]["messages"])
        assert reply == "not found"
        return
    assert tool in tool_references(requests[-1]["messages"])  # the hint found it
    assert reply.startswith("Jobs: ") and json.loads(reply.removeprefix("Jobs: "))["promises"] == []
    assert len(requests) == 3  # the lookup, the call, the answer
