"""Messages for a chat that arise outside a conversation turn (promise results, alerts).

Any process (the daemon, a promise worker, a server) calls ``enqueue_outbound``; the bridge, the
only process connected to Telegram, delivers pending rows in order and marks them sent. A row that
keeps failing is marked failed after ``MAX_ATTEMPTS`` so one bad message cannot block a chat.

A row's files leave the machine only when each is a regular file inside that chat's media folder
(``Settings.chat_media_path``; symlinks resolved, opened without following or blocking). Rows are
plain data any writer of the store can add, so this is checked when a row is read for delivery
(``pending_outbound``): a file that fails is dropped, the chat is told in a note on the message,
and the log names the row and the reason, never the file's contents.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from servers.core.media import sendable_file
from servers.core.safe_files import UnsafeFile
from servers.core.store import Store, now

if TYPE_CHECKING:
    from servers.core.settings import Settings

log = logging.getLogger("valor.outbox")

MAX_ATTEMPTS = 5
MAX_TEXT_CHARS = 100_000


@dataclass(frozen=True)
class OutboundMessage:
    id: int
    chat_id: int
    text: str
    files: tuple[Path, ...]
    reply_to: int | None
    source: str
    attempts: int


def enqueue_outbound(
    store: Store,
    chat_id: int,
    text: str,
    files: Sequence[Path | str] = (),
    *,
    reply_to: int | None = None,
    source: str = "",
) -> int:
    """Queue a message for the bridge to send to ``chat_id``; returns the outbox row id."""
    if not text.strip() and not files:
        raise ValueError("an outbound message needs text or files")
    paths = [str(Path(f)) for f in files]
    with store.transaction() as conn:
        row = conn.execute(
            "INSERT INTO bridge_outbox (chat_id, text, files, reply_to, source, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
            (int(chat_id), text[:MAX_TEXT_CHARS], json.dumps(paths), reply_to, source, now()),
        ).fetchone()
    return int(row[0])


def pending_outbound(
    store: Store, limit: int = 50, *, settings: Settings | None = None
) -> list[OutboundMessage]:
    """Pending rows in order, their files confined to each chat's media folder (see above)."""
    from servers.core.settings import get_settings

    settings = settings or get_settings()
    rows = store.query(
        "SELECT id, chat_id, text, files, reply_to, source, attempts FROM bridge_outbox "
        "WHERE status = 'pending' ORDER BY id LIMIT ?",
        (int(limit),),
    )
    messages = []
    for row in rows:
        files, refused = _sendable(row["id"], row["chat_id"], json.loads(row["files"]), settings)
        text = row["text"]
        if refused:
            note = REFUSED_NOTE.format(count=refused, s="" if refused == 1 else "s")
            text = f"{text}\n\n{note}" if text.strip() else note
        messages.append(
            OutboundMessage(
                row["id"],
                row["chat_id"],
                text,
                files,
                row["reply_to"],
                row["source"],
                row["attempts"],
            )
        )
    return messages


REFUSED_NOTE = (
    "({count} attached file{s} could not be sent: only files in this chat's own media folder "
    "can be.)"
)


def _sendable(
    row_id: int, chat_id: int, names: list[str], settings: Settings
) -> tuple[tuple[Path, ...], int]:
    """The row's files that may go to ``chat_id``, and how many were refused."""
    root = settings.chat_media_path(chat_id)
    allowed: list[Path] = []
    refused = 0
    for name in names:
        try:
            path = sendable_file(str(name), root)
        except (UnsafeFile, ValueError, OSError) as exc:
            refused += 1
            reason = str(exc) if isinstance(exc, UnsafeFile) else type(exc).__name__
            log.warning("outbox row %d for chat %s: refused a file (%s)", row_id, chat_id, reason)
            continue
        if path not in allowed:
            allowed.append(path)
    return tuple(allowed), refused


def mark_outbound_sent(store: Store, outbound_id: int) -> None:
    with store.transaction() as conn:
        conn.execute(
            "UPDATE bridge_outbox SET status = 'sent', sent_at = ?, attempts = attempts + 1 "
            "WHERE id = ?",
            (now(), outbound_id),
        )


def mark_outbound_failed(store: Store, outbound_id: int, error: str) -> bool:
    """Count a failed attempt; True when the row gave up (status 'failed')."""
    with store.transaction() as conn:
        row = conn.execute(
            """
            UPDATE bridge_outbox SET attempts = attempts + 1, last_error = ?,
                status = CASE WHEN attempts + 1 >= ? THEN 'failed' ELSE status END
            WHERE id = ? RETURNING status
            """,
            (error[:1000], MAX_ATTEMPTS, outbound_id),
        ).fetchone()
    return row is not None and row[0] == "failed"
