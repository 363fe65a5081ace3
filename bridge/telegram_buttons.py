"""Inline buttons for a Telegram bot: approval questions (Allow once / Allow for this session /
Deny) and a Stop button on the live message. A user session cannot send inline buttons, so it
keeps the typed answers (``yes CODE``); the bridge asks ``buttons_enabled()`` first.

A button's data is ``v1:`` plus the text a person would type for the same answer (``yes abcde``,
``/stop``). A press becomes an ``IncomingMessage`` carrying that text and the query id, queued
like any message: the bridge applies the same allowlist check as for a typed answer, and answers
the press (a short text Telegram shows the presser) through ``answer``. A press whose data is not
ours is answered at once and goes no further.

``TelegramTransport`` calls these functions from small methods of its own; the state (presses
waiting for an answer, live messages carrying Stop) lives on the transport.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bridge.transport import Button, IncomingMessage
from servers.core.approvals import parse_answer
from servers.core.errors import describe_exception

if TYPE_CHECKING:
    from bridge.telegram import TelegramTransport

log = logging.getLogger("valor.bridge.telegram")

DATA_PREFIX = b"v1:"
STOP = Button("⏹ Stop", "/stop")
PRESSES_KEPT = 1000  # presses waiting for the bridge's answer (Telegram expires them anyway)
ANSWER_CHARS = 190  # Telegram shows at most 200 characters of a callback answer


class ButtonState:
    """Per transport: presses not answered yet, and the live messages that carry Stop."""

    def __init__(self) -> None:
        self.presses: OrderedDict[int, Any] = OrderedDict()
        self.stoppable: set[tuple[int, int]] = set()  # (chat, the user's message replied to)
        self.live: dict[tuple[int, int], int] = {}  # (chat, live message) → the reply_to


def state_of(transport: TelegramTransport) -> ButtonState:
    state = transport.__dict__.get("_buttons")
    if state is None:
        state = transport.__dict__["_buttons"] = ButtonState()
    return state


def to_telethon(buttons: Sequence[Button]) -> list[list[Any]]:
    """One button per row: the labels stay readable on a phone."""
    from telethon import Button as TelethonButton

    return [[TelethonButton.inline(b.label, DATA_PREFIX + b.answer.encode())] for b in buttons]


def answer_of(data: bytes | None) -> str | None:
    """The typed answer a button stands for, when it is one of ours and still meaningful."""
    if not data or not data.startswith(DATA_PREFIX):
        return None
    try:
        text = data[len(DATA_PREFIX) :].decode()
    except UnicodeDecodeError:
        return None
    return text if text == STOP.answer or parse_answer(text) is not None else None


def press_message_id(query_id: int) -> int:
    """A press has no message id: a negative one from its query id keeps the inbox's
    (chat, message) key unique without meeting a real (positive) message id."""
    return -(int(query_id) % (2**62)) - 1


async def on_press(transport: TelegramTransport, event: Any) -> None:
    """Telethon's CallbackQuery handler: queue the press as a message, or answer it at once."""
    try:
        text = answer_of(event.data)
        if text is None:
            await event.answer("This button is not Valor's any more.")
            return
        sender = getattr(event, "sender", None)
        from telethon import utils

        press = IncomingMessage(
            chat_id=int(event.chat_id),
            message_id=press_message_id(event.query.query_id),
            sender_id=int(event.sender_id),
            sender_name=utils.get_display_name(sender) if sender is not None else "",
            text=text,
            sent_at=time.time(),
            is_group=not event.is_private,
            mentions_valor=True,  # a press on Valor's own message is addressed to Valor
            replies_to_valor=True,
            button_press=int(event.query.query_id),
        )
    except Exception as exc:  # one odd press must not stop the others
        log.error("could not read a button press: %s", describe_exception(exc))
        return
    presses = state_of(transport).presses
    presses[press.button_press] = event  # type: ignore[index]
    while len(presses) > PRESSES_KEPT:
        presses.popitem(last=False)
    await transport._queue.put(press)


async def answer(transport: TelegramTransport, press: IncomingMessage, text: str) -> None:
    """Answer a press with a short text shown to the person who pressed (best effort)."""
    event = state_of(transport).presses.pop(press.button_press, None)  # type: ignore[arg-type]
    if event is None:
        return
    short = text if len(text) <= ANSWER_CHARS else text[: ANSWER_CHARS - 1] + "…"
    try:
        await event.answer(short)
    except Exception as exc:  # the decision stands; only the little notice is lost
        log.info("could not answer a button press: %s", describe_exception(exc))


def show_stop(transport: TelegramTransport, chat_id: int, reply_to: int, shown: bool) -> None:
    state = state_of(transport)
    if shown:
        state.stoppable.add((chat_id, reply_to))
    else:
        state.stoppable.discard((chat_id, reply_to))
        for key in [k for k, v in state.live.items() if k[0] == chat_id and v == reply_to]:
            del state.live[key]


def stop_for_send(transport: TelegramTransport, chat_id: int, reply_to: int | None):
    """The Stop button for a message sent as the reply to a running message (else None)."""
    if not transport.is_bot or reply_to is None:
        return None
    return to_telethon([STOP]) if (chat_id, reply_to) in state_of(transport).stoppable else None


def note_sent(transport: TelegramTransport, chat_id: int, reply_to: int | None, sent_id: int):
    """Remember a live message that got Stop, so its edits keep it while the run lasts."""
    if reply_to is not None and (chat_id, reply_to) in state_of(transport).stoppable:
        state_of(transport).live[(chat_id, sent_id)] = reply_to


def stop_for_edit(transport: TelegramTransport, chat_id: int, message_id: int):
    """The Stop button for an edit of a live message whose run still lasts (else None: an
    edit without buttons removes them)."""
    state = state_of(transport)
    reply_to = state.live.get((chat_id, message_id))
    if reply_to is None or (chat_id, reply_to) not in state.stoppable:
        return None
    return to_telethon([STOP])
