"""Inline buttons with a bot token (bridge/telegram_buttons.py): the approval question carries
Allow once / Allow for this session / Deny, the live message a Stop button; a press goes through
Telethon's real dispatcher (hand-built ``UpdateBotCallbackQuery`` updates, as the transport tests
do for messages) and becomes an answer under the same allowlist check as a typed one. A user
session keeps the typed codes. Offline: a client whose sends and requests are recorded."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from telethon import TelegramClient
from telethon.sessions import StringSession
from telethon.tl import functions, types

from bridge.pipeline import Bridge
from bridge.telegram import TelegramTransport
from servers.core import approvals
from servers.core.claude_command import ClaudeRun
from servers.core.claude_events import TextEvent
from servers.core.claude_runner import RunOutcome
from servers.core.settings import get_settings
from tests.support import configure

ME = 999
ANN = types.User(id=42, access_hash=1, first_name="Ann")
EVE = types.User(id=66, access_hash=2, first_name="Eve")
GROUP = types.Chat(
    id=555, title="Team", photo=types.ChatPhotoEmpty(), participants_count=3, date=None, version=1
)
API_HASH = "0123456789abcdef0123456789abcdef"


class RecordingClient(TelegramClient):
    """Telethon's real client (its dispatcher and event objects) whose outgoing calls are
    recorded instead of sent."""

    def __init__(self):
        super().__init__(StringSession(), 12345, API_HASH)
        self.sent: list[dict] = []
        self.edits: list[dict] = []
        self.requests: list[object] = []
        self._next_id = 100

    async def send_message(self, entity, message="", **kwargs):
        self._next_id += 1
        self.sent.append({"chat": entity, "text": message, "id": self._next_id, **kwargs})
        return SimpleNamespace(id=self._next_id)

    async def edit_message(self, entity, message=None, text=None, **kwargs):
        self.edits.append({"chat": entity, "id": message, "text": text, **kwargs})
        return SimpleNamespace(id=message)

    async def __call__(self, request, ordered=False, flood_sleep_threshold=None):
        self.requests.append(request)
        return True

    def callback_answers(self) -> list[str]:
        return [
            r.message
            for r in self.requests
            if isinstance(r, functions.messages.SetBotCallbackAnswerRequest)
        ]


@pytest.fixture
def telegram_env(monkeypatch):
    configure(
        monkeypatch,
        TELEGRAM_API_ID="12345",
        TELEGRAM_API_HASH=API_HASH,
        TELEGRAM_BOT_TOKEN="123456:" + "A" * 35,
        VALOR_ALLOWED_USER_IDS=json.dumps([ANN.id]),
        VALOR_ALLOWED_CHAT_IDS=json.dumps([-GROUP.id]),  # any member may talk, not answer
        VALOR_WARM_SESSIONS="off",
    )
    return get_settings()


def transport_for(settings, *, bot: bool = True) -> tuple[TelegramTransport, RecordingClient]:
    client = RecordingClient()
    transport = TelegramTransport(client, settings)
    transport.set_identity(ME, "ValorBot", bot=bot)
    transport.add_handlers()
    return transport, client


def button_data(rows) -> list[list[bytes]]:
    return [[button.type.data for button in row] for row in rows]


_query_ids = iter(range(7_000_000_000, 8_000_000_000))


async def press(transport: TelegramTransport, data: bytes, *, user=ANN, peer=None, msg_id=101):
    """Hand one button press to Telethon's dispatcher; return what reached the bridge."""
    update = types.UpdateBotCallbackQuery(
        query_id=next(_query_ids),
        user_id=user.id,
        peer=peer or types.PeerChat(GROUP.id),
        msg_id=msg_id,
        chat_instance=1,
        data=data,
    )
    update._entities = {ANN.id: ANN, EVE.id: EVE, -GROUP.id: GROUP}
    await transport.client._dispatch_update(update)
    return None if transport._queue.empty() else transport._queue.get_nowait()


async def test_a_press_answers_the_question_and_a_strangers_press_does_nothing(store, telegram_env):
    transport, client = transport_for(telegram_env)
    bridge = Bridge(transport, host_tools=False, persona="")
    question = approvals.record(store, -GROUP.id, "Bash", {"command": "rm -rf build"})
    assert await bridge.ask_pending_approvals() == 1
    (sent,) = client.sent
    assert sent["chat"] == -GROUP.id and "Bash" in sent["text"] and "rm -rf build" in sent["text"]
    assert button_data(sent["buttons"]) == [
        [f"v1:yes {question.code}".encode()],
        [f"v1:always {question.code}".encode()],
        [f"v1:no {question.code}".encode()],
    ]
    labels = [row[0].text for row in sent["buttons"]]
    assert labels == ["✅ Allow once", "🔁 Allow for this session", "⛔ Deny"]

    # A group member who is not allowlisted presses Allow: nothing changes, they are told.
    stranger = await press(transport, f"v1:yes {question.code}".encode(), user=EVE)
    assert stranger is not None and stranger.button_press and stranger.sender_id == EVE.id
    assert await bridge.receive(stranger) == "ignored"
    assert approvals.get(store, question.id).status == "pending"
    assert client.callback_answers() == ["Only an allowed user can answer this."]
    # A stranger pressing in a private chat is not even authorized.
    private = await press(
        transport, f"v1:no {question.code}".encode(), user=EVE, peer=types.PeerUser(EVE.id)
    )
    assert await bridge.receive(private) == "unauthorized"
    assert approvals.get(store, question.id).status == "pending"

    # The owner presses "Allow for this session": decided exactly as `always CODE` typed.
    owner = await press(transport, f"v1:always {question.code}".encode())
    assert owner.text == f"always {question.code}" and owner.is_group
    assert await bridge.receive(owner) == "approval"
    decided = approvals.get(store, question.id)
    assert (decided.status, decided.scope, decided.decided_by, decided.decided_by_name) == (
        "allowed",
        "session",
        ANN.id,
        "Ann",
    )
    assert client.callback_answers()[-1] == "Allowed Bash for this session."
    assert client.sent[-1]["text"] == "Allowed Bash for this session. (Ann)"
    # Pressing again finds no open question.
    again = await press(transport, f"v1:yes {question.code}".encode())
    assert await bridge.receive(again) == "approval"
    assert client.callback_answers()[-1].startswith("No open question")

    # A press that is not one of Valor's buttons is answered and goes no further.
    assert await press(transport, b"something else") is None
    assert client.callback_answers()[-1] == "This button is not Valor's any more."


async def test_a_user_session_asks_with_a_code_to_type(store, telegram_env):
    transport, client = transport_for(telegram_env, bot=False)
    bridge = Bridge(transport, host_tools=False, persona="")
    question = approvals.record(store, ANN.id, "Bash", {"command": "ls"})
    await bridge.ask_pending_approvals()
    (sent,) = client.sent
    assert sent.get("buttons") is None and f"`yes {question.code}`" in sent["text"]


class UntilStopped:
    """A run that shows some text, then waits until it is cancelled."""

    claude_bin = "claude"

    async def run(self, request: ClaudeRun, on_event, cancel: asyncio.Event) -> RunOutcome:
        await on_event(TextEvent("working on it"))
        await cancel.wait()
        return RunOutcome("cancelled")


async def test_the_live_message_carries_stop_and_a_press_stops_the_run(store, telegram_env):
    transport, client = transport_for(telegram_env)
    bridge = Bridge(transport, runner=UntilStopped(), host_tools=False, persona="")
    async with bridge.serving():
        update = types.UpdateNewMessage(
            message=types.Message(
                id=7,
                peer_id=types.PeerUser(ANN.id),
                date=None,
                message="a long job",
                from_id=types.PeerUser(ANN.id),
            ),
            pts=1,
            pts_count=1,
        )
        update._entities = {ANN.id: ANN}
        await client._dispatch_update(update)
        assert await bridge.receive(transport._queue.get_nowait()) == "queued"
        while not client.sent:
            await asyncio.sleep(0.01)
        (live,) = client.sent
        assert live["reply_to"] == 7 and live["text"] == "working on it"
        assert button_data(live["buttons"]) == [[b"v1:/stop"]]

        stop = await press(transport, b"v1:/stop", peer=types.PeerUser(ANN.id), msg_id=live["id"])
        assert await bridge.receive(stop) == "command"
        await asyncio.wait_for(bridge.drain(), 30)
    assert client.callback_answers() == ["Stopping the current reply."]
    final = client.edits[-1]
    assert final["id"] == live["id"] and "Stopped." in final["text"]
    assert final["buttons"] is None  # the run is over: the edit drops the Stop button
    assert len(client.sent) == 1  # the notice went to the presser only
    assert store.query("SELECT status FROM bridge_inbox WHERE message_id = 7")[0][0] == (
        "cancelled"
    )


@pytest.fixture
def loopback():
    from tests.support.telegram_loopback import FakeTelegram

    fake = FakeTelegram(bot_id=123456)  # the bot of telegram_env's token
    fake.user(ANN)
    fake.user(EVE)
    return fake


async def test_a_settled_question_loses_its_buttons_over_telethon(store, telegram_env, loopback):
    """Through Telethon's real client against the loopback Telegram: once a question is
    decided (or times out) its message is edited to say so, and the edit carries no reply
    markup, which takes the inline keyboard off."""
    from tests.test_telegram_service import next_incoming
    from tests.test_telegram_service import transport_for as loopback_transport

    server = loopback
    transport = loopback_transport(telegram_env, server)
    await transport.start()
    bridge = Bridge(transport, host_tools=False, persona="")
    question = approvals.record(store, ANN.id, "Bash", {"command": "ls build"})
    assert await bridge.ask_pending_approvals() == 1
    [asked] = server.sent
    assert isinstance(asked.reply_markup, types.ReplyInlineMarkup)
    asked_id = approvals.question_message(store, question.id)
    server.push(
        types.UpdateBotCallbackQuery(
            query_id=next(_query_ids),
            user_id=ANN.id,
            peer=types.PeerUser(ANN.id),
            msg_id=asked_id,
            chat_instance=1,
            data=f"v1:yes {question.code}".encode(),
        )
    )
    assert await bridge.receive(await next_incoming(transport)) == "approval"
    [edit] = server.requested(functions.messages.EditMessageRequest)
    assert edit.id == asked_id and edit.reply_markup is None  # the keyboard goes
    assert edit.message.endswith("✅ Allowed once by Ann.") and "ls build" in edit.message

    unanswered = approvals.record(store, ANN.id, "Bash", {"command": "make"})
    await bridge.ask_pending_approvals()
    approvals.expire(store, unanswered.id, "no answer")
    await bridge.ask_pending_approvals()
    edit = server.requested(functions.messages.EditMessageRequest)[-1]
    assert edit.id == approvals.question_message(store, unanswered.id) and edit.reply_markup is None
    assert edit.message.endswith("⌛ No answer in time: denied.")
    await transport.close()
