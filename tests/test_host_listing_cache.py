"""The host's listing cache: the listings Claude Code asks for at every connect are answered from
memory, identical to FastMCP's own answer for the same principal, while authentication still runs
on every request and a change of a server's tools shows at once. Real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from servers import hosting
from servers.core import tokens_issued
from servers.core.mcp_config import endpoint
from servers.core.principals import OPERATOR, chat_principal
from servers.core.settings import get_settings
from servers.core.store import get_store
from servers.core.trust import mint_scope_token, mint_token, new_secret

CHAT = 4242
PROTOCOL = "2026-07-28"
META = {
    "io.modelcontextprotocol/protocolVersion": PROTOCOL,
    "io.modelcontextprotocol/clientInfo": {"name": "listing-test", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}
LISTINGS = ("server/discover", "tools/list", "prompts/list", "resources/list")


@asynccontextmanager
async def host(monkeypatch, secret: bytes) -> AsyncIterator[tuple[str, hosting.ListingCache]]:
    """A real host on loopback, and the listing cache inside it."""
    built: list = []
    real_build = hosting.build_app

    def build_and_keep(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(hosting, "build_app", build_and_keep)
    async with hosting.hosted(secret) as base_url:
        yield base_url, built[0].listings


async def ask(
    http: httpx.AsyncClient,
    base_url: str,
    server: str,
    method: str,
    token: str | None,
    request_id: int | str = 1,
    **headers: str,
) -> httpx.Response:
    """One request as Claude Code (protocol 2026-07-28, stateless) sends it."""
    sent = {
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        "mcp-method": method,
        "mcp-protocol-version": PROTOCOL,
        **headers,
    }
    if token is not None:
        sent["authorization"] = f"Bearer {token}"
    body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": {"_meta": META}}
    return await http.post(endpoint(base_url, server), content=json.dumps(body), headers=sent)


def tool_names(reply: httpx.Response) -> set[str]:
    assert reply.status_code == 200, reply.text
    return {tool["name"] for tool in reply.json()["result"]["tools"]}


async def test_a_cached_answer_is_byte_for_byte_fastmcps_own_under_the_new_id(monkeypatch):
    secret = new_secret()
    token = mint_scope_token(secret, None)
    async with host(monkeypatch, secret) as (base_url, cache), httpx.AsyncClient() as http:
        for server in ("telegram-tools", "social-tools", "monitoring-tools"):
            for method in LISTINGS:
                misses = cache.misses
                fresh = await ask(http, base_url, server, method, token, request_id=7)
                assert cache.misses == misses + 1  # FastMCP answered this one
                hits = cache.hits
                cached = await ask(http, base_url, server, method, token, request_id="again-8")
                assert cache.hits == hits + 1, (server, method)  # and the cache this one
                assert fresh.status_code == cached.status_code == 200
                assert cached.headers["content-type"] == fresh.headers["content-type"]
                assert cached.content == fresh.content.replace(b'"id":7,', b'"id":"again-8",', 1), (
                    server,
                    method,
                )
                assert int(cached.headers["content-length"]) == len(cached.content)


async def test_operator_and_chat_tokens_each_get_their_own_listing(monkeypatch):
    secret = new_secret()
    operator = mint_scope_token(secret, None)
    chat = mint_scope_token(secret, CHAT)
    other_chat = mint_scope_token(secret, CHAT + 1)
    async with host(monkeypatch, secret) as (base_url, cache), httpx.AsyncClient() as http:
        # the operator's listing first: cached, it must not reach the chat
        operator_first = tool_names(
            await ask(http, base_url, "monitoring-tools", "tools/list", operator)
        )
        chat_tools = tool_names(await ask(http, base_url, "monitoring-tools", "tools/list", chat))
        chat_again = tool_names(await ask(http, base_url, "monitoring-tools", "tools/list", chat))
        other = tool_names(await ask(http, base_url, "monitoring-tools", "tools/list", other_chat))
        operator_again = tool_names(
            await ask(http, base_url, "monitoring-tools", "tools/list", operator)
        )
    assert operator_first and operator_first == operator_again  # every tool is operator-only
    assert chat_tools == chat_again == other == set()
    assert cache.hits >= 2


async def test_a_revoked_token_is_refused_at_once_though_its_listing_is_cached(monkeypatch):
    secret = new_secret()
    store = get_store(get_settings().db_path)
    token, issued = tokens_issued.issue_token(store, secret, chat_principal(CHAT), 3600)
    async with host(monkeypatch, secret) as (base_url, cache), httpx.AsyncClient() as http:
        before = tool_names(await ask(http, base_url, "telegram-tools", "tools/list", token))
        hits = cache.hits
        assert (
            tool_names(await ask(http, base_url, "telegram-tools", "tools/list", token)) == before
        )
        assert cache.hits == hits + 1  # the listing is served from the cache now
        tokens_issued.revoke_token(store, issued.id)
        refused = await ask(http, base_url, "telegram-tools", "tools/list", token)
    assert refused.status_code == 401
    assert 'error_description="revoked"' in refused.headers["www-authenticate"]
    assert cache.hits == hits + 1


async def test_a_bad_token_is_never_answered_from_the_cache(monkeypatch):
    secret = new_secret()
    good = mint_scope_token(secret, None)
    bad = {
        "none": None,
        "tampered": good[:-2] + ("00" if not good.endswith("00") else "11"),
        "foreign secret": mint_scope_token(new_secret(), None),
        "expired": mint_token(secret, OPERATOR, -5)[0],
        "garbage": "v2.garbage.abc",
    }
    async with host(monkeypatch, secret) as (base_url, cache), httpx.AsyncClient() as http:
        for method in LISTINGS:  # every listing cached for the operator
            await ask(http, base_url, "daydream-tools", method, good)
            await ask(http, base_url, "daydream-tools", method, good)
        hits = cache.hits
        for name, token in bad.items():
            for method in LISTINGS:
                reply = await ask(http, base_url, "daydream-tools", method, token)
                assert reply.status_code == 401, (name, method, reply.text)
                assert "result" not in reply.text
    assert cache.hits == hits


async def test_a_change_of_a_servers_tools_is_listed_at_once(monkeypatch):
    secret = new_secret()
    token = mint_scope_token(secret, None)
    async with host(monkeypatch, secret) as (base_url, cache), httpx.AsyncClient() as http:
        server = cache.servers["telegram-tools"]
        before = tool_names(await ask(http, base_url, "telegram-tools", "tools/list", token))
        assert (
            tool_names(await ask(http, base_url, "telegram-tools", "tools/list", token)) == before
        )
        hits = cache.hits

        def listing_cache_probe() -> str:
            """Added while the host runs."""
            return "probe"

        # the server objects are the process's own: every change is undone before the end
        server.add_tool(listing_cache_probe)
        try:
            added = tool_names(await ask(http, base_url, "telegram-tools", "tools/list", token))
        finally:
            server.local_provider.remove_tool("listing_cache_probe")
        removed = tool_names(await ask(http, base_url, "telegram-tools", "tools/list", token))
        hidden_name = sorted(before)[0]
        server.disable(names={hidden_name})
        try:
            hidden = tool_names(await ask(http, base_url, "telegram-tools", "tools/list", token))
        finally:
            server.enable(names={hidden_name})
        shown = tool_names(await ask(http, base_url, "telegram-tools", "tools/list", token))
        instructions = server.instructions
        server.instructions = "Changed while hosting."
        try:
            discovered = await ask(http, base_url, "telegram-tools", "server/discover", token)
        finally:
            server.instructions = instructions
    assert added == before | {"listing_cache_probe"}
    assert removed == before
    assert hidden == before - {hidden_name}
    assert shown == before
    assert discovered.json()["result"]["instructions"] == "Changed while hosting."
    assert cache.hits == hits  # each answer after a change was built afresh


async def test_requests_differing_in_transport_headers_are_not_answered_from_the_cache(
    monkeypatch,
):
    """The MCP transport routes and checks a request by its headers (protocol version, Accept):
    a cached answer must not stand in for what the transport would do with other headers."""
    secret = new_secret()
    token = mint_scope_token(secret, None)
    async with host(monkeypatch, secret) as (base_url, cache), httpx.AsyncClient() as http:
        await ask(http, base_url, "telegram-tools", "tools/list", token)
        cached = await ask(http, base_url, "telegram-tools", "tools/list", token)
        hits = cache.hits
        unknown = await ask(
            http,
            base_url,
            "telegram-tools",
            "tools/list",
            token,
            **{"mcp-protocol-version": "2099-01-01"},
        )
        mismatch = await ask(
            http,
            base_url,
            "telegram-tools",
            "tools/list",
            token,
            **{"mcp-protocol-version": "2025-11-25"},
        )
        no_json = await ask(
            http, base_url, "telegram-tools", "tools/list", token, accept="text/event-stream"
        )
    assert cached.headers["content-type"] == "application/json"
    assert unknown.status_code == 400 and "error" in unknown.json(), unknown.text
    # an older protocol version goes to the handshake-era transport, which answers in SSE
    assert mismatch.headers["content-type"].startswith("text/event-stream"), mismatch.text
    assert no_json.status_code == 406
    assert cache.hits == hits


@pytest.mark.parametrize(
    "body",
    [
        b'[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]',  # a batch
        b'{"jsonrpc":"2.0","method":"tools/list"}',  # a notification
        b'{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"cursor":"nonsense"}}',
        b"{not json",
    ],
)
async def test_other_bodies_pass_to_fastmcp_every_time(monkeypatch, body):
    secret = new_secret()
    token = mint_scope_token(secret, None)
    headers = {
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        "mcp-method": "tools/list",
        "mcp-protocol-version": PROTOCOL,
        "authorization": f"Bearer {token}",
    }
    async with host(monkeypatch, secret) as (base_url, cache), httpx.AsyncClient() as http:
        url = endpoint(base_url, "telegram-tools")
        first = await http.post(url, content=body, headers=headers)
        second = await http.post(url, content=body, headers=headers)
    assert first.status_code == second.status_code
    assert first.status_code != 200 or "result" not in first.json()
    assert first.content == second.content
    assert cache.hits == 0 and not cache.entries


async def test_tool_calls_and_legacy_requests_are_not_cached(monkeypatch):
    secret = new_secret()
    token = mint_scope_token(secret, None)
    async with host(monkeypatch, secret) as (base_url, cache), httpx.AsyncClient() as http:
        headers = {
            "accept": "application/json, text/event-stream",
            "content-type": "application/json",
            "authorization": f"Bearer {token}",
        }
        legacy = await http.post(
            endpoint(base_url, "telegram-tools"),
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            headers={**headers, "mcp-protocol-version": "2025-06-18"},
        )
        call = await ask(http, base_url, "promise-tools", "tools/call", token)
    assert legacy.status_code in (200, 400)
    assert call.status_code != 500
    assert not cache.entries and cache.misses == 0


async def test_the_cache_is_bounded(monkeypatch):
    secret = new_secret()
    async with host(monkeypatch, secret) as (base_url, cache), httpx.AsyncClient() as http:
        cache.max_entries = 3
        for chat in range(6):
            token = mint_scope_token(secret, CHAT + chat)
            await ask(http, base_url, "telegram-tools", "tools/list", token)
    assert len(cache.entries) == 3
    assert [key[2] for key in cache.entries] == [CHAT + 3, CHAT + 4, CHAT + 5]
