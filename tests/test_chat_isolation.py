# ruff: noqa: F811 - pytest fixtures imported from tests.social_fakes are parameters here
"""One chat's token reaches that chat's data and nothing of another chat's, not even its
existence: every tool that reads chat data, called over HTTP with real tokens through the real
host. For each, chat A is refused or shown nothing of chat B's objects, and the answer for B's
object is word for word the answer for a missing one (compared with the object present, then
removed, or against a chat that has nothing). Plus: a FIFO in the media folder fails at once
without starving other tools, and the outbox sends only files from the chat's own media folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastmcp import Client
from fastmcp.client.transports import StreamableHttpTransport

from bridge.live import live_reply_factory
from bridge.memory import MemoryTransport
from bridge.pipeline import Bridge
from bridge.rate import Limits, RateController
from servers import load_all
from servers.core import history, http_guard, outbox, promises
from servers.core.history import Message
from servers.core.mcp_config import endpoint
from servers.core.principals import OPERATOR_TAG
from servers.core.settings import get_settings
from servers.core.store import Store
from servers.core.trust import mint_scope_token, new_secret
from servers.hosting import hosted
from tests.fakes.openai_api import FakeOpenAI, tiny_png
from tests.social_fakes import article, pages  # noqa: F401
from tests.support import configure, texts

CHAT_A, CHAT_B, CHAT_EMPTY = 1001, -100_2002, 3003  # EMPTY: a chat that has nothing at all
B_WORD = "zebracrossing"  # appears only in chat B's data

# Every tool that reads (or is pointed at) chat data, and the test below that covers it.
COVERED = {
    ("telegram-tools", "search_conversation_history"): "test_history_and_context",
    ("telegram-tools", "get_conversation_context"): "test_history_and_context",
    ("context-tools", "build_context_block"): "test_history_and_context",
    ("social-tools", "search_links"): "test_links",
    ("social-tools", "save_link"): "test_links",
    ("social-tools", "analyze_shared_image"): "test_images",
    ("social-tools", "create_image"): "test_images",
    ("development-tools", "list_workspace_screenshots"): "test_screenshots",
    ("development-tools", "retrieve_workspace_screenshot"): "test_screenshots",
    ("development-tools", "execute_bug_report_with_screenshot"): "test_screenshots",
    ("promise-tools", "promise_status"): "test_promises",
    ("promise-tools", "list_promises"): "test_promises",
    ("promise-tools", "cancel_promise"): "test_promises",
    ("promise-tools", "create_promise"): "test_promises",
    ("daydream-tools", "daydream_history"): "test_operator_only_tools",
}
# Tools a chat may call that read no chat's data: computing on their arguments (context), the
# web (search), or configuration shared by every chat (Notion workspaces).
NO_CHAT_DATA = {
    ("context-tools", "optimize_context"),
    ("context-tools", "context_health"),
    ("social-tools", "search_current_info"),
    ("notion-tools", "query_notion_projects"),
    ("notion-tools", "list_notion_workspaces"),
    # Writes only its own chat's question (the chat from the token) and reads no chat's data.
    ("approval-tools", "approve_tool_use"),
}


def answer(result, *replace: tuple[str, str]) -> tuple:
    """Everything a client sees of a result, with the given names swapped for placeholders."""
    text = texts(result)
    for old, new in replace:
        text = text.replace(old, new)
    return result.is_error, text, result.structured_content


@dataclass
class Host:
    base_url: str
    secret: bytes
    stack: contextlib.AsyncExitStack
    clients: dict[tuple[int | None, str], Client] = field(default_factory=dict)

    async def call(self, chat: int | None, server: str, tool: str, arguments: dict | None = None):
        """Call as chat ``chat``'s run (a chat token), or as the operator when ``chat`` is None."""
        key = (chat, server)
        if key not in self.clients:
            token = mint_scope_token(self.secret, chat)
            transport = StreamableHttpTransport(
                endpoint(self.base_url, server), headers={"Authorization": f"Bearer {token}"}
            )
            self.clients[key] = await self.stack.enter_async_context(Client(transport))
        return await self.clients[key].call_tool(tool, arguments or {}, raise_on_error=False)

    async def tool_names(self, chat: int | None, server: str) -> set[str]:
        await self.call(chat, server, "no_such_tool")  # opens the session
        return {tool.name for tool in await self.clients[(chat, server)].list_tools()}


@pytest.fixture
async def host() -> AsyncIterator[Host]:
    secret = new_secret()
    async with hosted(secret) as base_url, contextlib.AsyncExitStack() as stack:
        yield Host(base_url, secret, stack)


def use_openai(monkeypatch, fake: FakeOpenAI) -> None:
    configure(
        monkeypatch,
        OPENAI_API_KEY="sk-test-openai-key-000",
        VALOR_OPENAI_BASE_URL=f"{fake.url}/v1",
        VALOR_OPENAI_MAX_RETRIES="0",
    )


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- every chat-data tool is covered -------------------------------------------------------------
async def test_every_tool_is_either_covered_here_or_reads_no_chat_data():
    """A new tool that takes a chat or reads chat data must be added to COVERED (and tested)."""
    chat_usable = set()
    for server_name, server in load_all().items():
        for tool in await server.list_tools(run_middleware=False):
            key = (server_name, tool.name)
            takes_chat = "chat_id" in tool.parameters.get("properties", {})
            if takes_chat:
                assert key in COVERED, f"{key} takes a chat_id but no isolation test covers it"
            if OPERATOR_TAG not in (tool.tags or set()):
                chat_usable.add(key)
    assert chat_usable - set(COVERED) == NO_CHAT_DATA


# -- telegram-tools and context-tools ------------------------------------------------------------
async def test_history_and_context(host: Host, store: Store):
    history.record_message(store, Message(CHAT_A, 1, "alpha plans for friday", "ann", 1))
    history.record_message(store, Message(CHAT_B, 1, f"the {B_WORD} secret of chat B", "bob", 2))
    # B's own token finds its message: the object is real.
    own = await host.call(
        CHAT_B, "telegram-tools", "search_conversation_history", {"query": B_WORD}
    )
    assert [hit["chat_id"] for hit in own.structured_content["hits"]] == [CHAT_B]

    found = await host.call(
        CHAT_A, "telegram-tools", "search_conversation_history", {"query": B_WORD}
    )
    nowhere = await host.call(
        CHAT_A, "telegram-tools", "search_conversation_history", {"query": "quokkaword"}
    )
    assert found.structured_content["hits"] == [] == nowhere.structured_content["hits"]
    context = await host.call(CHAT_A, "telegram-tools", "get_conversation_context", {})
    assert "alpha plans" in context.structured_content["context"]
    assert B_WORD not in context.structured_content["context"]

    # Naming B (which has messages) and naming a chat with none: the same refusal.
    for server, tool, extra in (
        ("telegram-tools", "search_conversation_history", {"query": B_WORD}),
        ("telegram-tools", "get_conversation_context", {}),
        ("context-tools", "build_context_block", {"messages": []}),
    ):
        other = await host.call(CHAT_A, server, tool, {**extra, "chat_id": CHAT_B})
        empty = await host.call(CHAT_A, server, tool, {**extra, "chat_id": CHAT_EMPTY})
        assert other.is_error, (tool, texts(other))
        assert B_WORD not in texts(other)
        assert answer(other, (str(CHAT_B), "<chat>")) == answer(empty, (str(CHAT_EMPTY), "<chat>"))


# -- social-tools: links -----------------------------------------------------------------------
async def test_links(host: Host, pages, store: Store):
    port = int(pages.url.rsplit(":", 1)[1])
    url_b = pages.html("b", article(f"The {B_WORD} page", description=f"{B_WORD} notes " * 3))
    with http_guard.allow_loopback_ports_for_tests(port):
        saved = await host.call(CHAT_B, "social-tools", "save_link", {"url": url_b})
        assert not saved.is_error, texts(saved)
        refused = await host.call(
            CHAT_A, "social-tools", "save_link", {"url": url_b, "chat_id": CHAT_B}
        )
        refused_empty = await host.call(
            CHAT_A, "social-tools", "save_link", {"url": url_b, "chat_id": CHAT_EMPTY}
        )
    assert refused.is_error
    assert answer(refused, (str(CHAT_B), "<c>")) == answer(refused_empty, (str(CHAT_EMPTY), "<c>"))
    own = await host.call(CHAT_B, "social-tools", "search_links", {"query": B_WORD})
    assert [hit["url"] for hit in own.structured_content["hits"]] == [url_b]

    found = await host.call(CHAT_A, "social-tools", "search_links", {"query": B_WORD})
    nowhere = await host.call(CHAT_A, "social-tools", "search_links", {"query": "quokkaword"})
    assert found.structured_content["hits"] == [] == nowhere.structured_content["hits"]
    named = await host.call(
        CHAT_A, "social-tools", "search_links", {"query": B_WORD, "chat_id": CHAT_B}
    )
    named_empty = await host.call(
        CHAT_A, "social-tools", "search_links", {"query": B_WORD, "chat_id": CHAT_EMPTY}
    )
    assert named.is_error and url_b not in texts(named)
    assert answer(named, (str(CHAT_B), "<c>")) == answer(named_empty, (str(CHAT_EMPTY), "<c>"))
    assert len(store.query("SELECT id FROM links")) == 1  # A's refused save wrote nothing


# -- social-tools: images ------------------------------------------------------------------------
async def test_images(host: Host, monkeypatch, fake_openai: FakeOpenAI, tmp_path: Path):
    use_openai(monkeypatch, fake_openai)
    settings = get_settings()
    photo_b = put(settings.chat_media_path(CHAT_B) / "telegram" / f"{CHAT_B}_5.png", tiny_png())
    old_layout = put(settings.media_path / "telegram" / f"{CHAT_B}_6.png", tiny_png())
    put(settings.chat_media_path(CHAT_A) / "telegram" / f"{CHAT_A}_1.png", tiny_png())
    (settings.chat_media_path(CHAT_A) / "link.png").symlink_to(photo_b)

    # B reads its own photo, A its own: the objects are real and the tool works.
    own_b = await host.call(
        CHAT_B, "social-tools", "analyze_shared_image", {"image_path": f"telegram/{CHAT_B}_5.png"}
    )
    own_a = await host.call(
        CHAT_A, "social-tools", "analyze_shared_image", {"image_path": f"telegram/{CHAT_A}_1.png"}
    )
    assert not own_b.is_error and not own_a.is_error, texts(own_b) + texts(own_a)
    assert len(fake_openai.chat_requests) == 2

    names_for_b = [  # every way A might name B's photo
        str(photo_b),
        f"chats/{CHAT_B}/telegram/{CHAT_B}_5.png",
        f"../{CHAT_B}/telegram/{CHAT_B}_5.png",
        f"telegram/{CHAT_B}_5.png",
        f"telegram/{CHAT_B}_6.png",  # the old shared layout's name
        str(old_layout),
        "link.png",  # a symlink in A's own folder to B's photo
    ]
    with_b = [
        answer(await host.call(CHAT_A, "social-tools", "analyze_shared_image", {"image_path": n}))
        for n in names_for_b
    ]
    assert all(is_error for is_error, _, _ in with_b), with_b
    # Now B's photos do not exist at all: A's answers are word for word the same.
    photo_b.unlink()
    old_layout.unlink()
    without_b = [
        answer(await host.call(CHAT_A, "social-tools", "analyze_shared_image", {"image_path": n}))
        for n in names_for_b
    ]
    assert with_b == without_b
    assert len(fake_openai.chat_requests) == 2  # nothing of B's reached the vision API

    # An image made for A goes into A's folder; B cannot name it, A can.
    fake_openai.image = tiny_png(8, 6)
    made = await host.call(CHAT_A, "social-tools", "create_image", {"prompt": "a red square"})
    path = Path(made.structured_content["path"])
    assert path.is_relative_to(settings.chat_media_path(CHAT_A).resolve())
    relative = made.structured_content["relative_path"]
    assert relative.startswith("generated/")
    mine = await host.call(CHAT_A, "social-tools", "analyze_shared_image", {"image_path": relative})
    assert not mine.is_error, texts(mine)
    theirs = await host.call(
        CHAT_B, "social-tools", "analyze_shared_image", {"image_path": str(path)}
    )
    path.unlink()
    gone = await host.call(
        CHAT_B, "social-tools", "analyze_shared_image", {"image_path": str(path)}
    )
    assert theirs.is_error and answer(theirs) == answer(gone)
    other_chat = await host.call(
        CHAT_A, "social-tools", "create_image", {"prompt": "x", "chat_id": CHAT_B}
    )
    assert other_chat.is_error and "outside it" in texts(other_chat)

    # The operator may name anything under the media directory.
    put(settings.chat_media_path(CHAT_B) / "again.png", tiny_png())
    operator = await host.call(
        None, "social-tools", "analyze_shared_image", {"image_path": f"chats/{CHAT_B}/again.png"}
    )
    assert not operator.is_error, texts(operator)


# -- development-tools: screenshots and bug reports ----------------------------------------------
async def test_screenshots(host: Host, monkeypatch, fake_openai: FakeOpenAI, fake_anthropic):
    use_openai(monkeypatch, fake_openai)
    settings = get_settings()
    shot_b = put(settings.chat_screenshots_path(CHAT_B) / "task-b" / "shot.png", tiny_png())
    put(settings.chat_screenshots_path(CHAT_A) / "task-a" / "mine.png", tiny_png())

    own = await host.call(
        CHAT_B, "development-tools", "retrieve_workspace_screenshot", {"task_id": "task-b"}
    )
    assert not own.is_error, texts(own)
    listed_a = await host.call(CHAT_A, "development-tools", "list_workspace_screenshots", {})
    assert [s["relative_path"] for s in listed_a.structured_content["screenshots"]] == [
        "task-a/mine.png"
    ]
    operator = await host.call(None, "development-tools", "list_workspace_screenshots", {})
    assert {s["relative_path"] for s in operator.structured_content["screenshots"]} == {
        "task-a/mine.png",
        "task-b/shot.png",
    }

    calls = [
        ("retrieve_workspace_screenshot", {"task_id": "task-b"}),
        ("list_workspace_screenshots", {"task_id": "task-b"}),
    ]
    with_b = [answer(await host.call(CHAT_A, "development-tools", t, a)) for t, a in calls]
    assert with_b[0][0] and with_b[1][2]["screenshots"] == []
    shot_b.unlink()
    shot_b.parent.rmdir()
    without_b = [answer(await host.call(CHAT_A, "development-tools", t, a)) for t, a in calls]
    assert with_b == without_b
    assert len(fake_openai.chat_requests) == 1  # only B's own retrieval was analyzed

    for tool, extra in (
        ("retrieve_workspace_screenshot", {"task_id": "task-b"}),
        ("list_workspace_screenshots", {}),
        ("execute_bug_report_with_screenshot", {"task_description": "x", "notion_task_id": "T"}),
    ):
        other = await host.call(CHAT_A, "development-tools", tool, {**extra, "chat_id": CHAT_B})
        empty = await host.call(CHAT_A, "development-tools", tool, {**extra, "chat_id": CHAT_EMPTY})
        assert other.is_error, tool
        assert answer(other, (str(CHAT_B), "<c>")) == answer(empty, (str(CHAT_EMPTY), "<c>"))
    assert fake_anthropic.requests == []  # no bug-report run started for another chat


# -- promise-tools ---------------------------------------------------------------------------------
async def test_promises(host: Host, store: Store):
    mine = promises.create_promise(store, None, "research alpha", "research", CHAT_A)
    theirs = promises.create_promise(store, None, f"research {B_WORD}", "research", CHAT_B)
    own = await host.call(CHAT_B, "promise-tools", "promise_status", {"promise_id": theirs.id})
    assert own.structured_content["description"] == f"research {B_WORD}"

    listed = await host.call(CHAT_A, "promise-tools", "list_promises", {})
    assert [p["id"] for p in listed.structured_content["promises"]] == [mine.id]
    calls = [
        ("promise_status", {"promise_id": theirs.id}),
        ("cancel_promise", {"promise_id": theirs.id}),
    ]
    with_b = [answer(await host.call(CHAT_A, "promise-tools", t, a)) for t, a in calls]
    assert all(is_error for is_error, _, _ in with_b)
    assert promises.get_promise(store, theirs.id).status == "waiting"  # not cancelled
    with store.transaction() as conn:
        conn.execute("DELETE FROM promises WHERE id = ?", (theirs.id,))
    without_b = [answer(await host.call(CHAT_A, "promise-tools", t, a)) for t, a in calls]
    assert with_b == without_b

    other = await host.call(
        CHAT_A, "promise-tools", "create_promise", {"description": "x", "chat_id": CHAT_B}
    )
    empty = await host.call(
        CHAT_A, "promise-tools", "create_promise", {"description": "x", "chat_id": CHAT_EMPTY}
    )
    assert other.is_error
    assert answer(other, (str(CHAT_B), "<c>")) == answer(empty, (str(CHAT_EMPTY), "<c>"))
    assert [p.id for p in promises.list_promises(store)] == [mine.id]


# -- operator-only tools -------------------------------------------------------------------------
async def test_operator_only_tools(host: Host, store: Store):
    """daydream_history reads every chat's promises and workspaces: a chat token cannot list or
    call it, and the refusal is the unknown-tool answer; the operator can."""
    assert "daydream_history" not in await host.tool_names(CHAT_A, "daydream-tools")
    refused = await host.call(CHAT_A, "daydream-tools", "daydream_history", {})
    made_up = await host.call(CHAT_A, "daydream-tools", "no_such_tool", {})
    assert refused.is_error
    assert answer(refused, ("'daydream_history'", "<tool>")) == answer(
        made_up, ("'no_such_tool'", "<tool>")
    )
    operator = await host.call(None, "daydream-tools", "daydream_history", {})
    assert not operator.is_error, texts(operator)


# -- a FIFO in the media folder ------------------------------------------------------------------
def _blocks_a_plain_open(fifo: Path) -> bool:
    """True when opening ``fifo`` the ordinary way is still waiting after half a second (it is
    then released by opening the writing end)."""
    opened = threading.Event()

    def plain_open() -> None:
        with open(fifo, "rb"):
            opened.set()

    reader = threading.Thread(target=plain_open, daemon=True)
    reader.start()
    blocked = not opened.wait(0.5)
    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # lets the blocked open return
    os.close(writer)
    reader.join(10)
    return blocked


async def test_a_fifo_fails_fast_and_many_do_not_block_other_tools(
    host: Host, monkeypatch, fake_openai: FakeOpenAI, store: Store
):
    use_openai(monkeypatch, fake_openai)
    folder = get_settings().chat_media_path(CHAT_A)
    folder.mkdir(parents=True)
    fifo = folder / "trap.png"
    os.mkfifo(fifo)
    assert _blocks_a_plain_open(fifo)  # the trap is real: an ordinary open would hang

    await host.call(CHAT_A, "social-tools", "search_links", {"query": "warm"})  # session ready
    started = time.monotonic()
    trapped = await asyncio.wait_for(  # a bounded wait: a blocking open fails, not hangs
        host.call(CHAT_A, "social-tools", "analyze_shared_image", {"image_path": "trap.png"}), 10
    )
    assert time.monotonic() - started < 1.0
    assert texts(trapped) == "[file] trap.png is not a regular file."

    # Far more calls than the worker threads tools share (40), and an unrelated tool meanwhile.
    many = [
        host.call(CHAT_A, "social-tools", "analyze_shared_image", {"image_path": "trap.png"})
        for _ in range(60)
    ]
    other = host.call(CHAT_A, "telegram-tools", "get_conversation_context", {})
    results = await asyncio.wait_for(asyncio.gather(*many, other), 60)
    assert all(texts(r) == "[file] trap.png is not a regular file." for r in results[:-1])
    assert not results[-1].is_error
    assert fake_openai.chat_requests == []


# -- the outbox and replies send only the chat's own files ----------------------------------------
async def test_the_outbox_sends_only_files_in_the_chats_media_folder(
    store: Store, caplog, tmp_path: Path
):
    settings = get_settings()
    mine = put(settings.chat_media_path(CHAT_A) / "report.png", tiny_png())
    theirs = put(settings.chat_media_path(CHAT_B) / "private.png", tiny_png())
    (settings.chat_media_path(CHAT_A) / "passwd.png").symlink_to("/etc/passwd")
    os.mkfifo(settings.chat_media_path(CHAT_A) / "trap.png")
    bad = [
        "/etc/passwd",
        str(settings.chat_media_path(CHAT_A) / "passwd.png"),
        str(theirs),
        f"../{CHAT_B}/private.png",
        str(settings.chat_media_path(CHAT_A) / "trap.png"),
        str(settings.chat_media_path(CHAT_A)),
        "bad\x00name",
    ]
    outbox.enqueue_outbound(store, CHAT_A, "Here is the report", [*bad, str(mine)], source="t")
    outbox.enqueue_outbound(store, CHAT_A, "", ["/etc/passwd"], source="t")

    transport = MemoryTransport()
    bridge = Bridge(transport, host_tools=False)
    caplog.set_level(logging.WARNING, logger="valor.outbox")
    assert await bridge.deliver_outbox() == 2
    sent = transport.messages_in(CHAT_A)
    assert [m.file for m in sent if m.file is not None] == [mine.resolve()]
    first, second = [m.text for m in sent if m.file is None]
    assert first.startswith("Here is the report") and (
        f"({len(bad)} attached files could not be sent" in first
    )
    assert second.startswith("(1 attached file could not be sent")
    assert "root:" not in caplog.text and "/etc/passwd" not in caplog.text
    assert caplog.text.count("refused a file") == len(bad) + 1

    # Without that check the transport would have sent it: the refusal is the outbox's.
    await transport.send_file(CHAT_A, Path("/etc/passwd"))
    assert transport.messages_in(CHAT_A)[-1].file == Path("/etc/passwd")


async def test_a_reply_uploads_only_its_own_chats_files(store: Store):
    settings = get_settings()
    mine = put(settings.chat_media_path(CHAT_A) / "made.png", tiny_png())
    theirs = put(settings.chat_media_path(CHAT_B) / "theirs.png", tiny_png())
    (settings.chat_media_path(CHAT_A) / "link.png").symlink_to(theirs)
    os.mkfifo(settings.chat_media_path(CHAT_A) / "trap.png")
    transport = MemoryTransport()
    reply = live_reply_factory(RateController(Limits(time_scale=0.05)))(transport, CHAT_A, None)
    reply.attach_files([theirs, settings.chat_media_path(CHAT_A) / "link.png"])
    await asyncio.wait_for(
        reply.finish("done", [settings.chat_media_path(CHAT_A) / "trap.png", mine]), 30
    )
    assert [m.file for m in transport.messages_in(CHAT_A) if m.file] == [mine.resolve()]
