"""Approvals in the chat: a run asks approval-tools about tools not allowed up front
(``servers.core.approvals``); the bridge puts each pending question to its chat (with buttons on
a bot), an allowlisted user's ``yes CODE`` / ``always CODE`` / ``no CODE`` answers it at once,
and a question nobody answered in time is reported to the chat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from bridge import inbox
from bridge.commands import buttons_of, refuse_press, reply
from bridge.transport import Button, IncomingMessage, SentMessage
from servers.core import approvals
from servers.core.errors import describe_exception

if TYPE_CHECKING:
    from bridge.pipeline import Bridge

log = logging.getLogger("valor.bridge")

APPROVALS_POLL_SECONDS = 0.02  # while a run may ask: a question from another process this soon
APPROVALS_MAX_BACKOFF_SECONDS = 5.0  # a failing store or transport is retried at most this late


def approval_buttons(code: str) -> list[Button]:
    """A question's buttons; each press is the typed answer it names."""
    return [
        Button("✅ Allow once", f"yes {code}"),
        Button("🔁 Allow for this session", f"always {code}"),
        Button("⛔ Deny", f"no {code}"),
    ]


class ChatApprovals:
    """The bridge's side of approvals: asking in the chat, taking the answers, closing the
    questions. It reads the bridge's transport, store, settings, hosted tools and running
    replies as they are at each call."""

    def __init__(self, bridge: Bridge):
        self._bridge = bridge
        self.wake: asyncio.Event | None = None  # while the loop runs; set: it looks now

    def may_approve(self, message: IncomingMessage) -> bool:
        """Only an allowlisted user answers a question (in a group too, where any member may
        talk to Valor); at the console the person at the keyboard is the owner."""
        bridge = self._bridge
        return bridge.authorize_all or message.sender_id in bridge.settings.allowed_user_ids

    async def answer(self, message: IncomingMessage, answer: approvals.Answer) -> str:
        """A typed or pressed answer to a question: decided at once, the question closed."""
        bridge = self._bridge
        if not self.may_approve(message):
            log.warning(
                "ignored an approval answer from user %s in chat %s (not an allowlisted user)",
                message.sender_id,
                message.chat_id,
            )
            await refuse_press(bridge.transport, message)
            return "ignored"
        if not inbox.persist_incoming(bridge.store, message, status="command"):
            return "duplicate"
        decided = approvals.decide(
            bridge.store, message.chat_id, answer, message.sender_id, message.sender_name
        )
        if decided is None:
            text = f"No open question with the code {answer.code} in this chat."
        elif decided.status == "denied":
            text = f"Denied {decided.tool_name}."
        elif decided.scope == "session":
            text = f"Allowed {decided.tool_name} for this session."
        else:
            text = f"Allowed {decided.tool_name} once."
        await reply(bridge.transport, message, text)
        if decided is not None:
            await self.close_question(decided)
        return "approval"

    async def close_question(self, approval: approvals.Approval) -> None:
        """A question asked with buttons is edited to say how it ended, without them: an edit
        that sends no reply markup takes an inline keyboard off (Telethon's ``buttons=None``
        leaves the field out; its ``buttons=[]`` would build a reply keyboard, not an empty
        inline one)."""
        bridge = self._bridge
        message_id = approvals.question_message(bridge.store, approval.id)
        if message_id is None:
            return
        allowed = approvals.on_timeout(bridge.settings, approval.chat_id) == "allow"
        text = approvals.closed_question_text(approval, allowed_on_timeout=allowed)
        try:
            await bridge.transport.edit_text(SentMessage(approval.chat_id, message_id), text)
        except Exception as exc:  # the decision stands; the stale buttons answer "no question"
            log.info("could not close approval question %s: %s", approval.code, exc)

    def asks_approval(self) -> bool:
        """Runs get the permission prompt tool: approvals are on and approval-tools hosted."""
        bridge = self._bridge
        return (
            bridge.settings.approvals == "on"
            and bridge.tools is not None
            and approvals.SERVER_NAME in bridge.tools.servers
        )

    async def loop(self) -> None:
        """Put each new question to its chat; tell a chat when one went unanswered. Wakes when
        a question is asked or expires in this process (the tools are hosted here), reads the
        store every 20 ms only while a run that may ask is in flight, and backs off on
        failures, logging once per streak."""
        wake, unsubscribe = approvals.waker()
        self.wake = wake
        failures = 0
        try:
            while True:
                wake.clear()
                try:
                    await self.ask_pending()
                except Exception as exc:  # a failed send is retried after a pause
                    failures += 1
                    if failures == 1:
                        log.warning(
                            "approval questions failed (retrying): %s", describe_exception(exc)
                        )
                else:
                    if failures:
                        log.info("approval questions work again after %d failures", failures)
                    failures = 0
                if failures:
                    pause: float | None = min(
                        APPROVALS_MAX_BACKOFF_SECONDS, APPROVALS_POLL_SECONDS * 2**failures
                    )
                elif self._bridge._running and self.asks_approval():
                    pause = APPROVALS_POLL_SECONDS
                else:
                    pause = None  # nothing can ask until a run starts (it wakes us)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), pause)
        finally:
            unsubscribe()
            self.wake = None

    async def ask_pending(self) -> int:
        """Ask every unasked question and report every unanswered one; returns how many."""
        bridge = self._bridge
        timeout = bridge.settings.approval_timeout_seconds
        done = 0
        buttons = buttons_of(bridge.transport)
        for approval in approvals.unasked(bridge.store):
            asked_with: int | None = None  # the message whose buttons go once it is decided
            if buttons is not None:  # a bot: Allow once / Allow for this session / Deny
                sent = await buttons.send_buttons(
                    approval.chat_id,
                    approvals.question_text(approval, timeout, buttons=True),
                    approval_buttons(approval.code),
                )
                asked_with = sent.message_id
            else:
                await bridge.transport.send_text(
                    approval.chat_id, approvals.question_text(approval, timeout)
                )
            approvals.mark_asked(bridge.store, approval.id, asked_with)
            done += 1
        for approval in approvals.expired_untold(bridge.store):
            allowed = approvals.on_timeout(bridge.settings, approval.chat_id) == "allow"
            meaning = "allowed" if allowed else "denied"
            await bridge.transport.send_text(
                approval.chat_id,
                f"No answer about {approval.tool_name} ({approval.code}) within {timeout:.0f} s: "
                f"{meaning}.",
            )
            approvals.mark_told(bridge.store, approval.id)
            await self.close_question(approval)
            done += 1
        return done
