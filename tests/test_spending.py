"""Spending caps: per run (Claude Code's own --max-budget-usd), per chat per day and overall per
day (from each result's cost), a warning at 70 %, refusal past a cap without losing the message,
``/cost``, and monitoring-tools' spend per chat.

The daily caps are tested in process with a stand-in runner that reports a cost (the real part
there is the bridge, the store and the clock window, not the CLI); the per-run cap runs the real
Claude Code CLI against the fake Anthropic API, whose usage makes the cost accrue.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest

from bridge.memory import MemoryTransport, incoming
from bridge.pipeline import Bridge
from servers import load_server
from servers.core import spending
from servers.core.claude_command import ClaudeRun, build_argv
from servers.core.claude_events import ResultEvent
from servers.core.claude_runner import RunOutcome
from servers.core.settings import get_settings
from tests.fakes import Script, ToolUse
from tests.support import call, configure

OWNER = 1
CHAT, OTHER = 4242, 5151
DAY = 24 * 3600


class CostlyRunner:
    """Stands in for ClaudeRunner: every run answers at once, costing ``cost`` dollars (a
    fresh session each time, so the turn's cost is its whole total)."""

    claude_bin = "claude"

    def __init__(self, cost: float):
        self.cost = cost
        self.prompts: list[str] = []

    async def run(self, request: ClaudeRun, on_event, cancel) -> RunOutcome:
        self.prompts.append(request.prompt.rsplit("\n", 1)[-1])
        session = str(uuid.uuid4())
        result = ResultEvent(
            "success", False, "ok", session, self.cost, 1, 5.0, {}, None, (), (), "completed"
        )
        return RunOutcome(
            "ok", text=f"answer {len(self.prompts)}", session_id=session, result=result
        )


@pytest.fixture
def caps(monkeypatch):
    configure(
        monkeypatch,
        VALOR_ALLOWED_USER_IDS=json.dumps([OWNER]),
        VALOR_BUDGET_PER_CHAT_DAY_USD="1.00",
        VALOR_BUDGET_PER_DAY_USD="10.00",
        VALOR_WARM_SESSIONS="off",
    )


def bridge_with(cost: float) -> tuple[Bridge, MemoryTransport, CostlyRunner]:
    transport = MemoryTransport()
    runner = CostlyRunner(cost)
    return Bridge(transport, runner=runner, host_tools=False, persona=""), transport, runner


def texts_in(transport: MemoryTransport, chat: int = CHAT) -> list[str]:
    return [m.text for m in transport.messages_in(chat)]


# -- the parts ----------------------------------------------------------------------------------
def test_a_day_is_a_utc_calendar_day():
    window = spending.Window.containing(1_700_000_000)  # 2023-11-14 22:13 UTC
    assert window.day == "2023-11-14"
    assert window.end - window.start == DAY and window.start <= 1_700_000_000 < window.end
    assert window.resets_at == "2023-11-15 00:00 UTC"


def test_spend_is_counted_per_chat_and_overall_inside_the_window(store):
    today = spending.Window.containing()
    spending.record_spend(store, CHAT, 0.25)
    spending.record_spend(store, CHAT, 0.5)
    spending.record_spend(store, OTHER, 2.0)
    spending.record_spend(store, CHAT, 9.0, at=today.start - 1)  # yesterday
    spending.record_spend(store, CHAT, 0.0)  # a free run is no row
    assert spending.spent(store, today, CHAT) == pytest.approx(0.75)
    assert spending.spent(store, today) == pytest.approx(2.75)
    assert spending.by_chat(store, today) == [(OTHER, 2.0, 1), (CHAT, 0.75, 2)]


def test_runs_pass_the_per_run_cap_to_claude_code():
    argv = build_argv("claude", ClaudeRun(prompt="", max_budget_usd=0.25))
    assert argv[argv.index("--max-budget-usd") + 1] == "0.250000"
    assert "--max-budget-usd" not in build_argv("claude", ClaudeRun(prompt=""))


# -- the bridge: warnings, refusal, nothing lost, /cost ------------------------------------------
async def test_a_chat_is_warned_at_70_percent_once_then_refused_and_nothing_is_lost(
    store, caps, monkeypatch
):
    bridge, transport, runner = bridge_with(0.40)
    async with bridge.serving():
        for n in (1, 2):  # $0.40, then $0.80: past 70 % of the $1.00 chat cap
            await bridge.receive(incoming(CHAT, n, f"message {n}", sender_id=OWNER))
            await asyncio.wait_for(bridge.drain(), 30)
        warnings = [t for t in texts_in(transport) if t.startswith("⚠️")]
        assert warnings == [
            "⚠️ $0.80 of this chat's daily cap ($1.00) spent today (80%); new messages wait "
            "once it is reached."
        ]
        await bridge.receive(incoming(CHAT, 3, "message 3", sender_id=OWNER))  # → $1.20
        await asyncio.wait_for(bridge.drain(), 30)
        assert len([t for t in texts_in(transport) if t.startswith("⚠️")]) == 1  # once a day

        # Past the cap: refused clearly, and the message is kept open.
        await bridge.receive(incoming(CHAT, 4, "message 4", sender_id=OWNER))
        await asyncio.wait_for(bridge.drain(), 30)
        (refusal,) = transport.replies_to(CHAT, 4)
        assert refusal.text.startswith("💸 Spending cap reached: this chat has spent $1.20")
        assert "Your message is kept" in refusal.text and "00:00 UTC" in refusal.text
        assert runner.prompts == ["message 1", "message 2", "message 3"]
        row = store.query("SELECT status FROM bridge_inbox WHERE message_id = 4")[0]
        assert row["status"] == "pending" and spending.held(store) == [(4, CHAT)]
        # Another chat is not held by this chat's cap.
        await bridge.receive(incoming(OTHER, 1, "elsewhere", sender_id=OWNER))
        await asyncio.wait_for(bridge.drain(), 30)
        assert transport.replies_to(OTHER, 1)[0].text == "answer 4"

        # /cost shows the chat's spend and the caps.
        await bridge.receive(incoming(CHAT, 5, "/cost", sender_id=OWNER))
        cost = transport.replies_to(CHAT, 5)[0].text
        assert "$1.2000 in this chat, cap $1.00 (120% used)" in cost
        assert "All chats today: $1.6000, cap $10.00 (16% used)" in cost
        assert "Per reply: no cap." in cost

        # Still capped: releasing keeps it held, and it is not told twice.
        assert bridge.release_held() == 0

        # The day resets (the spend moves to yesterday): the held message is answered, before
        # a message that arrives afterwards.
        with store.transaction() as conn:
            conn.execute("UPDATE spending SET recorded_at = recorded_at - ?", (DAY,))
        await bridge.receive(incoming(CHAT, 6, "message 6", sender_id=OWNER))
        await transport.wait_for(lambda: len(transport.replies_to(CHAT, 4)) == 2)
        await asyncio.wait_for(bridge.drain(), 30)
    assert [m.text for m in transport.replies_to(CHAT, 4)] == [refusal.text, "answer 5"]
    assert [m.text for m in transport.replies_to(CHAT, 6)] == ["answer 6"]
    assert runner.prompts[-2:] == ["message 4", "message 6"]
    assert store.query("SELECT status FROM bridge_inbox WHERE message_id = 4")[0][0] == "done"
    assert spending.held(store) == []


async def test_a_held_message_survives_a_restart_and_runs_when_the_cap_is_raised(
    store, caps, monkeypatch
):
    spending.record_spend(store, OTHER, 10.0)  # every chat together is at the $10 daily cap
    bridge, transport, runner = bridge_with(0.10)
    async with bridge.serving():
        await bridge.receive(incoming(CHAT, 1, "please", sender_id=OWNER))
        await asyncio.wait_for(bridge.drain(), 30)
    (refusal,) = transport.replies_to(CHAT, 1)
    assert "all chats together have spent $10.00 today, the daily cap is $10.00" in refusal.text
    assert runner.prompts == []

    # The operator raises the cap and restarts the bridge: the kept message is answered.
    configure(monkeypatch, VALOR_BUDGET_PER_DAY_USD="20")
    bridge, transport, runner = bridge_with(0.10)
    async with bridge.serving():
        await asyncio.wait_for(bridge.drain(), 30)
    assert runner.prompts == ["please"]
    assert [m.text for m in transport.replies_to(CHAT, 1)] == ["answer 1"]


async def test_monitoring_reports_spend_per_chat(store, monkeypatch):
    configure(monkeypatch, VALOR_BUDGET_PER_CHAT_DAY_USD="2", VALOR_BUDGET_PER_DAY_USD="5")
    spending.record_spend(store, CHAT, 0.5)
    spending.record_spend(store, CHAT, 1.0)
    spending.record_spend(store, OTHER, 0.25)
    spending.record_spend(store, OTHER, 3.0, at=time.time() - 2 * DAY)
    result = await call(load_server("monitoring-tools"), "spending_report", {})
    report = result.structured_content
    assert report["total_usd"] == pytest.approx(1.75)
    assert report["caps"] == {"per_run_usd": None, "per_chat_day_usd": 2.0, "per_day_usd": 5.0}
    assert [(c["chat_id"], c["spent_usd"], c["runs"]) for c in report["chats"]] == [
        (CHAT, 1.5, 2),
        (OTHER, 0.25, 1),
    ]
    assert report["chats"][0]["share_of_cap"] == pytest.approx(0.75)


# -- end to end: Claude Code's own per-run limit ------------------------------------------------
@pytest.mark.e2e
async def test_a_run_over_the_per_run_cap_is_stopped_by_claude_code_and_reported(
    store, claude_bin, claude_env, fake_anthropic, tmp_path, monkeypatch
):
    # The fake reports usage, so each model call costs about $0.05: a script of ten Bash calls
    # passes a $0.08 cap on its second call, and Claude Code stops the run itself.
    configure(
        monkeypatch,
        VALOR_CLAUDE_BIN=str(claude_bin),
        VALOR_CLAUDE_WORKDIR=str(tmp_path),
        VALOR_CLAUDE_MAX_RETRIES="0",
        VALOR_WARM_SESSIONS="off",
        VALOR_ALLOWED_USER_IDS=json.dumps([OWNER]),
        VALOR_CLAUDE_EXTRA_ALLOWED_TOOLS=json.dumps(["Bash(echo:*)"]),
        VALOR_BUDGET_PER_RUN_USD="0.08",
    )
    fake_anthropic.responder = Script(
        [ToolUse("Bash", {"command": f"echo step {n}"}) for n in range(10)] + ["all done"]
    )
    transport = MemoryTransport()
    bridge = Bridge(transport, claude_env=claude_env, host_tools=False)
    async with bridge.serving():
        await bridge.receive(incoming(CHAT, 1, "do ten steps", sender_id=OWNER))
        await asyncio.wait_for(bridge.drain(), 120)
    (reply,) = transport.replies_to(CHAT, 1)
    assert "Stopped: this reply reached the spending cap for one reply" in reply.text
    assert "($0.08, VALOR_BUDGET_PER_RUN_USD)" in reply.text
    assert len(fake_anthropic.main_requests) < 5  # stopped long before the script's end
    (row,) = store.query("SELECT status, error FROM bridge_inbox")
    assert row["status"] == "failed"
    today = spending.Window.containing()
    assert spending.spent(store, today, CHAT) >= 0.08  # what it cost counts for the day
    assert get_settings().budget_per_run_usd == 0.08


async def test_a_cap_raised_live_releases_the_held_message_without_a_restart(store, caps):
    """`valor budget set` overrides a daily cap in the store; the running bridge reads it on
    its next check and answers the held message, no restart."""
    from typer.testing import CliRunner

    from scheduler.cli import app

    spending.record_spend(store, OTHER, 10.0)  # every chat together is at the $10 daily cap
    bridge, transport, runner = bridge_with(0.10)
    async with bridge.serving():
        await bridge.receive(incoming(CHAT, 1, "please", sender_id=OWNER))
        await asyncio.wait_for(bridge.drain(), 30)
        assert runner.prompts == []
        raised = CliRunner().invoke(app, ["budget", "set", "per-day", "20"])
        assert raised.exit_code == 0, raised.output
        await transport.wait_for(lambda: len(transport.replies_to(CHAT, 1)) == 2)
        await asyncio.wait_for(bridge.drain(), 30)
    assert runner.prompts == ["please"]
    shown = CliRunner().invoke(app, ["budget", "show"]).output
    assert "per-day: $20.00 (set with `valor budget set`)" in shown
    assert "per-chat-day: $1.00 (from the settings)" in shown
    assert CliRunner().invoke(app, ["budget", "set", "per-day", "-1"]).exit_code == 2
    assert CliRunner().invoke(app, ["budget", "reset", "per-day"]).exit_code == 0
    assert spending.daily_caps(store, get_settings())["per-day"] == 10.0
