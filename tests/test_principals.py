"""What each principal may do, enforced by the host (the middleware every server gets), not by
each tool: a chat run is not shown operator tools and calling one fails as an unknown tool does."""

from __future__ import annotations

import logging

import pytest
from fastmcp import Client

from servers import SERVERS, load_all, load_server
from servers.core import trust
from servers.core.app import create_server
from servers.core.principals import (
    OPERATOR,
    OPERATOR_TAG,
    Principal,
    chat_principal,
    may_use,
)
from tests.support import call, texts

OPERATOR_TOOLS = {
    "monitoring-tools": {"system_health", "cleanup_resources", "export_metrics", "spending_report"},
    "daydream-tools": {"run_daydream", "daydream_history"},
}
CHAT = chat_principal(42)
SOCIAL_CLIENT = Principal(
    "client", scopes=frozenset({"chat", "server:social-tools"}), name="phone", token_id="t1"
)


@pytest.fixture
def as_principal(monkeypatch):
    """Make every tool call of this test serve ``principal``, as the host would have decided."""

    def use(principal: Principal) -> None:
        monkeypatch.setattr(trust, "current_principal", lambda: principal, raising=False)

    return use


async def tool_names(server) -> set[str]:
    async with Client(server) as client:
        return {tool.name for tool in await client.list_tools()}


def unknown_tool_answer(result, name: str) -> tuple:
    """Everything a client sees of a failed call, with the tool's own name taken out."""
    return (
        result.is_error,
        texts(result).replace(repr(name), "<tool>"),
        result.structured_content,
        result.meta,
    )


# -- may_use -------------------------------------------------------------------------------------
OPERATOR_ON_SOCIAL = Principal("client", scopes=frozenset({"operator", "server:social-tools"}))
NO_SCOPES = Principal("client", name="nothing granted")


@pytest.mark.parametrize(
    ("principal", "server", "tags", "allowed"),
    [
        (OPERATOR, "monitoring-tools", {OPERATOR_TAG}, True),
        (OPERATOR, "social-tools", set(), True),
        (CHAT, "monitoring-tools", {OPERATOR_TAG}, False),
        (CHAT, "monitoring-tools", {OPERATOR_TAG, "other"}, False),
        (CHAT, "social-tools", set(), True),
        (CHAT, "social-tools", {"other"}, True),
        (SOCIAL_CLIENT, "social-tools", set(), True),
        (SOCIAL_CLIENT, "social-tools", {OPERATOR_TAG}, False),
        (SOCIAL_CLIENT, "telegram-tools", set(), False),
        (OPERATOR_ON_SOCIAL, "social-tools", {OPERATOR_TAG}, True),
        (OPERATOR_ON_SOCIAL, "monitoring-tools", {OPERATOR_TAG}, False),
        (OPERATOR_ON_SOCIAL, "monitoring-tools", set(), False),
        (NO_SCOPES, "social-tools", set(), False),
        (NO_SCOPES, "monitoring-tools", {OPERATOR_TAG}, False),
    ],
)
def test_may_use(principal, server, tags, allowed):
    assert may_use(principal, server, tags) is allowed


def test_the_shared_principals():
    assert OPERATOR.kind == "operator" and OPERATOR.scopes == {"operator"}
    assert OPERATOR.chat_id is None
    chat = chat_principal(7, token_id="abc")
    assert (chat.kind, chat.chat_id, chat.scopes, chat.token_id) == ("chat", 7, {"chat"}, "abc")


# -- through the host ----------------------------------------------------------------------------
async def test_a_chat_run_is_shown_no_operator_tool(as_principal):
    as_principal(CHAT)
    for name, server in load_all().items():
        listed = await tool_names(server)
        assert not listed & OPERATOR_TOOLS.get(name, set()), name
        if name not in OPERATOR_TOOLS:  # everything else is chat-usable
            as_principal(OPERATOR)
            assert listed == await tool_names(server), name
            as_principal(CHAT)
    assert await tool_names(load_server("monitoring-tools")) == set()


async def test_calling_an_operator_tool_as_a_chat_fails_like_an_unknown_tool(
    as_principal, monkeypatch, caplog
):
    as_principal(CHAT)
    monitoring = load_server("monitoring-tools")
    ran = []
    monkeypatch.setattr("servers.monitoring.cleanup", lambda *args, **kwargs: ran.append(args))
    caplog.set_level(logging.INFO, logger="valor.principals")
    refused = await call(monitoring, "cleanup_resources", {"dry_run": False, "max_age_hours": 0})
    made_up = await call(monitoring, "no_such_tool", {})
    assert refused.is_error
    assert texts(refused) == "[input] Unknown tool: 'cleanup_resources'"
    assert unknown_tool_answer(refused, "cleanup_resources") == unknown_tool_answer(
        made_up, "no_such_tool"
    )
    # The operator can tell from the log what was refused to whom; the client cannot.
    assert "refused cleanup_resources on monitoring-tools to chat 42" in caplog.text
    # Raised as an exception too, the two are the same.
    async with Client(monitoring) as client:
        errors = []
        for name in ("export_metrics", "no_such_tool"):
            with pytest.raises(Exception) as caught:
                await client.call_tool(name, {})
            errors.append((type(caught.value), str(caught.value).replace(repr(name), "<tool>")))
    assert errors[0] == errors[1]
    assert ran == []  # the tool never ran


async def test_the_operator_sees_and_calls_every_tool(as_principal):
    as_principal(OPERATOR)
    for name in SERVERS:
        server = load_server(name)
        all_tools = {tool.name for tool in await server.list_tools(run_middleware=False)}
        assert await tool_names(server) == all_tools
        assert OPERATOR_TOOLS.get(name, set()) <= all_tools
    monitoring = load_server("monitoring-tools")
    for tool, arguments in [
        ("cleanup_resources", {}),  # a dry run by default
        ("export_metrics", {}),
        ("system_health", {}),
    ]:
        result = await call(monitoring, tool, arguments)
        assert not result.is_error, texts(result)
    history = await call(load_server("daydream-tools"), "daydream_history", {"limit": 1})
    assert not history.is_error, texts(history)
    assert history.structured_content == {"sessions": []}


async def test_a_client_scoped_to_one_server_sees_only_that_server(as_principal):
    as_principal(SOCIAL_CLIENT)
    social = load_server("social-tools")
    as_principal(OPERATOR)
    social_tools = await tool_names(social)
    as_principal(SOCIAL_CLIENT)
    assert social_tools and await tool_names(social) == social_tools
    for name, server in load_all().items():
        if name != "social-tools":
            assert await tool_names(server) == set(), name
    refused = await call(
        load_server("telegram-tools"), "search_conversation_history", {"query": "x"}
    )
    assert texts(refused) == "[input] Unknown tool: 'search_conversation_history'"


async def test_mounted_servers_keep_their_own_names_for_server_scopes(as_principal):
    """Served as one process (every server mounted into one app), a tool is still judged by the
    server that defines it."""
    combined = create_server("combined-tools", instructions="test")
    for name in ("social-tools", "monitoring-tools"):
        combined.mount(load_server(name))
    as_principal(OPERATOR)
    social_tools = await tool_names(load_server("social-tools"))
    assert await tool_names(combined) == social_tools | OPERATOR_TOOLS["monitoring-tools"]
    as_principal(CHAT)
    assert await tool_names(combined) == social_tools
    as_principal(SOCIAL_CLIENT)
    assert await tool_names(combined) == social_tools
    refused = await call(combined, "export_metrics", {})
    assert texts(refused) == "[input] Unknown tool: 'export_metrics'"


async def test_over_http_a_chat_token_lists_no_operator_tool_and_cannot_call_one():
    """The same through the real host on loopback, with tokens the host verifies (no patching)."""
    from fastmcp.client.transports import StreamableHttpTransport

    from servers.core.mcp_config import endpoint
    from servers.hosting import hosted

    secret = trust.new_secret()
    chat_token = trust.mint_token(secret, CHAT, 3600)[0]
    operator_token = trust.mint_token(secret, OPERATOR, 3600)[0]

    async def listed_and_refused(base_url: str, token: str) -> tuple[set[str], object]:
        transport = StreamableHttpTransport(
            endpoint(base_url, "monitoring-tools"), headers={"Authorization": f"Bearer {token}"}
        )
        async with Client(transport) as client:
            names = {tool.name for tool in await client.list_tools()}
            result = await client.call_tool("export_metrics", {}, raise_on_error=False)
        return names, result

    async with hosted(secret) as base_url:
        chat_sees, chat_call = await listed_and_refused(base_url, chat_token)
        operator_sees, operator_call = await listed_and_refused(base_url, operator_token)
    assert chat_sees == set()
    assert texts(chat_call) == "[input] Unknown tool: 'export_metrics'"
    assert operator_sees == OPERATOR_TOOLS["monitoring-tools"]
    assert not operator_call.is_error, texts(operator_call)


async def test_a_caller_bound_to_no_chat_and_not_operator_reads_no_chat(as_principal, store):
    """Only the operator chooses a chat: a client with the chat scope but no chat of its own
    cannot name one (or list every chat's links) through chat_id."""
    from servers.core import history

    history.record_message(store, history.Message(7, 1, "the secret plan", "Ann", 1, "in"))
    as_principal(Principal("client", scopes=frozenset({"chat"}), name="no chat"))
    telegram, social = load_server("telegram-tools"), load_server("social-tools")
    named = await call(telegram, "search_conversation_history", {"query": "plan", "chat_id": 7})
    assert named.is_error and "bound to no chat" in texts(named)
    links = await call(social, "search_links", {"query": "plan"})
    assert links.is_error and "bound to no chat" in texts(links)
    as_principal(OPERATOR)
    found = await call(telegram, "search_conversation_history", {"query": "plan", "chat_id": 7})
    assert not found.is_error and "secret [plan]" in texts(found)
