"""promise-tools and the promise queue: huey's SQLite backend, real workers, real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from servers import SERVERS
from servers.core import promises
from servers.core.mcp_config import HostedTools
from servers.core.outbox import pending_outbound
from servers.core.settings import REPO_ROOT, get_settings
from servers.core.trust import new_secret
from servers.hosting import hosted
from servers.promises import mcp
from tests.fakes.anthropic_api import call_tool, mcp_tool
from tests.support import call, configure, texts, wait_until, wait_until_async

CHAT, OTHER_CHAT = 4242, 777
DEADLINE_SECONDS = 60.0  # generous: these tests must pass on a busy 2-core machine


@pytest.fixture
def research(fake_openai, monkeypatch):
    """research promises answered by the fake Perplexity (the real openai SDK over HTTP)."""
    fake_openai.chat_reply = "Python 3.14 is out."
    fake_openai.citations = ["https://python.org/downloads"]
    configure(
        monkeypatch,
        PERPLEXITY_API_KEY="pplx-test-key-123456",
        VALOR_PERPLEXITY_BASE_URL=f"{fake_openai.url}/v1",
        VALOR_PERPLEXITY_MAX_RETRIES="0",  # the queue's own rule shows alone
    )
    yield fake_openai
    promises.close_queues()


@pytest.fixture
def workers():
    pools = []

    def start(count=1, tools=None):
        pool = promises.WorkerPool(promises.get_queue(), count, poll_seconds=0.05, tools=tools)
        pool.start()
        pools.append(pool)
        return pool

    yield start
    for pool in pools:
        pool.stop(10)


def wait_for(store, promise_id, states, timeout=DEADLINE_SECONDS):
    """The promise once its status is one of ``states``."""

    def reached():
        promise = promises.get_promise(store, promise_id)
        return promise if promise.status in states else None

    try:
        return wait_until(reached, timeout, f"promise {promise_id} reaching {sorted(states)}")
    except AssertionError as timed_out:
        status = promises.get_promise(store, promise_id).status
        raise AssertionError(f"promise {promise_id} is {status}, not in {states}") from timed_out


def wait_delivered(store, promise_id, timeout=DEADLINE_SECONDS):
    """The worker queues the outcome for the chat just after it records the status: wait for
    that too, rather than for a machine fast enough to have done it already."""
    wait_until(
        lambda: promises.get_promise(store, promise_id).delivery, timeout, "the delivery recorded"
    )


def drain(pool, timeout=DEADLINE_SECONDS):
    """Wait until the pool took everything off the queue and finished it, then stop it: what
    must not happen (a run, a retry, an overwrite) would have happened by then."""
    wait_until(lambda: not pool.queue.pending_count(), timeout, "the workers taking the tasks")
    assert pool.stop(timeout) == [], "a worker is still busy"


async def test_lifecycle_to_completed_and_delivered(store, research, workers):
    created = (
        await call(
            mcp, "create_promise", {"description": "What is new in Python?", "chat_id": CHAT}
        )
    ).structured_content
    assert created["status"] == "pending" and created["kind"] == "research"
    assert promises.get_queue().pending_count() == 1  # huey holds the task, in its own file
    assert get_settings().promise_queue_path.exists()
    workers()
    done = wait_for(store, created["id"], {"completed", "failed"})
    assert done.status == "completed", done.error
    wait_delivered(store, created["id"])
    status = (await call(mcp, "promise_status", {"promise_id": created["id"]})).structured_content
    assert "Python 3.14 is out." in status["result"]
    assert "https://python.org/downloads" in status["result"]
    assert status["started_at"] and status["finished_at"]
    outbox = pending_outbound(store)
    assert [m.chat_id for m in outbox] == [CHAT]
    assert "Python 3.14 is out." in outbox[0].text and "completed" in outbox[0].text
    assert status["delivery"].startswith(f"queued for chat {CHAT}")
    listed = (await call(mcp, "list_promises", {"status": "completed"})).structured_content
    assert [p["id"] for p in listed["promises"]] == [created["id"]]


async def test_cancel_before_it_runs(store, research, workers):
    created = (await call(mcp, "create_promise", {"description": "later"})).structured_content
    cancelled = (
        await call(mcp, "cancel_promise", {"promise_id": created["id"]})
    ).structured_content
    assert cancelled["status"] == "cancelled"
    drain(workers())
    assert promises.get_promise(store, created["id"]).status == "cancelled"
    assert research.chat_requests == []  # the worker never ran it
    again = await call(mcp, "cancel_promise", {"promise_id": created["id"]})
    assert again.is_error and "already cancelled" in texts(again)


async def test_cancel_while_running_drops_the_result(store, research, workers):
    research.hang_seconds = 3
    research.fail_next("timeout", path="/v1/chat/completions")
    created = (
        await call(mcp, "create_promise", {"description": "slow question"})
    ).structured_content
    pool = workers()
    wait_for(store, created["id"], {"running"})
    cancelled = (
        await call(mcp, "cancel_promise", {"promise_id": created["id"]})
    ).structured_content
    assert cancelled["status"] == "cancelled"
    drain(pool)  # the hung request ends; the worker must not overwrite the cancellation
    assert len(research.chat_requests) == 1  # the one model call, not repeated
    final = promises.get_promise(store, created["id"])
    assert final.status == "cancelled" and final.result is None


async def test_failure_is_not_retried(store, research, workers):
    research.fail_next("500", path="/v1/chat/completions")
    created = (
        await call(mcp, "create_promise", {"description": "q", "chat_id": CHAT})
    ).structured_content
    pool = workers()
    failed = wait_for(store, created["id"], {"completed", "failed"})
    assert failed.status == "failed" and "[upstream_api]" in failed.error
    drain(pool)
    assert len(research.chat_requests) == 1  # a side effect is never blindly repeated
    assert "failed" in pending_outbound(store)[0].text


async def test_bad_input_and_unknown_ids(store, research):
    bad_kind = await call(mcp, "create_promise", {"description": "x", "kind": "shell"})
    assert bad_kind.is_error
    blank = await call(mcp, "create_promise", {"description": "   "})
    assert blank.is_error and "[input]" in texts(blank)
    missing = await call(mcp, "promise_status", {"promise_id": 999})
    assert missing.is_error and "No promise with id 999" in texts(missing)
    assert store.query("SELECT COUNT(*) AS n FROM promises")[0]["n"] == 0


async def test_chat_scope_hides_other_chats(store, research, monkeypatch):
    queue = promises.get_queue()
    other = promises.create_promise(store, queue, "theirs", "research", OTHER_CHAT)
    configure(monkeypatch, VALOR_CHAT_ID=str(CHAT))
    own = (await call(mcp, "create_promise", {"description": "mine"})).structured_content
    assert own["chat_id"] == CHAT
    widened = await call(mcp, "create_promise", {"description": "x", "chat_id": OTHER_CHAT})
    assert widened.is_error and "outside it" in texts(widened)
    listed = (await call(mcp, "list_promises", {})).structured_content["promises"]
    assert [p["id"] for p in listed] == [own["id"]]
    peek = await call(mcp, "promise_status", {"promise_id": other.id})
    assert peek.is_error
    cancel = await call(mcp, "cancel_promise", {"promise_id": other.id})
    assert cancel.is_error
    assert promises.get_promise(store, other.id).status == "pending"


def start_worker_process():
    return subprocess.Popen(
        [sys.executable, "-m", "scheduler.cli", "worker", "--workers", "1"],
        cwd=REPO_ROOT,
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for_requests(fake, count, timeout=DEADLINE_SECONDS):
    """The worker is inside the (hanging) model call, not merely claiming the promise."""
    wait_until(lambda: len(fake.chat_requests) >= count, timeout, "the worker calling the model")


def crash(worker):
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)


@pytest.mark.e2e  # `valor worker` subprocesses
async def test_crashed_worker_is_recovered_once(store, research, workers):
    research.hang_seconds = 20
    research.fail_next("timeout", count=2, path="/v1/chat/completions")
    queue = promises.get_queue()
    first = promises.create_promise(store, queue, "crashes once", "research", CHAT)
    worker = start_worker_process()
    try:
        running = wait_for(store, first.id, {"running"})
        assert running.worker_pid == worker.pid
        wait_for_requests(research, 1)
    finally:
        crash(worker)
    assert promises.recover_interrupted(store, queue) == [(first.id, "recovered")]
    recovered = promises.get_promise(store, first.id)
    assert recovered.status == "pending" and recovered.recoveries == 1
    # Crashes again: the second crash fails it for good, nothing runs a third time.
    worker = start_worker_process()
    try:
        wait_for(store, first.id, {"running"})
        wait_for_requests(research, 2)
    finally:
        crash(worker)
    assert promises.recover_interrupted(store, queue) == [(first.id, "failed")]
    failed = promises.get_promise(store, first.id)
    assert failed.status == "failed" and "crashed twice" in failed.error
    # A promise whose worker crashed once completes on its second run.
    second = promises.create_promise(store, queue, "crashes, then works", "research", None)
    research.hang_seconds = 20
    research.fail_next("timeout", path="/v1/chat/completions")
    worker = start_worker_process()
    try:
        wait_for(store, second.id, {"running"})
        wait_for_requests(research, 3)
    finally:
        crash(worker)
    assert promises.recover_interrupted(store, queue) == [(second.id, "recovered")]
    workers()
    done = wait_for(store, second.id, {"completed", "failed"})
    assert done.status == "completed" and done.recoveries == 1


def test_a_live_worker_is_left_alone(store, research):
    queue = promises.get_queue()
    promise = promises.create_promise(store, queue, "still running", "research", None)
    with store.transaction() as conn:  # running in this very (live) process
        conn.execute(
            "UPDATE promises SET status = 'running', worker_host = ?, worker_pid = ?, "
            "worker_create_time = ? WHERE id = ?",
            (*promises._worker_identity(), promise.id),
        )
    assert promises.recover_interrupted(store, queue) == []
    assert promises.get_promise(store, promise.id).status == "running"


def test_redis_setting_without_redis_is_a_config_error(monkeypatch):
    configure(monkeypatch, VALOR_PROMISE_QUEUE_URL="postgres://nope")
    with pytest.raises(promises.ValorError, match="redis://"):
        promises.get_queue()


@pytest.mark.e2e
async def test_claude_code_promise_runs_the_real_cli_with_hosted_tools(
    store, workers, claude_bin, claude_env, fake_anthropic, monkeypatch
):
    """The real Claude Code CLI, given the hosted servers (scoped to the promise's chat), calls
    a tool and its answer becomes the promise's result."""
    fake_anthropic.responder = call_tool(
        mcp_tool("telegram-tools", "search_conversation_history"),
        {"query": "refactor"},
        "History: {result}",
    )
    configure(
        monkeypatch,
        **claude_env,
        VALOR_CLAUDE_BIN=str(claude_bin),
        VALOR_CLAUDE_WORKDIR=str(store.path.parent),
        ENABLE_TOOL_SEARCH="false",
    )
    secret = new_secret()
    async with hosted(secret) as base_url:
        created = (
            await call(
                mcp,
                "create_promise",
                {"description": "refactor it", "kind": "claude_code", "chat_id": CHAT},
            )
        ).structured_content
        workers(tools=HostedTools(base_url, secret, tuple(SERVERS)))
        done = await asyncio.to_thread(wait_for, store, created["id"], {"completed", "failed"}, 120)
    assert done.status == "completed", done.error
    assert done.result.startswith("History: ") and '"hits"' in done.result
    assert f'"chat_id":{CHAT}' in done.result.replace(" ", "")  # the token's chat
    first = fake_anthropic.main_requests[0]
    assert "refactor it" in json.dumps(first["messages"])
    offered = {tool["name"] for tool in first.get("tools", [])}
    assert "mcp__telegram-tools__search_conversation_history" in offered
    assert not [name for name in offered if name.startswith("mcp__promise-tools__")]
    # The promise runs as its chat: operator-only tools are not even offered to the model.
    assert not [name for name in offered if name.startswith("mcp__daydream-tools__")]
    assert not [name for name in offered if name.startswith("mcp__monitoring-tools__")]
    rows = store.query("SELECT chat_id, ended_at FROM processes WHERE kind = 'claude-promise'")
    assert [(r["chat_id"], r["ended_at"] is not None) for r in rows] == [(CHAT, True)]
    assert not list((store.path.parent / "run").glob("mcp-*.json"))  # the token file is gone
    wait_delivered(store, created["id"])
    assert pending_outbound(store)[0].chat_id == CHAT


@pytest.mark.parametrize(
    ("server", "tools"),
    [
        ("promise-tools", {"create_promise", "promise_status", "list_promises", "cancel_promise"}),
        ("daydream-tools", {"run_daydream", "daydream_history"}),
    ],
)
async def test_stdio_entries_answer_the_official_client(store, stdio_client_for, server, tools):
    async with stdio_client_for(server) as session:
        listing = await session.list_tools()
        listed = await session.call_tool(
            "list_promises" if server == "promise-tools" else "daydream_history", {}
        )
    assert {tool.name for tool in listing.tools} == tools
    assert all(tool.output_schema for tool in listing.tools)  # structured results
    assert not listed.is_error and listed.structured_content is not None


async def test_queue_down_loses_nothing(store, research, monkeypatch, workers):
    # Nothing listens there (and without the redis package the queue cannot even be built).
    configure(monkeypatch, VALOR_PROMISE_QUEUE_URL="redis://127.0.0.1:9/0")
    created = (await call(mcp, "create_promise", {"description": "kept"})).structured_content
    assert created["status"] == "waiting"
    assert any(why in created["note"] for why in ("redis package is missing", "queue refused it"))
    monkeypatch.delenv("VALOR_PROMISE_QUEUE_URL")
    configure(monkeypatch)  # settings read afresh, without it
    assert promises.recover_interrupted(store, promises.get_queue()) == [(created["id"], "queued")]
    workers()
    assert wait_for(store, created["id"], {"completed", "failed"}).status == "completed"


def ended(pid):
    """Gone, or a zombie only its parent has yet to reap."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.e2e
async def test_cancelling_a_claude_code_promise_ends_its_process(
    store, workers, claude_bin, claude_env, fake_anthropic, monkeypatch
):
    fake_anthropic.hang_seconds = 120  # hangs past every deadline below: only the cancel ends it
    fake_anthropic.fail_next("timeout", count=10, path="/v1/messages")
    configure(
        monkeypatch,
        **claude_env,
        VALOR_CLAUDE_BIN=str(claude_bin),
        VALOR_CLAUDE_WORKDIR=str(store.path.parent),
    )
    created = (
        await call(mcp, "create_promise", {"description": "never ends", "kind": "claude_code"})
    ).structured_content
    pool = workers()
    await wait_until_async(  # Claude Code is waiting on its model
        lambda: fake_anthropic.message_requests,
        2 * DEADLINE_SECONDS,
        "Claude Code calling its model",
    )
    [run] = store.query("SELECT pid FROM processes WHERE kind = 'claude-promise'")
    cancelled = (
        await call(mcp, "cancel_promise", {"promise_id": created["id"]})
    ).structured_content
    assert cancelled["status"] == "cancelled"
    await wait_until_async(lambda: ended(run["pid"]), DEADLINE_SECONDS, "Claude Code ending")
    drain(pool)  # the worker finished with the promise: its outcome is recorded (or dropped)
    final = promises.get_promise(store, created["id"])
    assert final.status == "cancelled" and final.result is None
