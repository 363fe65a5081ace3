"""``/stop`` ends the running reply; ``/stop all`` also ends the chat's waiting messages, each
answered "Cancelled.", and other chats are untouched. In process, with a stand-in runner that
runs until it is cancelled (the real part here is the bridge's queue and inbox)."""

from __future__ import annotations

import asyncio
import json

import pytest

from bridge.memory import MemoryTransport, incoming
from bridge.pipeline import Bridge
from servers.core import spending
from servers.core.claude_command import ClaudeRun
from servers.core.claude_runner import RunOutcome
from tests.support import configure

OWNER = 1
CHAT, OTHER = 4242, 5151


class UntilCancelled:
    """Every run waits for its cancel event (a run in the other chat too)."""

    claude_bin = "claude"

    def __init__(self):
        self.started: list[str] = []

    async def run(self, request: ClaudeRun, on_event, cancel: asyncio.Event) -> RunOutcome:
        self.started.append(request.prompt.rsplit("\n", 1)[-1])
        await cancel.wait()
        return RunOutcome("cancelled")


@pytest.fixture
def bridge_and_chat(monkeypatch):
    configure(monkeypatch, VALOR_ALLOWED_USER_IDS=json.dumps([OWNER]), VALOR_WARM_SESSIONS="off")
    transport = MemoryTransport()
    runner = UntilCancelled()
    return Bridge(transport, runner=runner, host_tools=False, persona=""), transport, runner


def statuses(store, chat: int) -> list[tuple[int, str]]:
    rows = store.query(
        "SELECT message_id, status FROM bridge_inbox WHERE chat_id = ? AND status != 'command' "
        "ORDER BY id",
        (chat,),
    )
    return [(r[0], r[1]) for r in rows]


async def test_stop_all_ends_the_running_reply_and_every_waiting_message(store, bridge_and_chat):
    bridge, transport, runner = bridge_and_chat
    async with bridge.serving():
        for n in (1, 2, 3):
            await bridge.receive(incoming(CHAT, n, f"job {n}", sender_id=OWNER))
        await bridge.receive(incoming(OTHER, 1, "other job", sender_id=OWNER))
        await transport.wait_for(lambda: len(runner.started) == 2)
        # A message held back by a spending cap is waiting too.
        held = incoming(CHAT, 4, "held job", sender_id=OWNER)
        await bridge.receive(held)
        row_id = store.query("SELECT id FROM bridge_inbox WHERE message_id = 4")[0][0]
        bridge._queues[CHAT].remove(row_id)
        spending.hold(store, row_id, CHAT, "capped")

        assert await bridge.receive(incoming(CHAT, 9, "/stop all", sender_id=OWNER)) == "command"
        await transport.wait_for(lambda: CHAT not in bridge._workers)
        assert transport.replies_to(CHAT, 9)[0].text == (
            "Stopping the current reply; cancelled 3 waiting messages."
        )
        for n in (2, 3, 4):
            assert [m.text for m in transport.replies_to(CHAT, n)] == ["Cancelled."]
        assert "Stopped." in transport.replies_to(CHAT, 1)[0].text
        assert statuses(store, CHAT) == [(n, "cancelled") for n in (1, 2, 3, 4)]
        assert spending.held(store) == []
        assert runner.started == ["job 1", "other job"]  # nothing waiting ran
        assert statuses(store, OTHER) == [(1, "running")]  # the other chat is untouched

        # Plain /stop only ends the running reply; a later message still runs.
        await bridge.receive(incoming(OTHER, 2, "next", sender_id=OWNER))
        await bridge.receive(incoming(OTHER, 3, "/stop", sender_id=OWNER))
        await transport.wait_for(lambda: runner.started[-1] == "next")
        assert transport.replies_to(OTHER, 3)[0].text == "Stopping the current reply."
        await bridge.receive(incoming(OTHER, 4, "/stop all", sender_id=OWNER))
        await asyncio.wait_for(bridge.drain(), 30)
    assert statuses(store, OTHER) == [(1, "cancelled"), (2, "cancelled")]
    assert transport.replies_to(OTHER, 4)[0].text == (
        "Stopping the current reply; cancelled 0 waiting messages."
    )


async def test_stop_all_with_nothing_to_stop_says_so(store, bridge_and_chat):
    bridge, transport, _ = bridge_and_chat
    async with bridge.serving():
        await bridge.receive(incoming(CHAT, 1, "/stop all", sender_id=OWNER))
    assert transport.replies_to(CHAT, 1)[0].text == "Nothing is running in this chat."
