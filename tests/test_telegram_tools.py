"""telegram-tools through real MCP clients: in-memory, stdio (.mcp.json) and hosted HTTP."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from fastmcp import Client
from fastmcp.client.transports import StreamableHttpTransport

from servers.core import history
from servers.core.history import Message
from servers.core.mcp_config import endpoint
from servers.core.settings import REPO_ROOT
from servers.core.trust import mint_scope_token, new_secret
from servers.hosting import hosted
from servers.telegram import mcp
from tests.support import configure, texts

CHAT_A, CHAT_B = 1001, -100200


def seed(store, now=None):
    now = now or time.time()
    history.record_messages(
        store,
        [
            Message(CHAT_A, 1, "Deploy the billing service on Friday", "alice", 1, "in", now - 300),
            Message(
                CHAT_A, 2, "Done: billing deployed to staging", "Valor", None, "out", now - 200
            ),
            Message(CHAT_A, 3, "Привет, как дела с деплоем? 🚀", "борис", 2, "in", now - 100),
            Message(CHAT_B, 1, "secret plans for billing in chat B", "mallory", 3, "in", now - 50),
        ],
    )


async def test_search_ranks_and_snippets(store):
    seed(store)
    async with Client(mcp) as client:
        result = await client.call_tool(
            "search_conversation_history", {"query": "billing", "chat_id": CHAT_A}
        )
    hits = result.structured_content["hits"]
    assert {hit["message_id"] for hit in hits} == {1, 2}
    assert all(hit["chat_id"] == CHAT_A for hit in hits)
    assert all("[billing]" in hit["snippet"].lower() for hit in hits)
    assert hits[0]["score"] >= hits[1]["score"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ('"billing service"', {1}),
        ("deploy*", {1, 2}),
        ("billing NOT staging", {1}),
        ("(friday OR staging) AND billing", {1, 2}),
        ("деплоем", {3}),
        ("error: billing-service", set()),  # colon and hyphen are text, not FTS5 syntax
    ],
)
async def test_query_syntax_people_type(store, query, expected):
    seed(store)
    async with Client(mcp) as client:
        result = await client.call_tool(
            "search_conversation_history", {"query": query, "chat_id": CHAT_A}
        )
    assert {hit["message_id"] for hit in result.structured_content["hits"]} == expected


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ('"unterminated', "Unbalanced quote"),
        ("(billing", "never closed"),
        ("billing)", "has no '('"),
        ("AND OR", "no words"),
        ("billing AND", "could not be parsed"),
        ("b*", "at least 2 characters"),
    ],
)
async def test_malformed_search_is_a_clear_input_error(store, query, message):
    seed(store)
    async with Client(mcp) as client:
        result = await client.call_tool(
            "search_conversation_history",
            {"query": query, "chat_id": CHAT_A},
            raise_on_error=False,
        )
    assert result.is_error
    assert "[input]" in texts(result)
    assert message in texts(result)


async def test_empty_store(store):
    async with Client(mcp) as client:
        found = await client.call_tool(
            "search_conversation_history", {"query": "anything", "chat_id": CHAT_A}
        )
        recent = await client.call_tool("get_conversation_context", {"chat_id": CHAT_A})
    assert found.structured_content["hits"] == []
    assert recent.structured_content["message_count"] == 0
    assert recent.structured_content["context"] == ""


async def test_interactive_use_requires_chat_id(store):
    seed(store)
    async with Client(mcp) as client:
        result = await client.call_tool("get_conversation_context", {}, raise_on_error=False)
    assert result.is_error and "pass chat_id" in texts(result)


async def test_fixed_chat_cannot_be_widened(store, monkeypatch):
    seed(store)
    configure(monkeypatch, VALOR_CHAT_ID=str(CHAT_A))
    async with Client(mcp) as client:
        own = await client.call_tool("search_conversation_history", {"query": "billing"})
        other = await client.call_tool(
            "search_conversation_history",
            {"query": "billing", "chat_id": CHAT_B},
            raise_on_error=False,
        )
        forged = await client.call_tool(
            "search_conversation_history",
            {"query": 'billing) OR (chat_key:"c-100200"', "chat_id": str(CHAT_A)},
            raise_on_error=False,
        )
        recent = await client.call_tool("get_conversation_context", {"hours_back": 1})
    assert {hit["chat_id"] for hit in own.structured_content["hits"]} == {CHAT_A}
    assert other.is_error and "outside it" in texts(other)
    assert forged.is_error or all(
        hit["chat_id"] == CHAT_A for hit in forged.structured_content["hits"]
    )
    assert "mallory" not in recent.structured_content["context"]
    assert recent.structured_content["message_count"] == 3


async def test_context_is_ordered_and_bounded(store, monkeypatch):
    configure(monkeypatch, VALOR_HISTORY_MAX_CHARS="3000")
    now = time.time()
    history.record_messages(
        store,
        [
            Message(CHAT_A, i, f"message number {i} " + "x" * 500, "bob", 5, "in", now - 1000 + i)
            for i in range(1, 21)
        ]
        + [Message(CHAT_A, 99, "y" * 50_000, "bob", 5, "in", now)],
    )
    async with Client(mcp) as client:
        result = await client.call_tool(
            "get_conversation_context", {"chat_id": CHAT_A, "max_messages": 100}
        )
    data = result.structured_content
    assert len(data["context"]) <= 3000
    assert data["truncated"] is True
    lines = data["context"].splitlines()
    assert "more characters]" in lines[-1]  # the 50,000-character message, cut but present
    numbers = [int(line.split("message number ")[1].split()[0]) for line in lines[:-1]]
    assert numbers == sorted(numbers) and numbers[-1] == 20


def test_recording_is_idempotent(store):
    message = Message(CHAT_A, 7, "first version", "alice", 1, "in", time.time())
    assert history.record_message(store, message) is True
    assert history.record_message(store, message) is False
    edited = Message(CHAT_A, 7, "edited version", "alice", 1, "in", time.time())
    assert history.record_message(store, edited) is False
    rows = store.query("SELECT text FROM messages WHERE chat_id = ?", (CHAT_A,))
    assert [row["text"] for row in rows] == ["edited version"]
    assert history.search_history(store, "edited", CHAT_A)
    assert not history.search_history(store, "first", CHAT_A)


async def test_stdio_entry_answers_the_official_client(store, stdio_client_for):
    seed(store)
    async with stdio_client_for("telegram-tools") as session:
        listing = await session.list_tools()
        names = {tool.name for tool in listing.tools}
        result = await session.call_tool(
            "search_conversation_history", {"query": "billing", "chat_id": CHAT_A}
        )
    assert names == {"search_conversation_history", "get_conversation_context"}
    assert {hit["message_id"] for hit in result.structured_content["hits"]} == {1, 2}


async def test_hosted_http_checks_tokens_and_fixes_scope(store):
    seed(store)
    secret = new_secret()
    async with hosted(secret) as base_url:
        url = endpoint(base_url, "telegram-tools")
        token = mint_scope_token(secret, CHAT_A)
        transport = StreamableHttpTransport(url, headers={"Authorization": f"Bearer {token}"})
        async with Client(transport) as client:
            own = await client.call_tool("search_conversation_history", {"query": "billing"})
            other = await client.call_tool(
                "search_conversation_history",
                {"query": "billing", "chat_id": CHAT_B},
                raise_on_error=False,
            )
        forged = mint_scope_token(new_secret(), CHAT_B)
        for headers in ({}, {"Authorization": f"Bearer {forged}"}):
            with pytest.raises(Exception):  # noqa: B017 - refused before MCP, any client error
                async with Client(StreamableHttpTransport(url, headers=headers)) as client:
                    await client.list_tools()
    assert {hit["chat_id"] for hit in own.structured_content["hits"]} == {CHAT_A}
    assert other.is_error and "outside it" in texts(other)


def test_valor_tools_lists_the_server():
    completed = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "tools"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "telegram-tools" in completed.stdout
    assert "search_conversation_history" in completed.stdout
    assert "get_conversation_context" in completed.stdout


def test_bulk_ingest_is_indexed_and_restores_the_page_cache(store):
    (cache_before,) = store.connection().execute("PRAGMA cache_size").fetchone()
    batch = [Message(CHAT_A, i, f"bulk message {i} about topic{i % 7}") for i in range(1, 2501)]
    assert history.record_messages(store, batch) == 2500
    assert history.record_messages(store, batch) == 0  # redelivered: nothing new
    (cache_after,) = store.connection().execute("PRAGMA cache_size").fetchone()
    assert cache_after == cache_before
    hits = history.search_history(store, "topic3", CHAT_A, 500)
    assert len(hits) == len([m for m in batch if m.message_id % 7 == 3])
