"""`valor history import`: Telegram Desktop exports and JSON lines into the store, idempotently."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from scheduler.cli import app
from servers.core import history
from servers.core.history_import import ImportFileError, import_file, read_messages

CHAT = {
    "name": "Deploy crew",
    "type": "private_supergroup",
    "id": 1234567890,
    "messages": [
        {
            "id": 1,
            "type": "service",
            "date": "2026-01-02T10:00:00",
            "date_unixtime": "1767348000",
            "actor": "Alice",
            "actor_id": "user11",
            "action": "create_group",
            "title": "Deploy crew",
            "members": ["Alice", "Bob"],
            "text": "",
        },
        {
            "id": 2,
            "type": "message",
            "date": "2026-01-02T10:01:00",
            "date_unixtime": "1767348060",
            "from": "Alice",
            "from_id": "user11",
            "text": [
                "We decided to move billing to ",
                {"type": "bold", "text": "Postgres"},
                " — notes at ",
                {"type": "text_link", "text": "the wiki", "href": "https://wiki.example/billing"},
            ],
            "text_entities": [],
        },
        {
            "id": 3,
            "type": "message",
            "date_unixtime": "1767348120",
            "from": "Bob",
            "from_id": "user22",
            "photo": "photos/photo_1@02-01-2026_10-02-00.jpg",
            "width": 800,
            "height": 600,
            "text": "the dashboard after the fix",
        },
        {
            "id": 4,
            "type": "message",
            "date_unixtime": "1767348180",
            "from": "Bob",
            "from_id": "user22",
            "file": "voice_messages/audio_1.ogg",
            "media_type": "voice_message",
            "duration_seconds": 4,
            "text": "",
        },
        {
            "id": 5,
            "type": "message",
            "date_unixtime": "1767348240",
            "from": "Alice",
            "from_id": "user11",
            "forwarded_from": "Ops bot",
            "text": "Error: ticket INC-4471 opened for the gateway",
        },
        {
            "id": 6,
            "type": "message",
            "date_unixtime": "1767348300",
            "from": None,
            "text": "a message from a deleted account",
        },
    ],
}
MARKED_ID = -1001234567890  # a supergroup's id as the bridge (Telethon) records it


@pytest.fixture
def export_file(tmp_path):
    path = tmp_path / "result.json"
    path.write_text(json.dumps(CHAT, ensure_ascii=False), encoding="utf-8")
    return path


def stored(store, chat_id=MARKED_ID):
    rows = store.query(
        "SELECT message_id, sender, sender_id, text, sent_at FROM messages WHERE chat_id = ? "
        "ORDER BY message_id",
        (chat_id,),
    )
    return {row["message_id"]: dict(row) for row in rows}


def test_a_telegram_desktop_export_is_imported_with_its_shapes(store, export_file):
    result = import_file(store, export_file)
    assert (result.format, result.chats, result.messages, result.added) == (
        "telegram-desktop",
        1,
        6,
        6,
    )
    rows = stored(store)
    assert rows[1]["text"] == "[service: create group: Deploy crew; Alice, Bob]"
    assert rows[1]["sender"] == "Alice"
    assert rows[2]["text"] == (
        "We decided to move billing to Postgres — notes at the wiki (https://wiki.example/billing)"
    )
    assert rows[2]["sender_id"] == 11 and rows[2]["sent_at"] == 1767348060
    assert rows[3]["text"] == "[photo] the dashboard after the fix"
    assert rows[4]["text"] == "[voice message, 4 s]"
    assert (
        rows[5]["text"] == "[forwarded from Ops bot] Error: ticket INC-4471 opened for the gateway"
    )
    assert rows[6]["sender"] == ""
    # searchable at once, through the same index the bridge's messages use
    hits = history.search_history(store, "postgres", MARKED_ID)
    assert [hit["message_id"] for hit in hits] == [2]
    # and the chat memory learned from the import: the decision and the error are critical
    memory = store.query(
        "SELECT message_id, priority, text FROM chat_memory WHERE chat_id = ?", (MARKED_ID,)
    )
    facts = {row["message_id"]: (row["priority"], row["text"]) for row in memory}
    assert facts[2][0] == 0 and "Postgres" in facts[2][1]
    assert facts[5][0] == 0 and "INC-4471" in facts[5][1]
    assert result.memory_items == len(memory)


def test_importing_twice_adds_nothing(store, export_file):
    import_file(store, export_file)
    before = store.query("SELECT count(*) FROM messages")[0][0]
    memory_before = store.query("SELECT count(*), sum(mentions) FROM chat_memory")[0]
    again = import_file(store, export_file)
    assert again.added == 0
    assert store.query("SELECT count(*) FROM messages")[0][0] == before
    assert tuple(store.query("SELECT count(*), sum(mentions) FROM chat_memory")[0]) == tuple(
        memory_before
    )
    assert store.query("SELECT count(*) FROM messages_fts")[0][0] == before


def test_a_full_export_and_json_lines(store, tmp_path):
    personal = {"name": "Carol", "type": "personal_chat", "id": 77, "messages": [
        {"id": 9, "type": "message", "date_unixtime": "1767348000", "from": "Carol",
         "text": "hi"},
    ]}  # fmt: skip
    group = {"name": "Old group", "type": "private_group", "id": 55, "messages": [
        {"id": 1, "type": "message", "date": "2025-05-01T08:00:00", "from": "Dan", "text": "yo"},
    ]}  # fmt: skip
    full = {
        "about": "…",
        "chats": {"about": "…", "list": [personal]},
        "left_chats": {"list": [group]},
    }
    path = tmp_path / "full.json"
    path.write_text(json.dumps(full))
    result = import_file(store, path)
    assert (result.chats, result.added) == (2, 2)
    assert stored(store, 77)[9]["text"] == "hi" and stored(store, -55)[1]["text"] == "yo"

    lines = tmp_path / "messages.jsonl"
    lines.write_text(
        json.dumps({"chat_id": 3, "message_id": 1, "sender": "eve", "date": 1767000000,
                    "text": "the key is in /etc/valor/key.pem"}) + "\n\n"
        + json.dumps({"chat_id": 3, "message_id": 2, "sender": "Valor", "direction": "out",
                      "date": "2026-01-01T00:00:00+00:00", "text": "noted"}) + "\n"
    )  # fmt: skip
    result = import_file(store, lines)
    assert (result.format, result.added) == ("json-lines", 2)
    rows = stored(store, 3)
    assert rows[2]["sent_at"] == 1767225600


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "the file is empty"),
        ('{"name": "x", "messages": [', "not valid JSON (line 1"),
        ('{"name": "x"}', "not a Telegram Desktop export"),
        ('{"name": "x", "messages": []}', "id must be a whole number (missing)"),
        (
            '{"id": 5, "messages": [{"id": 1, "type": "message", "from": "a", "text": "t"}]}',
            "no date",
        ),
        (
            '{"id": 5, "messages": [{"id": "one", "date_unixtime": "1", "text": "t"}]}',
            "id must be a whole",
        ),
        (
            '{"id": 5, "messages": [{"id": 1, "date_unixtime": "1", "text": [5]}]}',
            "text[0] is neither",
        ),
        ('{"id": 1, "type": "weird_chat", "messages": []}', "unknown chat type 'weird_chat'"),
        ('{"chat_id": 1, "message_id": 1, "date": 1, "text": "ok"}\n{"chat_id": 1}', "line 2"),
        ('{"chat_id": 1, "message_id": 1, "date": 1, "text": "ok"}\n{oops', "line 2: not valid"),
        ('{"chat_id": 1, "message_id": 1, "date": "soon", "text": "x"}', "neither Unix seconds"),
    ],
)
def test_a_malformed_file_is_refused_by_name_and_nothing_is_written(
    store, tmp_path, export_file, content, expected
):
    import_file(store, export_file)  # what is there already must stay exactly as it is
    before = store.query("SELECT count(*) FROM messages")[0][0]
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ImportFileError) as caught:
        read_messages(path)
    assert expected in str(caught.value) and str(path) in str(caught.value)
    with pytest.raises(ImportFileError):
        import_file(store, path)
    assert store.query("SELECT count(*) FROM messages")[0][0] == before


def test_a_bad_message_late_in_a_good_file_writes_nothing(store, tmp_path):
    chat = {**CHAT, "messages": [*CHAT["messages"], {"id": 7, "type": "message", "text": "x"}]}
    path = tmp_path / "result.json"
    path.write_text(json.dumps(chat))
    with pytest.raises(ImportFileError, match=r"chat\.messages\[6\]: no date"):
        import_file(store, path)
    assert store.query("SELECT count(*) FROM messages")[0][0] == 0
    assert store.query("SELECT count(*) FROM chat_memory")[0][0] == 0


def test_a_failure_while_writing_rolls_the_whole_import_back(store, export_file, monkeypatch):
    calls = []
    original = history.write_rows

    def fail_on_second_batch(conn, rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise OSError("disk full")
        return original(conn, rows)

    monkeypatch.setattr(history, "write_rows", fail_on_second_batch)
    with pytest.raises(OSError):
        import_file(store, export_file, batch=3)
    assert store.query("SELECT count(*) FROM messages")[0][0] == 0


def test_the_cli_imports_with_progress_and_refuses_bad_files(store, export_file, tmp_path):
    runner = CliRunner()
    first = runner.invoke(app, ["history", "import", str(export_file)])
    assert first.exit_code == 0, first.output
    assert "Imported 6 new of 6 messages" in first.output
    again = runner.invoke(app, ["history", "import", str(export_file)])
    assert "Imported 0 new of 6 messages" in again.output
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    refused = runner.invoke(app, ["history", "import", str(bad)])
    assert refused.exit_code == 1
    assert "not a Telegram Desktop export" in refused.output
    assert "Nothing was imported" in refused.output
    missing = runner.invoke(app, ["history", "import", str(tmp_path / "nope.json")])
    assert missing.exit_code == 1 and "no such file" in missing.output
