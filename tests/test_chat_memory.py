"""Chat memory: facts extracted as messages are recorded, deduplicated, and the context block
built from the memory and the recent turns within the hook's budget."""

from __future__ import annotations

import time

import pytest
from fastmcp import Client

from servers.core import chat_memory, history, tokens
from servers.core.context_markup import HISTORY_HEADING, MEMORY_HEADING
from servers.core.history import Message
from tests.support import configure

CHAT, OTHER = 4242, 777
DAY = 86400


def memory_rows(store, chat=CHAT):
    return [
        dict(row)
        for row in store.query(
            "SELECT message_id, sent_at, priority, text, mentions FROM chat_memory "
            "WHERE chat_id = ? ORDER BY message_id",
            (chat,),
        )
    ]


def independent_count(text: str) -> int:
    """tiktoken's own cl100k_base, not the counter the block was fitted with."""
    return len(tokens.encoding().encode_ordinary(text))


def test_recording_a_message_extracts_its_facts_with_id_and_date(store):
    sent = time.time() - 3 * DAY
    history.record_message(
        store,
        Message(CHAT, 10, "haha nice. We decided to ship on Friday. cool", "ann", 1, "in", sent),
    )
    history.record_message(
        store, Message(CHAT, 11, "Can you check why the deploy hangs?", "ann", 1, "in", sent + 1)
    )
    history.record_message(
        store, Message(CHAT, 12, "The key lives in /etc/valor/key.pem", "Valor", None, "out")
    )
    history.record_message(store, Message(CHAT, 13, "lol ok thanks", "bob", 2, "in", sent + 3))
    rows = memory_rows(store)
    assert [(r["message_id"], r["priority"], r["text"]) for r in rows] == [
        (10, chat_memory.CRITICAL, "We decided to ship on Friday."),
        (11, chat_memory.HIGH, "Can you check why the deploy hangs?"),
        (12, chat_memory.MEDIUM, "The key lives in /etc/valor/key.pem"),
    ]
    assert rows[0]["sent_at"] == sent
    assert memory_rows(store, OTHER) == []


def test_facts_are_deduplicated_and_point_at_the_newest_statement(store):
    now = time.time()
    history.record_messages(
        store,
        [
            Message(CHAT, 1, "The build server is build-07.internal", "ann", 1, "in", now - 50),
            Message(CHAT, 2, "the build server is   build-07.internal!", "bob", 2, "in", now - 40),
        ],
    )
    history.record_message(
        store, Message(CHAT, 3, "Important: the build server is build-07.internal", "ann", 1, "in")
    )
    history.record_message(  # the same message redelivered adds nothing
        store, Message(CHAT, 3, "Important: the build server is build-07.internal", "ann", 1, "in")
    )
    rows = memory_rows(store)
    build = [r for r in rows if "build-07" in r["text"] and "Important" not in r["text"]]
    assert len(build) == 1 and build[0]["message_id"] == 2
    critical = [r for r in rows if r["text"].startswith("Important")]
    assert len(critical) == 1 and critical[0]["priority"] == chat_memory.CRITICAL
    history.record_message(
        store, Message(CHAT, 4, "The build server is build-07.internal.", "cy", 3, "in")
    )
    again = [r for r in memory_rows(store) if r["text"].lower().startswith("the build server")]
    assert len(again) == 1 and again[0]["message_id"] == 4 and again[0]["mentions"] == 2


def seed_long_chat(store, now):
    """An old decision and ids buried in chatter, then a day of recent small talk."""
    old = now - 30 * DAY
    messages = [
        Message(CHAT, k, f"chatter about lunch and the weather, nothing more {'x' * 40}", "bob", 2,
                "in", old + k * 60)
        for k in range(1, 400)
    ]  # fmt: skip
    facts = {
        100: "We decided to move billing to Postgres <fast> & cheap.",
        200: "The incident ticket is INC-55120 for the gateway.",
        300: "Please remember the staging host is stg-eu-3.example.net",
    }
    for k, text in facts.items():
        messages[k - 1] = Message(CHAT, k, text, "ann", 1, "in", old + k * 60)
    messages += [
        Message(CHAT, 1000 + k, f"recent small talk {'i' * k} about the weekend plans " * 3,
                "bob", 2, "in", now - 600 + k)
        for k in range(1, 31)
    ]  # fmt: skip
    history.record_messages(store, messages)
    return facts


@pytest.mark.parametrize("budget", [300, 500, 2000])
def test_the_block_holds_memory_and_recent_turns_within_the_budget(store, budget):
    now = time.time()
    seed_long_chat(store, now)
    block = chat_memory.chat_block(
        store.connection(), CHAT, "ann", 1, max_messages=20, max_tokens=budget
    )
    assert independent_count(block) <= budget
    assert MEMORY_HEADING in block and HISTORY_HEADING in block
    memory, recent = block.split(HISTORY_HEADING)
    # the old facts, escaped, each with its message id and date
    day = time.strftime("%Y-%m-%d", time.gmtime(now - 30 * DAY + 100 * 60))
    assert (
        f"[{day} #100] ann: We decided to move billing to Postgres &lt;fast&gt; &amp; cheap."
        in (memory)
    )
    if budget >= 500:
        assert "#200] ann: The incident ticket is INC-55120" in memory
        assert "stg-eu-3.example.net" in memory
    assert f"recent small talk {'i' * 30} " in recent  # the newest turn is there too
    assert "chatter about lunch" not in block
    assert block.count("</valor-context>") == 1


async def test_the_block_tool_with_no_messages_is_the_hooks_block(store, monkeypatch):
    from servers.context import mcp
    from servers.hooks import chat_context

    seed_long_chat(store, time.time())
    configure(monkeypatch, VALOR_HOOK_CONTEXT_MAX_TOKENS="600", VALOR_HOOK_HISTORY_MESSAGES="8")
    monkeypatch.setenv("VALOR_USER_NAME", "ann")
    monkeypatch.setenv("VALOR_USER_ID", "1")
    hooks_block = chat_context(CHAT)
    async with Client(mcp) as client:
        result = await client.call_tool(
            "build_context_block", {"chat_id": CHAT, "user_name": "ann", "user_id": 1}
        )
    assert result.structured_content["block"] == hooks_block
    assert result.structured_content["tokens"] == independent_count(hooks_block) <= 600
    assert "INC-55120" in hooks_block


def test_rebuild_extracts_what_was_recorded_before_memory_existed(store):
    history.record_message(
        store, Message(CHAT, 1, "The release tag is v2.14.0, decided.", "ann", 1, "in")
    )
    with store.transaction() as conn:
        conn.execute("DELETE FROM chat_memory")
        assert chat_memory.rebuild(conn, CHAT) == 1
        assert chat_memory.rebuild(conn, CHAT) == 1  # again: merged, not duplicated
    rows = memory_rows(store)
    assert len(rows) == 1 and "v2.14.0" in rows[0]["text"]


def test_optimize_context_condenses_facts_before_dropping_any():
    """12 facts in long messages whose summary lines cannot all fit as they are: each is kept
    condensed (its entities verbatim), and the output still fits the budget exactly."""
    from servers.core.context_opt import count_messages, optimize_context
    from servers.core.context_opt.summaries import condense

    filler = "honestly it was just a really long and rambling day, you know, anyway"
    facts = [
        f"By the way Marta Kowalski{k} now owns the gateway-{k} rollout and ticket {900100 + k}"
        for k in range(12)
    ]
    messages = [{"role": "system", "content": "You are Valor."}]
    for k in range(300):
        text = f"{filler}, {facts[k // 25]}, {filler}." if k % 25 == 0 else f"{filler} {k % 7}."
        messages.append({"role": "user" if k % 2 else "assistant", "content": text, "name": "al"})
    messages.append({"role": "user", "content": "Where are we?", "name": "al"})
    condensed_size = tokens.count("\n".join(condense(fact) for fact in facts))
    budget = condensed_size * 2
    result = optimize_context(messages, budget)
    assert independent_count_messages(result.messages) == result.tokens_after <= budget
    assert count_messages(result.messages) == result.tokens_after
    text = "\n".join(str(m["content"]) for m in result.messages)
    for k in range(12):  # every fact's entities survive: the name, the id, the ticket
        assert f"Kowalski{k}" in text and f"gateway-{k}" in text and str(900100 + k) in text


def independent_count_messages(messages: list[dict]) -> int:
    """The budget's rule (text + name + 4 per message) counted with tiktoken itself."""
    return sum(
        independent_count(str(m["content"])) + independent_count(str(m.get("name") or "")) + 4
        for m in messages
    )


def test_the_bridge_hands_claude_the_memory_with_the_recent_turns(store):
    """The bridge's own block (what it writes to VALOR_CONTEXT_BLOCK_FILE): old facts from the
    memory, the recent turns, and not the message being answered (the prompt carries it)."""
    from bridge import inbox
    from bridge.memory import MemoryTransport
    from bridge.pipeline import Bridge

    now = time.time()
    seed_long_chat(store, now)
    asking = "Remember: the on-call phone is +1 555 0100, and we decided on Grafana 11."
    history.record_message(store, Message(CHAT, 5000, asking, "ann", 1, "in", now))
    row = inbox.InboxRow(
        id=1, chat_id=CHAT, message_id=5000, sender_id=1, sender_name="ann", text=asking,
        sent_at=now, is_group=False, media_paths=(), status="pending", attempts=0,
    )  # fmt: skip
    bridge = Bridge(MemoryTransport(), store=store, host_tools=False, persona="")
    block = bridge._context_block(row)
    assert independent_count(block) <= 2000
    memory, recent = block.split(HISTORY_HEADING)
    assert "#100] ann: We decided to move billing to Postgres" in memory
    assert "INC-55120" in memory and "stg-eu-3.example.net" in memory
    assert "Grafana" not in block  # the message being answered is the prompt's, not the block's
    assert f"recent small talk {'i' * 30} " in recent
