"""Remote promise workers over a real Redis server (tests/support/redis_server.py: appendonly,
appendfsync always), each a `valor worker` process with a data directory of its own and the
daemon's data directory hidden from it (a bubblewrap mount view with that folder empty)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler.daemon import Daemon
from servers.core import promises, tokens_issued, trust
from servers.core.outbox import pending_outbound
from servers.core.settings import get_settings
from servers.core.worker_results import Lease, RemoteResults, apply_result, claim_for_worker
from servers.core.workers import redis_of
from tests.fakes.anthropic_api import call_tool, mcp_tool
from tests.support import configure, wait_until
from tests.support.worker_processes import Workers

CHAT = 4242
DEADLINE = 60.0  # generous: a busy 2-core machine
WORKER_CLAUDE = Path(__file__).parent / "support" / "worker_claude.py"


@pytest.fixture
def redis_queue(redis_server, monkeypatch):
    configure(monkeypatch, VALOR_PROMISE_QUEUE_URL=redis_server.url)
    yield promises.get_queue()
    promises.close_queues()


def outbox_rows(store, promise_id):
    return [m for m in pending_outbound(store, 500) if f"Promise #{promise_id} " in m.text]


# -- in-process: the daemon's side ---------------------------------------------------------------
def test_an_outcome_read_twice_is_delivered_once(store, redis_queue):
    promise = promises.create_promise(store, redis_queue, "work", "research", CHAT)
    assert claim_for_worker(store, promise.id, "box-1", 101, 1.0) is not None
    assert claim_for_worker(store, promise.id, "box-2", 202, 1.0) is None  # one claim wins
    outcome = {"promise_id": promise.id, "worker": "box-1", "pid": 101, "status": "completed",
               "result": "done", "error": None}  # fmt: skip
    assert apply_result(store, redis_queue, get_settings(), outcome) == "completed"
    # Redelivered (the daemon died before its XACK), or forged for another worker: no effect.
    assert apply_result(store, redis_queue, get_settings(), outcome).startswith("ignored")
    forged = {**outcome, "worker": "box-2", "pid": 202, "result": "forged"}
    assert apply_result(store, redis_queue, get_settings(), forged).startswith("ignored")
    assert promises.get_promise(store, promise.id).result == "done"
    assert [m.text.endswith("done") for m in outbox_rows(store, promise.id)] == [True]


def test_a_silent_remote_worker_is_recovered_once_then_failed(store, redis_queue, monkeypatch):
    configure(monkeypatch, VALOR_WORKER_HEARTBEAT_SECONDS="0.5")
    results = RemoteResults(store, redis_queue, get_settings())
    promise = promises.create_promise(store, redis_queue, "work", "research", CHAT)
    for attempt, expected in ((1, "recovered"), (2, "failed")):
        redis_queue.dequeue()  # the worker took the task …
        assert claim_for_worker(store, promise.id, "far-away", 300 + attempt, 1.0)
        assert results.reap() == []  # … no heartbeat yet: half a period of patience
        wait_until(results.reap, 10, "the silent worker noticed")
        assert promises.get_promise(store, promise.id).recoveries == 1
        assert promises.get_promise(store, promise.id).status == (
            "pending" if expected == "recovered" else "failed"
        )
    failed = promises.get_promise(store, promise.id)
    assert "stopped answering twice" in failed.error
    assert len(outbox_rows(store, promise.id)) == 1  # the failure, told once


def test_a_drained_worker_gives_its_promise_back_once(store, redis_queue):
    promise = promises.create_promise(store, redis_queue, "work", "research", CHAT)
    assert claim_for_worker(store, promise.id, "box-1", 101, 1.0)
    stopped = {"promise_id": promise.id, "worker": "box-1", "pid": 101, "status": "interrupted"}
    assert apply_result(store, redis_queue, get_settings(), stopped) == "recovered"
    assert promises.get_promise(store, promise.id).status == "pending"
    assert apply_result(store, redis_queue, get_settings(), stopped).startswith("ignored")


def test_one_daemon_per_redis_queue(redis_queue):
    redis = redis_of(redis_queue)
    first, second = Lease(redis, "host-a:1"), Lease(redis, "host-b:2")
    assert first.acquire() and not second.acquire()
    assert first.acquire()  # the holder again (restarted within the expiry)
    second.release()  # not the holder: nothing happens
    assert second.current_holder() == "host-a:1"
    first.release()
    assert second.acquire() and not first.renew()


async def test_the_token_service_answers_worker_tokens_only(store, redis_queue):
    import httpx

    from servers import SERVERS
    from servers.core.worker_results import token_service_routes
    from servers.hosting import hosted

    secret = trust.new_secret()
    worker = tokens_issued.principal_for(worker=True, name="w")
    worker_token = trust.mint_token(secret, worker, 600)[0]
    chat_token = trust.mint_scope_token(secret, CHAT, 600)
    promise = promises.create_promise(store, redis_queue, "work", "research", CHAT)
    body = {"promise_id": promise.id, "worker": {"name": "w-1", "pid": 7, "started": 1.0}}
    routes = token_service_routes(secret, get_settings(), tuple(SERVERS))
    async with hosted(secret, extra_routes=routes) as base, httpx.AsyncClient() as client:

        async def claim(token, payload=body):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return await client.post(f"{base}/workers/claim", json=payload, headers=headers)

        assert (await claim(None)).status_code == 401
        assert (await claim(chat_token)).status_code == 403  # a chat's run cannot claim work
        bad_name = {**body, "worker": {**body["worker"], "name": "../x"}}
        assert (await claim(worker_token, bad_name)).status_code == 400
        granted = await claim(worker_token)
        assert (await claim(worker_token)).status_code == 409  # claimed once
    assert granted.status_code == 200
    answer = granted.json()
    assert answer["promise"]["description"] == "work"
    assert "promise-tools" not in answer["servers"]
    run = trust.verify_token(secret, answer["run_token"])
    assert (run.kind, run.chat_id) == ("chat", CHAT)  # the promise's chat, nothing wider
    assert promises.get_promise(store, promise.id).worker_host == "w-1"


# -- worker processes ----------------------------------------------------------------------------
def worker_claude(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "claude"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{WORKER_CLAUDE}" "$@"\n')
    script.chmod(0o755)
    return script


def wait_status(store, promise_id, states, timeout=DEADLINE):
    def reached():
        promise = promises.get_promise(store, promise_id)
        return promise if promise.status in states else None

    return wait_until(reached, timeout, f"promise {promise_id} reaching {sorted(states)}")


@pytest.mark.e2e  # worker processes, the real Claude Code CLI once
async def test_remote_workers_over_redis(
    store, redis_server, redis_queue, tmp_path, claude_bin, claude_env, fake_anthropic, monkeypatch
):
    fake_anthropic.responder = call_tool(
        mcp_tool("telegram-tools", "search_conversation_history"),
        {"query": "anything"},
        "History: {result}",
    )
    configure(monkeypatch, VALOR_WORKER_HEARTBEAT_SECONDS="2")
    settings = get_settings()
    secret = trust.load_scope_secret(settings)
    principal = tokens_issued.principal_for(worker=True, name="test workers")
    worker_token, _ = tokens_issued.issue_token(store, secret, principal, 3600)
    daemon = Daemon(settings, port=0, schedule=False, workers=0, run_bridge=False,
                    serve_metrics=False, remote_workers=True)  # fmt: skip
    await daemon.start()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("VALOR_")},
        **claude_env,
        "VALOR_ENV_FILE": os.environ["VALOR_ENV_FILE"],
        "VALOR_PROMISE_QUEUE_URL": redis_server.url,
        "VALOR_WORKER_TOOLS_URL": daemon.base_url,
        "VALOR_WORKER_TOKEN": worker_token,
        "VALOR_WORKER_HEARTBEAT_SECONDS": "2",
        "VALOR_DAEMON_SHUTDOWN_GRACE_SECONDS": "5",
        "VALOR_CLAUDE_BIN": str(worker_claude(tmp_path / "bin")),
        "WORKER_REAL_CLAUDE": str(claude_bin),
        "ENABLE_TOOL_SEARCH": "false",
    }
    workers = Workers(tmp_path, env, hidden=settings.data_dir)

    def run(blocking, *args):
        return asyncio.to_thread(blocking, *args)

    def create(text):
        return promises.create_promise(store, redis_queue, text, "claude_code", CHAT).id

    try:
        # A worker with a bad token (checked at the end), and two slow promises on two workers
        # whose fake honours sleep:, one to be killed mid-run, one to be stopped mid-run.
        refused = workers.start("worker-bad", VALOR_WORKER_TOKEN=worker_token[:-4] + "AAAA")
        workers.start("worker-0", VALOR_DAEMON_SHUTDOWN_GRACE_SECONDS="0.5")
        workers.start("worker-1", VALOR_DAEMON_SHUTDOWN_GRACE_SECONDS="0.5")
        slow, drained = create("sleep:60 the killed one"), create("sleep:60 the drained one")
        running = await run(wait_status, store, slow, {"running"})
        draining = await run(wait_status, store, drained, {"running"})
        assert {running.worker_host, draining.worker_host} == {"worker-0", "worker-1"}
        victim = running.worker_pid
        # The daemon's store is not in the workers' view at all; here it is.
        assert settings.db_path.exists()
        assert not Path(f"/proc/{victim}/root{settings.db_path}").exists()
        probe = subprocess.run(
            workers.wrapped([sys.executable, "-c", f"open({str(settings.db_path)!r})"]),
            capture_output=True,
            text=True,
        )
        assert probe.returncode != 0 and "No such file or directory" in probe.stderr
        # Two more workers; fast promises and the one real-CLI run spread over them.
        for name in ("worker-2", "worker-3"):
            workers.start(name, FAKE_CLAUDE_NO_SLEEP="1")
        fast = [create(f"fast job {n}") for n in range(4)]
        real = create("use-the-real-cli: look through the history")
        os.kill(victim, signal.SIGKILL)  # mid-run: its heartbeat stops
        workers.signal(draining.worker_host, signal.SIGTERM)  # the grace (0.5 s) runs out
        drained_exit = await run(workers.processes[draining.worker_host].wait, 30)
        assert drained_exit == 0  # its run ended, reported interrupted, and it exited
        done = {}
        for promise_id in [*fast, real, slow, drained]:
            done[promise_id] = await run(
                wait_status, store, promise_id, {"completed", "failed"}, 90
            )
        assert all(p.status == "completed" for p in done.values()), [
            (p.id, p.error) for p in done.values()
        ]
        assert {done[i].worker_host for i in fast} <= {"worker-2", "worker-3"}
        for promise_id, was_on in ((slow, running), (drained, draining)):  # once more, once
            assert done[promise_id].recoveries == 1
            assert done[promise_id].worker_host in {"worker-2", "worker-3"}, was_on.worker_host
        assert done[slow].result == "Echo: sleep:60 the killed one"
        # The real CLI reached the daemon's tools with the run token of the promise's chat.
        assert done[real].result.startswith("History: ") and '"hits"' in done[real].result
        assert f'"chat_id":{CHAT}' in done[real].result.replace(" ", "")
        offered = {t["name"] for t in fake_anthropic.main_requests[0].get("tools", [])}
        assert "mcp__telegram-tools__search_conversation_history" in offered
        assert not [name for name in offered if name.startswith("mcp__promise-tools__")]
        calls = store.query("SELECT chat_id FROM tool_calls WHERE tool = ?",
                            ("search_conversation_history",))  # fmt: skip
        assert [row["chat_id"] for row in calls] == [CHAT]  # the worker's hook records
        # Each result reached the chat once, the killed run's included.
        for promise_id in done:
            assert len(outbox_rows(store, promise_id)) == 1, promise_id
        # Graceful stop: an idle worker drains and exits 0.
        workers.signal("worker-3", signal.SIGTERM)
        assert await run(workers.processes["worker-3"].wait, 30) == 0
        # Queued while the last worker is paused, then Redis is SIGKILLed and restarted: the
        # queue is the append-only file's (fsync always), nothing lost; the worker reconnects.
        workers.signal("worker-2", signal.SIGSTOP)
        queued = [create(f"queued {n}") for n in range(3)]
        # (a paused worker's blocking pop may hold one already: Redis answered it, the socket
        # keeps it until the worker runs again)
        assert redis_queue.pending_count() >= 2
        await run(redis_server.restart)
        workers.signal("worker-2", signal.SIGCONT)
        for promise_id in queued:
            finished = await run(wait_status, store, promise_id, {"completed", "failed"})
            assert finished.status == "completed" and finished.recoveries == 0
            assert len(outbox_rows(store, promise_id)) == 1
        # The worker with a bad token was refused by the tool host before it took any work.
        assert await run(refused.wait, 30) == 2
        assert "refused this worker's token (HTTP 401" in refused.stderr.read()
    except BaseException:
        workers.print_logs()  # shown by pytest with the failure
        raise
    finally:
        await run(workers.stop_all)
        await daemon.stop()
    for process in workers.processes.values():  # their stderr, when something went wrong
        if process.stderr is not None and not process.stderr.closed:
            process.stderr.close()
