"""What the model sees of Valor's tools, and what a tool use costs in model requests.

Part 1 — per tool: loaded (its definition in every request) or deferred (behind Claude Code's
ToolSearch, found by its search hint); its definition's tokens as the model receives it (name as
Claude Code forms it over the bridge's hosted config, description, input schema; counted exactly
with the project's tokenizer, servers/core/tokens.py); the declared maximum result size; and a
typical result's tokens (the structured content Claude Code forwards, from a call on seeded data;
"-" for tools that need a network service). Then the total always-loaded definition tokens per
request, against the budget of 4,000.

Part 2 — the real Claude Code CLI against the fake Anthropic API (tests/fakes), through the bridge
with the tools hosted over HTTP: model requests and wall time of a tool's first use in a session,
for an always-loaded tool (search_conversation_history) and a deferred one (list_promises),
alternated; and the always-loaded definition tokens in the first request the fake received.

    .venv/bin/python bench/model_view.py               # 5 rounds
    .venv/bin/python bench/model_view.py --rounds 9
    .venv/bin/python bench/model_view.py --static      # part 1 only (no CLI)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import CLAUDE, claude_env  # noqa: E402

BUDGET = 4_000
CHAT = 4242
LOADED_TOOL = ("telegram-tools", "search_conversation_history", {"query": "billing"})
DEFERRED_TOOL = ("promise-tools", "list_promises", {})


def isolated_env(data_dir: Path, **extra: str) -> None:
    """Fresh settings for this process: its own data dir, nothing from the developer's env."""
    for name in list(os.environ):
        if name.startswith(("VALOR_", "ANTHROPIC_", "TELEGRAM_", "OPENAI_", "NOTION_")):
            del os.environ[name]
    os.environ["VALOR_DATA_DIR"] = str(data_dir)
    os.environ["VALOR_ENV_FILE"] = str(data_dir.parent / "empty.env")
    (data_dir.parent / "empty.env").touch()
    os.environ.update(extra)
    from servers.core.settings import reset_settings_cache

    reset_settings_cache()


def definition(server: str, tool) -> dict:
    """A tool as the model receives it from Claude Code."""
    return {
        "name": f"mcp__{server}__{tool.name}",
        "description": tool.description or "",
        "input_schema": tool.input_schema,
    }


def tokens_of(value) -> int:
    from servers.core import tokens

    return tokens.count(value if isinstance(value, str) else json.dumps(value))


def seed() -> None:
    """What a typical chat has: 300 messages over two weeks (a few about billing), saved links,
    promises, screenshots and a day of tool calls."""
    from servers.core import history, links, promises, screenshots
    from servers.core.history import Message
    from servers.core.settings import get_settings
    from servers.core.store import get_store

    store = get_store()
    now = time.time()
    topics = ["billing service", "deploy", "lunch", "the flaky test", "Friday's demo", "invoices"]
    history.record_messages(
        store,
        [
            Message(
                CHAT,
                n,
                f"Message {n} about {topics[n % len(topics)]}: we should look at it again soon.",
                "alice" if n % 2 else "valor",
                1 if n % 2 else None,
                "in" if n % 2 else "out",
                now - (300 - n) * 4000,
            )
            for n in range(1, 301)
        ],
    )
    for n, topic in enumerate(topics):
        url = f"https://example.com/{n}"
        summary = f"Notes on the {topic} for the release: what changed and what is left."
        links._upsert(store, url, url, None, f"The {topic}", summary, [topic], "extractive", "")
    for topic in topics[:4]:
        promises.create_promise(store, None, f"Look into the {topic}", "research", None)
    shots = screenshots.chat_screenshots_folder(get_settings(), None) / "release"
    shots.mkdir(mode=0o700)
    for n in range(3):
        (shots / f"page-{n}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40_000 * (n + 1)))
    with store.transaction() as conn:
        conn.executemany(
            "INSERT INTO tool_calls (server, tool, success, duration_ms, called_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [
                ("telegram-tools", "search_conversation_history", n % 9 != 0, 30.0 + n, now - n)
                for n in range(60)
            ],
        )


CONVERSATION = [
    {"role": "user" if n % 2 else "assistant", "content": f"Turn {n}: notes on the release. " * 8}
    for n in range(1, 41)
]

# Typical arguments per tool that runs on local data alone.
TYPICAL = {
    "search_conversation_history": {"query": "billing", "chat_id": CHAT},
    "get_conversation_context": {"chat_id": CHAT},
    "search_links": {"query": "release"},
    "list_notion_workspaces": {},
    "daydream_history": {},
    "list_promises": {},
    "promise_status": {"promise_id": 1},
    "system_health": {},
    "cleanup_resources": {"dry_run": True},
    "export_metrics": {},
    "optimize_context": {"messages": CONVERSATION, "max_tokens": 800},
    "context_health": {"messages": CONVERSATION, "max_tokens": 800},
    "build_context_block": {"messages": CONVERSATION[-6:], "chat_id": CHAT},
    "list_workspace_screenshots": {},
}


async def static_view() -> None:
    from fastmcp import Client

    from servers import SERVERS, load_server
    from servers.core.app import ALWAYS_LOAD_META, MAX_RESULT_META, SEARCH_HINT_META

    seed()
    rows, loaded_total, deferred_total = [], 0, 0
    for server in SERVERS:
        async with Client(load_server(server)) as client:
            for tool in await client.list_tools():
                meta = tool.meta or {}
                loaded = meta.get(ALWAYS_LOAD_META) is True
                size = tokens_of(definition(server, tool))
                if loaded:
                    loaded_total += size
                else:
                    deferred_total += size
                result = "-"
                if tool.name in TYPICAL:
                    answer = await client.call_tool(
                        tool.name, TYPICAL[tool.name], raise_on_error=False
                    )
                    forwarded = answer.structured_content
                    if answer.is_error:
                        result = "error"
                    elif forwarded is not None:
                        result = str(tokens_of(forwarded))
                    else:
                        result = str(
                            tokens_of(" ".join(getattr(b, "text", "") for b in answer.content))
                        )
                cap = meta.get(MAX_RESULT_META)
                rows.append(
                    (
                        tool.name,
                        "loaded" if loaded else "deferred",
                        size,
                        result,
                        f"{cap:,}" if cap else "100,000*",
                        meta.get(SEARCH_HINT_META, ""),
                    )
                )
    print(
        f"{'tool':36} {'mode':8} {'def tok':>7} {'result tok':>10} {'max chars':>10}  search hint"
    )
    for name, mode, size, result, cap, hint in rows:
        print(f"{name:36} {mode:8} {size:7} {result:>10} {cap:>10}  {hint}")
    print("(* Claude Code's default for MCP tools; a larger result is saved to a file)")
    loaded = sum(1 for row in rows if row[1] == "loaded")
    verdict = "within" if loaded_total <= BUDGET else "OVER"
    print(
        f"always-loaded: {loaded} tools, {loaded_total:,} definition tokens per request "
        f"({verdict} the {BUDGET:,} budget); deferred: {len(rows) - loaded} tools, "
        f"{deferred_total:,} tokens only when looked up"
    )


async def model_requests(rounds: int, work: Path) -> None:
    from bridge.memory import MemoryTransport, incoming
    from bridge.pipeline import Bridge
    from tests.fakes import FakeAnthropic, call_tool, mcp_tool

    with FakeAnthropic() as fake:
        home = work / "home"
        home.mkdir()
        env = claude_env(fake.url, home, CLAUDE_CODE_MAX_RETRIES="0")
        env["VALOR_DATA_DIR"] = os.environ["VALOR_DATA_DIR"]
        os.environ.update(
            VALOR_CLAUDE_BIN=str(CLAUDE),
            VALOR_CLAUDE_MAX_RETRIES="0",
            VALOR_CLAUDE_WORKDIR=str(work),  # no repo hooks: the tool use alone
            VALOR_WARM_SESSIONS="off",
        )
        from servers.core.settings import reset_settings_cache

        reset_settings_cache()
        transport = MemoryTransport()
        bridge = Bridge(transport, claude_env=env, authorize_all=True)
        results: dict[str, dict[str, list]] = {}
        first_request_tokens: list[int] = []
        message_id = 0
        async with bridge.serving():
            for _ in range(rounds):
                for label, (server, tool, arguments) in (
                    ("loaded", LOADED_TOOL),
                    ("deferred", DEFERRED_TOOL),
                ):
                    name = mcp_tool(server, tool)
                    fake.responder = call_tool(name, arguments, "Result: {result}")
                    before = len(fake.main_requests)
                    message_id += 1
                    started = time.perf_counter()
                    # A chat of its own per use: a new session, as a chat's first use of a tool
                    # (a resumed session keeps the tools ToolSearch loaded earlier).
                    chat = CHAT + message_id
                    await bridge.receive(incoming(chat, message_id, f"use {tool}"))
                    await bridge.drain()
                    elapsed = time.perf_counter() - started
                    (reply,) = transport.replies_to(chat, message_id)
                    assert reply.text.startswith("Result: "), reply.text
                    requests = fake.main_requests[before:]
                    entry = results.setdefault(f"{label} {tool}", {"requests": [], "seconds": []})
                    entry["requests"].append(len(requests))
                    entry["seconds"].append(elapsed)
                    if label == "loaded":
                        loaded = [d for d in requests[0]["tools"] if d["name"].startswith("mcp__")]
                        first_request_tokens.append(
                            sum(
                                tokens_of(
                                    {k: d[k] for k in ("name", "description", "input_schema")}
                                )
                                for d in loaded
                            )
                        )
    print(f"\nthe real CLI through the bridge, {rounds} uses each, alternated:")
    for label, entry in results.items():
        print(
            f"  {label:42} model requests {statistics.median(entry['requests']):.0f}"
            f"   median {statistics.median(entry['seconds']) * 1000:7.0f} ms per message"
        )
    print(
        "  always-loaded definitions in the first request the fake received: "
        f"{statistics.median(first_request_tokens):,.0f} tokens"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--static", action="store_true", help="part 1 only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        isolated_env(work / "data")
        asyncio.run(static_view())
        if not args.static:
            asyncio.run(model_requests(args.rounds, work))


if __name__ == "__main__":
    main()
