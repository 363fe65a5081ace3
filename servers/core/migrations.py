"""Versioned schema migrations, applied in order by ``Store.migrate``.

Each version is a list of statements run in one transaction. Versions are never edited once
landed; a change is a new version. Reserved numbers keep parallel work from colliding:
1 foundation (messages, processes), 2 links (social-tools), 3 tool calls and Claude Code sessions
(monitoring), 4 bridge (inbox, chat sessions, outbox), 5 daemon (daydream sessions, promises).
"""

from __future__ import annotations

MIGRATIONS: dict[int, list[str]] = {
    1: [
        """
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            chat_id INTEGER NOT NULL,
            message_id INTEGER NOT NULL,
            sender TEXT NOT NULL DEFAULT '',
            sender_id INTEGER,
            direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
            text TEXT NOT NULL,
            sent_at REAL NOT NULL,
            chat_key TEXT GENERATED ALWAYS AS ('c' || chat_id) VIRTUAL,
            UNIQUE (chat_id, message_id)
        )
        """,
        "CREATE INDEX messages_by_chat_time ON messages (chat_id, sent_at)",
        # External-content FTS5: text is stored once; chat_key lets a search intersect with the
        # chat's posting list instead of filtering every match afterwards.
        """
        CREATE VIRTUAL TABLE messages_fts USING fts5(
            text, chat_key, content='messages', content_rowid='id',
            tokenize='unicode61 remove_diacritics 2'
        )
        """,
        """
        CREATE TRIGGER messages_ai AFTER INSERT ON messages BEGIN
            INSERT INTO messages_fts (rowid, text, chat_key)
            VALUES (new.id, new.text, new.chat_key);
        END
        """,
        """
        CREATE TRIGGER messages_ad AFTER DELETE ON messages BEGIN
            INSERT INTO messages_fts (messages_fts, rowid, text, chat_key)
            VALUES ('delete', old.id, old.text, old.chat_key);
        END
        """,
        """
        CREATE TRIGGER messages_au AFTER UPDATE OF text ON messages BEGIN
            INSERT INTO messages_fts (messages_fts, rowid, text, chat_key)
            VALUES ('delete', old.id, old.text, old.chat_key);
            INSERT INTO messages_fts (rowid, text, chat_key)
            VALUES (new.id, new.text, new.chat_key);
        END
        """,
        # Every OS process Valor starts, so cleanup can end exactly its own (pid + create time).
        """
        CREATE TABLE processes (
            id INTEGER PRIMARY KEY,
            pid INTEGER NOT NULL,
            create_time REAL NOT NULL,
            kind TEXT NOT NULL,
            command TEXT NOT NULL DEFAULT '',
            chat_id INTEGER,
            started_at REAL NOT NULL,
            ended_at REAL,
            UNIQUE (pid, create_time)
        )
        """,
    ],
}
