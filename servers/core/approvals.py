"""Approvals: a bridge run asks its chat before using a tool it was not allowed up front.

Claude Code calls approval-tools' ``approve_tool_use`` (``--permission-prompt-tool``) with
``{tool_name, input, tool_use_id}``. The policy answers at once when it can (never-ask tools,
Valor's read-only tools, always-deny tools, a live "allow for this session" grant); otherwise a
pending row goes into ``approvals`` with a short code, the bridge (which polls for unasked rows)
puts the question to the chat, and an allowlisted user's ``yes CODE`` / ``no CODE`` /
``always CODE`` decides it. The tool process and the bridge may be different processes (the
daemon hosts the tools): the store is the only thing they share. Every decision is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from servers.core.errors import redact
from servers.core.store import Store, now

if TYPE_CHECKING:
    from servers.core.settings import Settings

SERVER_NAME = "approval-tools"
TOOL_NAME = "approve_tool_use"
PROMPT_TOOL = f"mcp__{SERVER_NAME}__{TOOL_NAME}"
CODE_ALPHABET = "abcdefghijkmnpqrstuvwxyz"  # no l/o: easy to read back and type on a phone
CODE_LENGTH = 5
PREVIEW_CHARS = 300
POLL_SECONDS = 0.02  # the tool's wait for an answer: a row read per tick, well under 50 ms
ANSWER_RE = re.compile(r"^\s*(yes|y|allow|no|n|deny|always|session)\s+([a-z]{5})\s*$", re.I)
ALLOW_WORDS = {"yes", "y", "allow"}
SESSION_WORDS = {"always", "session"}

# Callbacks run when a question is asked, answered or expires in this process: the bridge and
# a waiting tool wake at once instead of polling the store (which stays the source of truth,
# and is still polled while a run may ask from another process). A callback must be cheap and
# thread-safe (``loop.call_soon_threadsafe(event.set)``).
_listeners: set[Callable[[], None]] = set()


def on_change(callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` whenever an approval row changes here; returns the unsubscribe."""
    _listeners.add(callback)
    return lambda: _listeners.discard(callback)


def _changed() -> None:
    for callback in list(_listeners):
        try:
            callback()
        except RuntimeError:  # its event loop has closed: that listener is gone
            _listeners.discard(callback)


def waker() -> tuple[asyncio.Event, Callable[[], None]]:
    """An event set on every change (from any thread), and the unsubscribe."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    return event, on_change(lambda: loop.call_soon_threadsafe(event.set))


@dataclass(frozen=True)
class Approval:
    id: int
    code: str
    chat_id: int
    tool_name: str
    input_preview: str
    status: str
    scope: str
    reason: str
    decided_by: int | None
    decided_by_name: str


@dataclass(frozen=True)
class Answer:
    """A person's reply to a question: allow (once or for the session) or deny, by code."""

    allow: bool
    session: bool
    code: str


def parse_answer(text: str) -> Answer | None:
    """``yes abcde`` / ``no abcde`` / ``always abcde`` → an Answer; anything else → None."""
    match = ANSWER_RE.match(text)
    if match is None:
        return None
    word = match.group(1).lower()
    return Answer(
        allow=word in ALLOW_WORDS or word in SESSION_WORDS,
        session=word in SESSION_WORDS,
        code=match.group(2).lower(),
    )


def preview(tool_input: Any, limit: int = PREVIEW_CHARS) -> str:
    """The tool input as a person should see it: one command or compact JSON, secrets masked,
    control characters dropped, cut to ``limit``."""
    if isinstance(tool_input, dict) and isinstance(tool_input.get("command"), str):
        text = tool_input["command"]
    else:
        try:
            text = json.dumps(tool_input, ensure_ascii=False, sort_keys=True)
        except (TypeError, ValueError):
            text = repr(tool_input)
    text = "".join(ch if ch.isprintable() or ch == "\n" else " " for ch in redact(text))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _matches(tool_name: str, patterns: Sequence[str]) -> bool:
    """An exact name, or a prefix ending at a ``__`` boundary (``mcp__notion-tools``)."""
    return any(tool_name == p or tool_name.startswith(p.rstrip("_") + "__") for p in patterns)


def policy(
    settings: Settings,
    tool_name: str,
    read_only: Collection[str] = frozenset(),
    chat_id: int | None = None,
) -> str | None:
    """ "deny" or "allow" when the settings decide without asking, else None. ``read_only``:
    Valor's read-only tools by their Claude Code names (the server module lists them). A
    chat's own lists (``VALOR_APPROVAL_CHAT_POLICIES``) add to the global ones."""
    own = settings.approval_chat_policies.get(chat_id) if chat_id is not None else None
    if _matches(tool_name, [*settings.approval_always_deny, *(own.always_deny if own else ())]):
        return "deny"
    if _matches(tool_name, [*settings.approval_never_ask, *(own.never_ask if own else ())]):
        return "allow"
    if tool_name in read_only:
        return "allow"
    return None


def on_timeout(settings: Settings, chat_id: int) -> str:
    """What no answer means in this chat: its own policy's, else the global setting."""
    own = settings.approval_chat_policies.get(chat_id)
    return (own.on_timeout if own else None) or settings.approval_on_timeout


def has_session_grant(store: Store, chat_id: int, tool_name: str) -> bool:
    rows = store.query(
        "SELECT 1 FROM approval_grants WHERE chat_id = ? AND tool_name = ? AND ended_at IS NULL "
        "LIMIT 1",
        (chat_id, tool_name),
    )
    return bool(rows)


def end_session_grants(store: Store, chat_id: int) -> int:
    """A new session for the chat: "allow for this session" answers stop holding."""
    with store.transaction() as conn:
        cursor = conn.execute(
            "UPDATE approval_grants SET ended_at = ? WHERE chat_id = ? AND ended_at IS NULL",
            (now(), chat_id),
        )
    return cursor.rowcount


def record(
    store: Store,
    chat_id: int,
    tool_name: str,
    tool_input: Any,
    tool_use_id: str = "",
    *,
    status: str = "pending",
    scope: str = "",
    reason: str = "",
) -> Approval:
    """A new approval row (pending, or already decided by policy) with a fresh code."""
    text = preview(tool_input)
    decided_at = None if status == "pending" else now()
    for _ in range(20):  # codes are random; a clash with an old row just draws again
        code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
        with store.transaction() as conn:
            row = conn.execute(
                """
                INSERT INTO approvals (code, chat_id, tool_name, input_preview, tool_use_id,
                                       status, scope, reason, created_at, decided_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (code) DO NOTHING RETURNING id
                """,
                (
                    code,
                    chat_id,
                    tool_name[:200],
                    text,
                    tool_use_id[:200],
                    status,
                    scope,
                    reason,
                    now(),
                    decided_at,
                ),
            ).fetchone()
        if row:
            if status == "pending":
                _changed()
            return get(store, int(row[0]))  # type: ignore[return-value]
    raise RuntimeError("could not draw an unused approval code")


_COLUMNS = (
    "id, code, chat_id, tool_name, input_preview, status, scope, reason, decided_by, "
    "decided_by_name"
)


def _approval(row) -> Approval:
    return Approval(*(row[i] for i in range(10)))


def get(store: Store, approval_id: int) -> Approval | None:
    rows = store.query(f"SELECT {_COLUMNS} FROM approvals WHERE id = ?", (approval_id,))  # noqa: S608
    return _approval(rows[0]) if rows else None


def unasked(store: Store) -> list[Approval]:
    """Pending questions no bridge has put to their chat yet, oldest first."""
    rows = store.query(
        f"SELECT {_COLUMNS} FROM approvals WHERE status = 'pending' AND asked_at IS NULL "  # noqa: S608
        "ORDER BY id"
    )
    return [_approval(row) for row in rows]


def expire_abandoned(store: Store) -> int:
    """On a bridge's start: questions of runs that ended with it are closed, untold (the run
    that asked is gone; its message runs again and asks anew)."""
    moment = now()
    with store.transaction() as conn:
        cursor = conn.execute(
            "UPDATE approvals SET status = 'expired', scope = 'policy', decided_at = ?, "
            "told_at = ?, reason = 'the run that asked ended' WHERE status = 'pending'",
            (moment, moment),
        )
    return cursor.rowcount


def mark_asked(store: Store, approval_id: int, message_id: int | None = None) -> None:
    """The question is in its chat; ``message_id``: the message carrying its buttons."""
    with store.transaction() as conn:
        conn.execute(
            "UPDATE approvals SET asked_at = ?, question_message_id = ? WHERE id = ?",
            (now(), message_id, approval_id),
        )


def question_message(store: Store, approval_id: int) -> int | None:
    """The chat message that asked with buttons (None: asked without, or not asked)."""
    rows = store.query("SELECT question_message_id FROM approvals WHERE id = ?", (approval_id,))
    return rows[0][0] if rows else None


def closed_question_text(approval: Approval, allowed_on_timeout: bool = False) -> str:
    """The question once it is settled: what was asked and how it ended, no buttons."""
    if approval.status == "expired":
        outcome = f"⌛ No answer in time: {'allowed' if allowed_on_timeout else 'denied'}."
    elif approval.status == "denied":
        outcome = f"⛔ Denied by {approval.decided_by_name or 'an allowed user'}."
    elif approval.scope == "session":
        outcome = f"🔁 Allowed for this session by {approval.decided_by_name or 'an allowed user'}."
    else:
        outcome = f"✅ Allowed once by {approval.decided_by_name or 'an allowed user'}."
    return f"🔐 Claude asked to use {approval.tool_name}:\n{approval.input_preview}\n\n{outcome}"


def expired_untold(store: Store) -> list[Approval]:
    """Questions that timed out and whose chat has not been told yet."""
    rows = store.query(
        f"SELECT {_COLUMNS} FROM approvals WHERE status = 'expired' "  # noqa: S608
        "AND told_at IS NULL AND asked_at IS NOT NULL ORDER BY id"
    )
    return [_approval(row) for row in rows]


def mark_told(store: Store, approval_id: int) -> None:
    with store.transaction() as conn:
        conn.execute("UPDATE approvals SET told_at = ? WHERE id = ?", (now(), approval_id))


def decide(
    store: Store,
    chat_id: int,
    answer: Answer,
    user_id: int | None,
    user_name: str,
) -> Approval | None:
    """Apply a person's answer to the chat's pending question with that code. None when there
    is no such pending question in this chat (another chat's code does nothing here)."""
    status = "allowed" if answer.allow else "denied"
    scope = "session" if answer.session else "once"
    with store.transaction() as conn:
        row = conn.execute(
            """
            UPDATE approvals SET status = ?, scope = ?, decided_by = ?, decided_by_name = ?,
                                 decided_at = ?
            WHERE code = ? AND chat_id = ? AND status = 'pending' RETURNING id, tool_name
            """,
            (status, scope, user_id, user_name[:100], now(), answer.code, chat_id),
        ).fetchone()
        if row is None:
            return None
        if answer.allow and answer.session:
            conn.execute(
                "INSERT INTO approval_grants (chat_id, tool_name, approval_id, created_at) "
                "VALUES (?, ?, ?, ?)",
                (chat_id, row[1], row[0], now()),
            )
    _changed()
    return get(store, int(row[0]))


def expire(store: Store, approval_id: int, reason: str) -> Approval:
    """No answer in time: the row is expired, unless an answer won the race (then it is that)."""
    with store.transaction() as conn:
        conn.execute(
            "UPDATE approvals SET status = 'expired', scope = 'policy', reason = ?, "
            "decided_at = ? WHERE id = ? AND status = 'pending'",
            (reason, now(), approval_id),
        )
    _changed()
    return get(store, approval_id)  # type: ignore[return-value]


def question_text(approval: Approval, timeout_seconds: float, *, buttons: bool = False) -> str:
    if buttons:  # a bot's question: the buttons say the rest
        return (
            f"🔐 Claude wants to use {approval.tool_name}:\n{approval.input_preview}\n\n"
            f"Denied after {timeout_seconds:.0f} s without an answer ({approval.code})."
        )
    return (
        f"🔐 Claude wants to use {approval.tool_name}:\n{approval.input_preview}\n\n"
        f"Reply `yes {approval.code}` to allow once, `always {approval.code}` to allow "
        f"{approval.tool_name} for this session, or `no {approval.code}` to deny "
        f"(denied after {timeout_seconds:.0f} s without an answer)."
    )


def history(store: Store, chat_id: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Recent decisions (who, what, when, answer), newest first; every chat's for None."""
    where, params = ("WHERE chat_id = ?", (chat_id,)) if chat_id is not None else ("", ())
    rows = store.query(
        "SELECT id, chat_id, tool_name, input_preview, status, scope, reason, decided_by, "  # noqa: S608
        f"decided_by_name, created_at, decided_at FROM approvals {where} "
        "ORDER BY id DESC LIMIT ?",
        (*params, limit),
    )
    return [dict(row) for row in rows]


# -- the tool's answer to Claude Code -----------------------------------------------------------
def allow_answer(tool_input: Any) -> str:
    # updatedInput is always sent: an allow without it is reported to break some tools.
    return json.dumps({"behavior": "allow", "updatedInput": tool_input})


def deny_answer(message: str) -> str:
    return json.dumps({"behavior": "deny", "message": message})


async def decide_tool_use(
    store: Store,
    settings: Settings,
    chat_id: int | None,
    tool_name: str,
    tool_input: dict[str, Any],
    tool_use_id: str,
    on_wait: Callable[[float], Awaitable[None]] | None = None,
    *,
    read_only: Collection[str] = frozenset(),
    heartbeat_seconds: float = 5.0,
) -> str:
    """The permission prompt tool's whole job: the JSON text Claude Code expects."""
    if chat_id is None:
        return deny_answer(
            f"{tool_name} was not run: this run serves no chat, so there is nobody to ask."
        )
    ruled = policy(settings, tool_name, read_only, chat_id)
    if ruled is not None:
        record(
            store,
            chat_id,
            tool_name,
            tool_input,
            tool_use_id,
            status="allowed" if ruled == "allow" else "denied",
            scope="policy",
            reason="settings",
        )
        if ruled == "allow":
            return allow_answer(tool_input)
        return deny_answer(f"{tool_name} is never allowed in this chat (Valor's settings).")
    if has_session_grant(store, chat_id, tool_name):
        record(
            store,
            chat_id,
            tool_name,
            tool_input,
            tool_use_id,
            status="allowed",
            scope="session",
            reason="allowed for this session earlier",
        )
        return allow_answer(tool_input)
    approval = record(store, chat_id, tool_name, tool_input, tool_use_id)
    decided = await wait_for_decision(
        store, approval.id, settings.approval_timeout_seconds, on_wait, heartbeat_seconds
    )
    if decided.status == "pending":
        meaning = on_timeout(settings, chat_id)
        decided = expire(
            store,
            approval.id,
            f"no answer within {settings.approval_timeout_seconds:.0f} s; "
            f"{meaning} (VALOR_APPROVAL_ON_TIMEOUT)",
        )
        if decided.status == "expired" and meaning == "allow":
            return allow_answer(tool_input)
        if decided.status == "expired":
            return deny_answer(
                f"{tool_name} was not run: nobody in the chat answered the approval question "
                f"within {settings.approval_timeout_seconds:.0f} s. Tell the user, do not retry."
            )
    who = decided.decided_by_name or "the user"
    if decided.status == "allowed":
        return allow_answer(tool_input)
    return deny_answer(
        f"{tool_name} was not run: {who} denied it in the chat. Do not try it again another way; "
        "ask the user what they want instead."
    )


async def wait_for_decision(
    store: Store,
    approval_id: int,
    timeout_seconds: float,
    on_wait: Callable[[float], Awaitable[None]] | None = None,
    heartbeat_seconds: float = 5.0,
) -> Approval:
    """Read the row until it is decided or the timeout passes (then it is still pending): at
    once when an answer arrives in this process, else every ``POLL_SECONDS``."""
    started = time.monotonic()
    next_beat = started + heartbeat_seconds
    changed, unsubscribe = waker()
    try:
        while True:
            changed.clear()
            approval = get(store, approval_id)
            assert approval is not None
            if approval.status != "pending":
                return approval
            moment = time.monotonic()
            if moment - started >= timeout_seconds:
                return approval
            if on_wait is not None and moment >= next_beat:
                next_beat = moment + heartbeat_seconds
                await on_wait(moment - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), POLL_SECONDS)
    finally:
        unsubscribe()
