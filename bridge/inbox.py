"""The bridge's durable state: the inbox (every authorized message, persisted before anything
else) and the Claude Code session each chat resumes.

A message is answered once: (chat_id, message_id) is unique, a redelivered update is a duplicate,
and on restart every row not finished is processed again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bridge.transport import IncomingMessage
from servers.core.store import Store, now

OPEN_STATUSES = ("pending", "running")


@dataclass(frozen=True)
class InboxRow:
    id: int
    chat_id: int
    message_id: int
    sender_id: int | None
    sender_name: str
    text: str
    sent_at: float
    is_group: bool
    media_paths: tuple[Path, ...]
    status: str
    attempts: int
    topic_id: int | None = None  # the forum topic it was written in: answers go there too


def persist_incoming(store: Store, message: IncomingMessage, *, status: str = "pending") -> int:
    """Insert the message; returns its row id, or 0 when it was already there (a duplicate)."""
    with store.transaction() as conn:
        row = conn.execute(
            """
            INSERT INTO bridge_inbox (chat_id, message_id, sender_id, sender_name, text, sent_at,
                                      is_group, media_paths, status, received_at, topic_id)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (chat_id, message_id) DO NOTHING
            RETURNING id
            """,
            (
                message.chat_id,
                message.message_id,
                message.sender_id,
                message.sender_name,
                message.text,
                message.sent_at,
                int(message.is_group),
                json.dumps([str(p) for p in message.media_paths]),
                status,
                now(),
                message.topic_id,
            ),
        ).fetchone()
    return int(row[0]) if row else 0


_COLUMNS = (
    "id, chat_id, message_id, sender_id, sender_name, text, sent_at, is_group, media_paths, "
    "status, attempts, topic_id"
)


def _row(row) -> InboxRow:
    return InboxRow(
        row["id"],
        row["chat_id"],
        row["message_id"],
        row["sender_id"],
        row["sender_name"],
        row["text"],
        row["sent_at"],
        bool(row["is_group"]),
        tuple(Path(p) for p in json.loads(row["media_paths"])),
        row["status"],
        row["attempts"],
        row["topic_id"],
    )


def get_row(store: Store, row_id: int) -> InboxRow | None:
    rows = store.query(f"SELECT {_COLUMNS} FROM bridge_inbox WHERE id = ?", (row_id,))  # noqa: S608
    return _row(rows[0]) if rows else None


def unfinished(store: Store) -> list[InboxRow]:
    """Rows a previous bridge accepted but never finished, oldest first."""
    rows = store.query(
        f"SELECT {_COLUMNS} FROM bridge_inbox WHERE status IN ('pending', 'running') "  # noqa: S608
        "ORDER BY id"
    )
    return [_row(row) for row in rows]


def mark_running(store: Store, row_id: int) -> None:
    with store.transaction() as conn:
        conn.execute(
            "UPDATE bridge_inbox SET status = 'running', attempts = attempts + 1, started_at = ? "
            "WHERE id = ?",
            (now(), row_id),
        )


def mark_finished(store: Store, row_id: int, status: str, error: str | None = None) -> None:
    if status not in ("done", "failed", "cancelled"):
        raise ValueError(f"not a final status: {status!r}")
    with store.transaction() as conn:
        conn.execute(
            "UPDATE bridge_inbox SET status = ?, finished_at = ?, error = ? WHERE id = ?",
            (status, now(), error, row_id),
        )
        # what went out is only needed while the row is open (the answer is in the history)
        conn.execute("DELETE FROM bridge_deliveries WHERE inbox_id = ?", (row_id,))


def _topic_key(topic_id: int | None) -> int:
    """chat_sessions keys a chat without a topic (and its General topic) as topic 0."""
    return int(topic_id or 0)


def session_for(store: Store, chat_id: int, topic_id: int | None = None) -> str | None:
    rows = store.query(
        "SELECT session_id FROM chat_sessions WHERE chat_id = ? AND topic_id = ?",
        (chat_id, _topic_key(topic_id)),
    )
    return rows[0]["session_id"] if rows else None


def save_session(
    store: Store,
    chat_id: int,
    session_id: str | None,
    cost_usd: float,
    duration_ms: float,
    topic_id: int | None = None,
) -> None:
    """The session a chat (or one of its forum topics) resumes next, and the turn's cost."""
    with store.transaction() as conn:
        conn.execute(
            """
            INSERT INTO chat_sessions (chat_id, session_id, updated_at, last_cost_usd,
                                       last_duration_ms, total_cost_usd, topic_id)
            VALUES (?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (chat_id, topic_id) DO UPDATE SET session_id = excluded.session_id,
                updated_at = excluded.updated_at, last_cost_usd = excluded.last_cost_usd,
                last_duration_ms = excluded.last_duration_ms,
                total_cost_usd = chat_sessions.total_cost_usd + excluded.last_cost_usd
            """,
            (chat_id, session_id, now(), cost_usd, duration_ms, cost_usd, _topic_key(topic_id)),
        )


def forget_session(store: Store, chat_id: int, topic_id: int | None = None) -> None:
    """`/new`: the next message starts a fresh Claude Code session (in that topic only)."""
    with store.transaction() as conn:
        conn.execute(
            "UPDATE chat_sessions SET session_id = NULL, updated_at = ? "
            "WHERE chat_id = ? AND topic_id = ?",
            (now(), chat_id, _topic_key(topic_id)),
        )


def last_cost(
    store: Store, chat_id: int, topic_id: int | None = None
) -> tuple[float | None, float]:
    rows = store.query(
        "SELECT last_cost_usd, total_cost_usd FROM chat_sessions "
        "WHERE chat_id = ? AND topic_id = ?",
        (chat_id, _topic_key(topic_id)),
    )
    return (rows[0][0], rows[0][1]) if rows else (None, 0.0)


class DeliveryLog:
    """How far the answer to one inbox row got, kept in the store (``bridge_deliveries``).

    The first ``begin`` fixes the answer (text, files, the row's final status); every part and
    file that goes out is recorded as it goes. A bridge stopped between parts finds the answer
    here on its next start and sends only what is missing, without running Claude Code again.
    """

    def __init__(self, store: Store, inbox_id: int):
        self.store = store
        self.inbox_id = inbox_id
        self.answer: str | None = None
        self.status = "done"
        self.error: str | None = None
        self.files: list[Path] = []
        self.parts_sent = 0
        self.message_ids: list[int] = []
        self.files_sent: list[Path] = []
        self._load()

    def _load(self) -> None:
        rows = self.store.query(
            "SELECT answer, status, error, files, parts_sent, message_ids, files_sent "
            "FROM bridge_deliveries WHERE inbox_id = ?",
            (self.inbox_id,),
        )
        if not rows:
            return
        row = rows[0]
        self.answer, self.status, self.error = row["answer"], row["status"], row["error"]
        self.files = [Path(p) for p in json.loads(row["files"])]
        self.parts_sent = row["parts_sent"]
        self.message_ids = json.loads(row["message_ids"])
        self.files_sent = [Path(p) for p in json.loads(row["files_sent"])]

    def outcome(self, status: str, error: str | None = None) -> None:
        """What the row becomes once the answer is out (set before ``begin``; 'done' unless
        the answer tells of a failure or a stop)."""
        if self.answer is None:
            self.status, self.error = status, error

    def begin(self, answer: str, files: list[Path]) -> tuple[str, list[Path]]:
        """Record the answer about to go out; an answer recorded earlier wins (the chat may
        already hold its first parts). Returns the answer and files to deliver."""
        with self.store.transaction() as conn:
            conn.execute(
                """
                INSERT INTO bridge_deliveries (inbox_id, answer, status, error, files, updated_at)
                VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (inbox_id) DO NOTHING
                """,
                (
                    self.inbox_id,
                    answer,
                    self.status,
                    self.error,
                    json.dumps([str(p) for p in files]),
                    now(),
                ),
            )
        self._load()
        return self.answer or answer, self.files

    def part_sent(self, index: int, message_id: int) -> None:
        self.parts_sent = index + 1
        self.message_ids.append(message_id)
        self._save()

    def file_sent(self, path: Path) -> None:
        self.files_sent.append(path)
        self._save()

    def _save(self) -> None:
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE bridge_deliveries SET parts_sent = ?, message_ids = ?, files_sent = ?, "
                "updated_at = ? WHERE inbox_id = ?",
                (
                    self.parts_sent,
                    json.dumps(self.message_ids),
                    json.dumps([str(p) for p in self.files_sent]),
                    now(),
                    self.inbox_id,
                ),
            )
