"""The chat commands and the answers the bridge gives at once, without a run.

``/stop`` ends the conversation's running reply (``/stop all``: its waiting messages too),
``/new`` starts a fresh session, ``/status`` tells the queue and the runs, ``/cost`` the chat's
spend today and the caps. A command acts on the conversation it was sent in: the chat, or its
forum topic (``/cost`` excepted: spending caps are per chat). A reply to a button press is a
short notice to the presser and the text in the chat for everyone else.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from bridge import inbox
from bridge.transport import ButtonTransport, IncomingMessage, Transport
from servers.core import approvals, spending
from servers.core.claude_resident import conversation_key

if TYPE_CHECKING:
    from bridge.pipeline import Bridge

COMMANDS = ("/stop", "/new", "/status", "/cost")


def parse_command(text: str) -> str | None:
    """``/stop`` or ``/stop@ValorBot`` → ``/stop``; anything else → None."""
    word = text.strip().split(maxsplit=1)[0] if text.strip() else ""
    word = word.split("@", 1)[0].lower()
    return word if word in COMMANDS else None


def in_topic(topic_id: int | None) -> dict[str, int]:
    """The ``topic_id=`` keyword for a message written in a forum topic (nothing otherwise)."""
    return {"topic_id": topic_id} if topic_id is not None else {}


def buttons_of(transport: Transport) -> ButtonTransport | None:
    """The transport, when it can show inline buttons (a Telegram bot)."""
    if isinstance(transport, ButtonTransport) and transport.buttons_enabled():
        return transport
    return None


async def reply(transport: Transport, message: IncomingMessage, text: str) -> None:
    """Answer a message, or a button press (a short notice to the presser, and the text in
    the chat for everyone else)."""
    buttons = buttons_of(transport)
    if message.button_press is None or buttons is None:
        await transport.send_text(message.chat_id, text, reply_to=message.message_id)
        return
    await buttons.answer_button(message, text)
    await transport.send_text(
        message.chat_id, f"{text} ({message.sender_name})", **in_topic(message.topic_id)
    )


async def refuse_press(transport: Transport, message: IncomingMessage) -> None:
    """A stranger's button press changes nothing; only the presser is told."""
    buttons = buttons_of(transport)
    if message.button_press is not None and buttons is not None:
        with contextlib.suppress(Exception):
            await buttons.answer_button(message, "Only an allowed user can answer this.")


async def run_command(bridge: Bridge, command: str, message: IncomingMessage) -> None:
    """Commands act on the conversation: the chat, or the forum topic they were sent in
    (``/cost`` excepted: spending caps are per chat)."""
    chat, topic = message.chat_id, message.topic_id
    key = conversation_key(chat, topic)
    if command == "/stop":
        everything = message.text.lower().split()[1:2] == ["all"]
        running = bridge._running.get(key)
        if running is not None:
            running.cancel.set()
        cancelled = await bridge.cancel_queued(chat, topic) if everything else 0
        if running is None and not cancelled:
            text = "Nothing is running in this chat."
        elif not everything:
            text = "Stopping the current reply."
        else:
            what = "Stopping the current reply" if running else "Nothing was running"
            plural = "s" if cancelled != 1 else ""
            text = f"{what}; cancelled {cancelled} waiting message{plural}."
    elif command == "/cost":
        text = spending.cost_text(spending.standing(bridge.store, bridge.settings, chat))
    elif command == "/new":
        inbox.forget_session(bridge.store, chat, topic)
        approvals.end_session_grants(bridge.store, chat)  # "allow for this session" ends too
        await bridge.warm.close_chat(key, "new session")
        text = "Fresh start: the next message begins a new session."
    else:
        text = bridge.status_text(chat, topic)
    if message.button_press is not None and command == "/stop":
        buttons = buttons_of(bridge.transport)  # the Stop button: the presser's notice is enough
        if buttons is not None:
            await buttons.answer_button(message, text)
            return
    await reply(bridge.transport, message, text)


async def cancel_queued(bridge: Bridge, chat_id: int, topic_id: int | None = None) -> int:
    """``/stop all``: every message of the conversation (the chat, or its forum topic)
    waiting for its turn (queued, or held back by a spending cap) ends as cancelled, each
    answered "Cancelled."; returns how many."""
    key = conversation_key(chat_id, topic_id)
    running = bridge._running.get(key)
    waiting = [i for i in bridge._queues.get(key, ()) if not running or i != running.row.id]
    waiting += [i for i, _ in spending.held(bridge.store, chat_id) if i not in waiting]
    cancelled = 0
    for row_id in waiting:
        row = inbox.get_row(bridge.store, row_id)
        if row is None or row.status != "pending" or row.topic_id != topic_id:
            continue
        inbox.mark_finished(bridge.store, row_id, "cancelled", "/stop all")
        spending.release(bridge.store, row_id)
        cancelled += 1
        with contextlib.suppress(Exception):  # the cancellation stands even if unsaid
            await bridge.transport.send_text(chat_id, "Cancelled.", reply_to=row.message_id)
    return cancelled


def status_text(bridge: Bridge, chat_id: int, topic_id: int | None = None) -> str:
    """``/status``: the conversation's queue and run, the runs overall, the last cost and the
    warm process."""
    key = conversation_key(chat_id, topic_id)
    running = bridge._running.get(key)
    waiting = len(bridge._queues.get(key, ()))
    last, total = inbox.last_cost(bridge.store, chat_id, topic_id)
    lines = [
        f"Queue: {waiting} waiting in this {'chat' if topic_id is None else 'topic'}.",
        (
            f"Running: a reply for {time.monotonic() - running.started:.0f} s."
            if running
            else "Running: nothing."
        ),
        f"Runs across all chats: {len(bridge._running)} of {bridge.settings.max_concurrent_runs}.",
        "Last cost: " + (f"${last:.4f} (total ${total:.4f})." if last is not None else "none."),
    ]
    resident = bridge.warm.process_of(key)
    if resident is not None and resident.alive:
        lines.append(
            f"Warm process: {resident.turns} turns, {resident.age / 60:.0f} min old "
            f"({len(bridge.warm)} of {bridge.warm.limits.max_processes} warm)."
        )
    return "\n".join(lines)
