"""Messages for a chat that arise outside a conversation turn (promise results, alerts).

Any process (the daemon, a promise worker, a server) calls ``enqueue_outbound``; the bridge, the
only process connected to Telegram, delivers pending rows in order and marks them sent. A row that
keeps failing is marked failed after ``MAX_ATTEMPTS`` so one bad message cannot block a chat.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from servers.core.store import Store, now

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


def pending_outbound(store: Store, limit: int = 50) -> list[OutboundMessage]:
    rows = store.query(
        "SELECT id, chat_id, text, files, reply_to, source, attempts FROM bridge_outbox "
        "WHERE status = 'pending' ORDER BY id LIMIT ?",
        (int(limit),),
    )
    return [
        OutboundMessage(
            row["id"],
            row["chat_id"],
            row["text"],
            tuple(Path(p) for p in json.loads(row["files"])),
            row["reply_to"],
            row["source"],
            row["attempts"],
        )
        for row in rows
    ]


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
