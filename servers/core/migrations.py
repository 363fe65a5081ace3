"""Versioned schema migrations, applied in order by ``Store.migrate``.

Each version is a list of statements run in one transaction. Versions are never edited once
landed; a change is a new version. Reserved numbers keep parallel work from colliding:
1 foundation (messages, processes), 2 links (social-tools), 3 tool calls and Claude Code sessions
(monitoring), 4 bridge (inbox, chat sessions, outbox), 5 daemon (daydream sessions, promises),
6 issued bearer tokens (auth), 7 approvals, 8 chat memory.
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
        # chat's posting list instead of filtering every match afterwards. New rows are indexed
        # set-wise by history.record_messages (3x the rate of a per-row insert trigger), so
        # messages are only ever inserted through it; deletes and edits use triggers.
        # Prefix indexes keep short prefix* queries from merging thousands of term lists.
        """
        CREATE VIRTUAL TABLE messages_fts USING fts5(
            text, chat_key, content='messages', content_rowid='id',
            tokenize='unicode61 remove_diacritics 2', prefix='2 3 4'
        )
        """,
        # Merge index segments in larger steps: ~25 % faster bulk ingest, searches unchanged.
        "INSERT INTO messages_fts (messages_fts, rank) VALUES ('automerge', 8)",
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
    # 2: links saved by social-tools (save_link / search_links), with an FTS5 index.
    2: [
        # chat_key is 'c<chat id>' or 'none' (an operator's own links): NOT NULL so that
        # UNIQUE (chat_key, url) makes saving the same URL twice an update.
        """
        CREATE TABLE links (
            id INTEGER PRIMARY KEY,
            url TEXT NOT NULL,
            final_url TEXT NOT NULL,
            chat_id INTEGER,
            chat_key TEXT NOT NULL,
            title TEXT NOT NULL DEFAULT '',
            summary TEXT NOT NULL DEFAULT '',
            tags TEXT NOT NULL DEFAULT '',
            summary_source TEXT NOT NULL DEFAULT 'extractive',
            saved_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            UNIQUE (chat_key, url)
        )
        """,
        """
        CREATE VIRTUAL TABLE links_fts USING fts5(
            title, summary, tags, url, chat_key, content='links', content_rowid='id',
            tokenize='unicode61 remove_diacritics 2'
        )
        """,
        """
        CREATE TRIGGER links_ai AFTER INSERT ON links BEGIN
            INSERT INTO links_fts (rowid, title, summary, tags, url, chat_key)
            VALUES (new.id, new.title, new.summary, new.tags, new.url, new.chat_key);
        END
        """,
        """
        CREATE TRIGGER links_ad AFTER DELETE ON links BEGIN
            INSERT INTO links_fts (links_fts, rowid, title, summary, tags, url, chat_key)
            VALUES ('delete', old.id, old.title, old.summary, old.tags, old.url, old.chat_key);
        END
        """,
        """
        CREATE TRIGGER links_au AFTER UPDATE ON links BEGIN
            INSERT INTO links_fts (links_fts, rowid, title, summary, tags, url, chat_key)
            VALUES ('delete', old.id, old.title, old.summary, old.tags, old.url, old.chat_key);
            INSERT INTO links_fts (rowid, title, summary, tags, url, chat_key)
            VALUES (new.id, new.title, new.summary, new.tags, new.url, new.chat_key);
        END
        """,
    ],
    # 3: monitoring: tool calls recorded by the PostToolUse hook, and the Claude Code
    # sessions the SessionStart / SessionEnd hooks register.
    3: [
        """
        CREATE TABLE tool_calls (
            id INTEGER PRIMARY KEY,
            session_id TEXT NOT NULL DEFAULT '',
            server TEXT NOT NULL,
            tool TEXT NOT NULL,
            success INTEGER NOT NULL CHECK (success IN (0, 1)),
            duration_ms REAL,
            error TEXT,
            chat_id INTEGER,
            called_at REAL NOT NULL
        )
        """,
        "CREATE INDEX tool_calls_by_time ON tool_calls (called_at)",
        """
        CREATE TABLE claude_sessions (
            session_id TEXT PRIMARY KEY,
            launched_by TEXT NOT NULL DEFAULT 'interactive',
            chat_id INTEGER,
            pid INTEGER,
            create_time REAL,
            cwd TEXT NOT NULL DEFAULT '',
            source TEXT NOT NULL DEFAULT '',
            started_at REAL NOT NULL,
            ended_at REAL,
            end_reason TEXT
        )
        """,
        "CREATE INDEX claude_sessions_open ON claude_sessions (ended_at)",
    ],
    # 4: the bridge: inbox (nothing lost, answered once), chat sessions, outbox.
    4: [
        """
        CREATE TABLE bridge_inbox (
            id INTEGER PRIMARY KEY,
            chat_id INTEGER NOT NULL,
            message_id INTEGER NOT NULL,
            sender_id INTEGER,
            sender_name TEXT NOT NULL DEFAULT '',
            text TEXT NOT NULL,
            sent_at REAL NOT NULL,
            is_group INTEGER NOT NULL DEFAULT 0,
            media_paths TEXT NOT NULL DEFAULT '[]',
            status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN
                ('pending', 'running', 'done', 'failed', 'cancelled', 'command')),
            attempts INTEGER NOT NULL DEFAULT 0,
            received_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            error TEXT,
            UNIQUE (chat_id, message_id)
        )
        """,
        "CREATE INDEX bridge_inbox_open ON bridge_inbox (status, id)",
        """
        CREATE TABLE chat_sessions (
            chat_id INTEGER PRIMARY KEY,
            session_id TEXT,
            updated_at REAL NOT NULL,
            last_cost_usd REAL,
            last_duration_ms REAL,
            total_cost_usd REAL NOT NULL DEFAULT 0
        )
        """,
        # Messages for a chat produced outside a conversation turn (promise results, alerts).
        """
        CREATE TABLE bridge_outbox (
            id INTEGER PRIMARY KEY,
            chat_id INTEGER NOT NULL,
            text TEXT NOT NULL,
            files TEXT NOT NULL DEFAULT '[]',
            reply_to INTEGER,
            source TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            created_at REAL NOT NULL,
            sent_at REAL
        )
        """,
        "CREATE INDEX bridge_outbox_pending ON bridge_outbox (status, id)",
    ],
    # 5: the daemon: daydream sessions and the promise queue's states.
    5: [
        """
        CREATE TABLE daydream_sessions (
            id TEXT PRIMARY KEY,
            started_at REAL NOT NULL,
            finished_at REAL,
            status TEXT NOT NULL
                CHECK (status IN ('running', 'completed', 'skipped', 'failed', 'interrupted')),
            dry_run INTEGER NOT NULL DEFAULT 0,
            skip_reason TEXT,
            analysis_status TEXT,
            phases TEXT NOT NULL DEFAULT '[]',
            insights_path TEXT,
            summary TEXT NOT NULL DEFAULT ''
        )
        """,
        "CREATE INDEX daydream_sessions_by_time ON daydream_sessions (started_at)",
        # A promise's state lives here; the task queue (huey) only carries the promise id.
        """
        CREATE TABLE promises (
            id INTEGER PRIMARY KEY,
            description TEXT NOT NULL,
            kind TEXT NOT NULL,
            chat_id INTEGER,
            status TEXT NOT NULL CHECK (status IN
                ('waiting', 'pending', 'running', 'completed', 'failed', 'cancelled')),
            task_id TEXT,
            result TEXT,
            error TEXT,
            worker_host TEXT,
            worker_pid INTEGER,
            worker_create_time REAL,
            recoveries INTEGER NOT NULL DEFAULT 0,
            delivery TEXT,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            updated_at REAL NOT NULL
        )
        """,
        "CREATE INDEX promises_by_status ON promises (status, created_at)",
    ],
    # 6: bearer tokens minted by `valor token create`, so they can be listed and revoked (the
    # host looks a token's id up here on every request). Per-run tokens are not recorded.
    6: [
        """
        CREATE TABLE issued_tokens (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            chat_id INTEGER,
            scopes TEXT NOT NULL DEFAULT '[]',
            name TEXT,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            revoked_at REAL
        ) WITHOUT ROWID
        """,
    ],
    # 7: approvals: each question a run asked its chat (who answered what, when) and the
    # "allow for this session" grants, ended when the chat starts a new session.
    7: [
        """
        CREATE TABLE approvals (
            id INTEGER PRIMARY KEY,
            code TEXT NOT NULL UNIQUE,
            chat_id INTEGER NOT NULL,
            tool_name TEXT NOT NULL,
            input_preview TEXT NOT NULL DEFAULT '',
            tool_use_id TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL CHECK (status IN ('pending', 'allowed', 'denied', 'expired')),
            decided_by INTEGER,
            decided_by_name TEXT NOT NULL DEFAULT '',
            scope TEXT NOT NULL DEFAULT '' CHECK (scope IN ('', 'once', 'session', 'policy')),
            reason TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            asked_at REAL,
            decided_at REAL,
            told_at REAL
        )
        """,
        "CREATE INDEX approvals_open ON approvals (status, asked_at)",
        "CREATE INDEX approvals_by_chat ON approvals (chat_id, created_at)",
        """
        CREATE TABLE approval_grants (
            id INTEGER PRIMARY KEY,
            chat_id INTEGER NOT NULL,
            tool_name TEXT NOT NULL,
            approval_id INTEGER NOT NULL REFERENCES approvals (id),
            created_at REAL NOT NULL,
            ended_at REAL
        )
        """,
        "CREATE INDEX approval_grants_live ON approval_grants (chat_id, tool_name, ended_at)",
    ],
    # 8: chat memory: the facts of a chat's whole history (decisions, ids, names, paths,
    # questions), extracted as messages are recorded, one row per distinct fact, each pointing
    # at the newest message that stated it (servers/core/chat_memory.py).
    8: [
        """
        CREATE TABLE chat_memory (
            id INTEGER PRIMARY KEY,
            chat_id INTEGER NOT NULL,
            message_id INTEGER NOT NULL,
            sent_at REAL NOT NULL,
            priority INTEGER NOT NULL,
            sender TEXT NOT NULL DEFAULT '',
            text TEXT NOT NULL,
            fact_key TEXT NOT NULL,
            mentions INTEGER NOT NULL DEFAULT 1,
            UNIQUE (chat_id, fact_key)
        )
        """,
        "CREATE INDEX chat_memory_ranked ON chat_memory (chat_id, priority, sent_at DESC)",
    ],
    # 9: spending: each bridge run's cost with its time (daily windows per chat and overall),
    # the warnings already sent per window, and messages held back by a spending cap (still
    # open in the inbox; released when the window resets or the cap is raised).
    9: [
        """
        CREATE TABLE spending (
            id INTEGER PRIMARY KEY,
            chat_id INTEGER NOT NULL,
            cost_usd REAL NOT NULL,
            session_id TEXT,
            inbox_id INTEGER,
            recorded_at REAL NOT NULL
        )
        """,
        "CREATE INDEX spending_by_time ON spending (recorded_at)",
        "CREATE INDEX spending_by_chat ON spending (chat_id, recorded_at)",
        """
        CREATE TABLE spending_warnings (
            chat_id INTEGER NOT NULL,
            cap TEXT NOT NULL,
            day TEXT NOT NULL,
            sent_at REAL NOT NULL,
            PRIMARY KEY (chat_id, cap, day)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE spending_holds (
            inbox_id INTEGER PRIMARY KEY,
            chat_id INTEGER NOT NULL,
            reason TEXT NOT NULL,
            held_at REAL NOT NULL
        )
        """,
    ],
    # 10: the answer each inbox row is delivering and how much of it went out (parts, their
    # message ids, files), so a bridge stopped between parts sends only the missing ones.
    10: [
        """
        CREATE TABLE bridge_deliveries (
            inbox_id INTEGER PRIMARY KEY,
            answer TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('done', 'failed', 'cancelled')),
            error TEXT,
            files TEXT NOT NULL DEFAULT '[]',
            parts_sent INTEGER NOT NULL DEFAULT 0,
            message_ids TEXT NOT NULL DEFAULT '[]',
            files_sent TEXT NOT NULL DEFAULT '[]',
            updated_at REAL NOT NULL
        )
        """,
    ],
    # 11: forum topics. A topic is its own conversation: the inbox row keeps its topic (a
    # recovered row still answers there), sessions are keyed by chat and topic (0: the chat
    # itself, the General topic; SQLite keys cannot hold NULL as a value), and history rows
    # carry their topic so a search or the context block can be scoped to one.
    11: [
        "ALTER TABLE bridge_inbox ADD COLUMN topic_id INTEGER",
        """
        CREATE TABLE chat_sessions_by_topic (
            chat_id INTEGER NOT NULL,
            topic_id INTEGER NOT NULL DEFAULT 0,
            session_id TEXT,
            updated_at REAL NOT NULL,
            last_cost_usd REAL,
            last_duration_ms REAL,
            total_cost_usd REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (chat_id, topic_id)
        )
        """,
        """
        INSERT INTO chat_sessions_by_topic (chat_id, topic_id, session_id, updated_at,
            last_cost_usd, last_duration_ms, total_cost_usd)
        SELECT chat_id, 0, session_id, updated_at, last_cost_usd, last_duration_ms,
            total_cost_usd FROM chat_sessions
        """,
        "DROP TABLE chat_sessions",
        "ALTER TABLE chat_sessions_by_topic RENAME TO chat_sessions",
        "ALTER TABLE messages ADD COLUMN topic_id INTEGER",
        "CREATE INDEX messages_by_topic_time ON messages (chat_id, topic_id, sent_at)",
    ],
    # 12: the chat message that asked an approval question with buttons, so the buttons can be
    # taken off once it is decided or has timed out.
    12: [
        "ALTER TABLE approvals ADD COLUMN question_message_id INTEGER",
    ],
    # 13: daily spending caps the operator set while the bridge runs (`valor budget set`);
    # a row overrides its setting (usd NULL: no cap), no row: the setting holds.
    13: [
        """
        CREATE TABLE spending_caps (
            cap TEXT PRIMARY KEY,
            usd REAL,
            set_at REAL NOT NULL
        ) WITHOUT ROWID
        """,
    ],
}
