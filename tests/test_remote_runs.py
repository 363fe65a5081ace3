"""Bridge runs on remote workers (``VALOR_RUN_ON_WORKERS``) over a real Redis server
(tests/support/redis_server.py: appendonly, appendfsync always).

In process: /stop reaching a run on the real worker pool (its claim over HTTP at the token
service, its heartbeat polling the cancel key), a run cancelled before any worker took it, and a
worker dying mid-run (the message runs once more; a second loss is answered with a failure).
End to end: a `valor worker` process without access to the daemon's store runs a bridge reply
with the real Claude Code CLI, and the answer reaches the chat through the bridge's transport.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import psutil
import pytest
from pydantic import SecretStr

from bridge.memory import MemoryTransport, incoming
from bridge.pipeline import Bridge
from scheduler.daemon import Daemon
from servers import SERVERS
from servers.core import history, promises, tokens_issued, trust
from servers.core.claude_command import ClaudeRun
from servers.core.claude_events import TextEvent
from servers.core.claude_runner import RunOutcome
from servers.core.errors import Category, ValorError
from servers.core.remote_runs import (
    RUNS_QUEUE,
    RelayRunner,
    RemoteRunner,
    RunBoard,
    RunStream,
    run_claim_routes,
)
from servers.core.settings import get_settings
from servers.core.worker_results import token_service_routes
from servers.core.workers import RemoteWorkerPool, ToolHost, WorkerIdentity, alive_key, redis_of
from servers.hosting import hosted
from tests.fakes import Script, Text, ToolUse, mcp_tool, reply_with
from tests.support import configure, wait_until
from tests.support.worker_processes import Workers

CHAT, OWNER = 4343, 1
DEADLINE = 60.0  # generous: a busy 2-core machine


@pytest.fixture
def redis_queue(redis_server, monkeypatch):
    configure(
        monkeypatch,
        VALOR_PROMISE_QUEUE_URL=redis_server.url,
        VALOR_RUN_ON_WORKERS="true",
        VALOR_ALLOWED_USER_IDS=json.dumps([OWNER]),
    )
    yield promises.get_queue()
    promises.close_queues()


def stream_line(**event) -> bytes:
    return (json.dumps(event) + "\n").encode()


def said(text: str) -> bytes:
    return stream_line(type="assistant", message={"content": [{"type": "text", "text": text}]})


def init(session: str) -> bytes:
    return stream_line(type="system", subtype="init", session_id=session, mcp_servers=[])


def result(text: str, session: str) -> bytes:
    return stream_line(type="result", subtype="success", is_error=False, result=text,
                       session_id=session, total_cost_usd=0.01, num_turns=1)  # fmt: skip


def request(prompt: str = "hello") -> ClaudeRun:
    return ClaudeRun(prompt=prompt, chat_id=CHAT, user_id=OWNER, user_name="owner")


# -- in process ----------------------------------------------------------------------------------
async def test_stop_reaches_the_run_on_a_worker(store, redis_queue, monkeypatch):
    """The real worker pool pops the run, claims it over HTTP and relays it; /stop sets the
    run's cancel key, the pool's heartbeat thread ends the run, the bridge side says Stopped."""
    settings, board = get_settings(), RunBoard()
    secret = trust.new_secret()
    worker_token = trust.mint_token(secret, tokens_issued.principal_for(worker=True), 600)[0]
    seen: dict[str, object] = {}

    async def scripted_claude(self, run, on_event, cancel):  # the part that is a process
        seen["run"], seen["config"] = run, json.loads(run.mcp_config.read_text())
        for raw in (init("s-1"), said("working on it")):
            self.stream.line(raw)
        await asyncio.wait_for(cancel.wait(), DEADLINE)
        seen["cancelled"] = True
        return RunOutcome("cancelled", error=ValorError(Category.INPUT, "stopped"))

    monkeypatch.setattr(RelayRunner, "_run_once", scripted_claude)
    routes = [*token_service_routes(secret, settings, tuple(SERVERS)),
              *run_claim_routes(board, secret, settings, tuple(SERVERS))]  # fmt: skip
    async with hosted(secret, extra_routes=routes) as base:
        host = ToolHost(base, SecretStr(worker_token))
        identity = WorkerIdentity("w-test", os.getpid(), 1.0)
        pool = RemoteWorkerPool(redis_queue, host, settings, identity, workers=1)
        pool.start()
        try:
            runner, cancel = RemoteRunner.from_settings(board, settings), asyncio.Event()
            texts = []

            async def on_event(event):
                if isinstance(event, TextEvent):
                    texts.append(event.text)

            running = asyncio.create_task(runner.run(request(), "<ctx>", on_event, cancel))
            async with asyncio.timeout(DEADLINE):
                while not texts:  # progress arrives while the run lasts
                    await asyncio.sleep(0.02)
            cancel.set()
            outcome = await asyncio.wait_for(running, DEADLINE)
            await runner.close()
        finally:
            await asyncio.to_thread(pool.stop, 5.0)
    assert outcome.status == "cancelled" and texts == ["working on it"]
    assert seen["cancelled"] is True
    run = seen["run"]
    assert (run.chat_id, run.user_id, run.launched_by) == (CHAT, OWNER, "bridge")
    token = seen["config"]["mcpServers"]["telegram-tools"]["headers"]["Authorization"][7:]
    assert trust.verify_token(secret, token).chat_id == CHAT  # minted by the daemon's side
    assert "<ctx>" in run.prompt or "VALOR_CONTEXT_BLOCK_FILE" in run.extra_env


async def test_a_run_stopped_before_any_worker_took_it(store, redis_queue):
    settings, board, redis = get_settings(), RunBoard(), redis_of(redis_queue)
    runner, cancel = RemoteRunner.from_settings(board, settings), asyncio.Event()
    running = asyncio.create_task(runner.run(request(), None, None, cancel))
    await asyncio.to_thread(wait_until, lambda: redis.llen(RUNS_QUEUE), 10, "queued")
    (run_id,) = [v.decode() for v in redis.lrange(RUNS_QUEUE, 0, -1)]
    cancel.set()
    outcome = await asyncio.wait_for(running, 10)
    await runner.close()
    assert outcome.status == "cancelled"
    assert redis.llen(RUNS_QUEUE) == 0  # gone from the queue: no worker starts it
    assert board.claim(run_id, "late:1") is None


class ScriptedWorkers:
    """Workers reduced to their wire protocol: each takes the next run, claims it, beats, and
    either relays a whole answer or dies after its first line (no end, its heartbeat stops)."""

    def __init__(self, redis, board, plan):
        self.redis, self.board, self.plan = redis, board, list(plan)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        for number, fate in enumerate(self.plan):
            popped = self.redis.brpop([RUNS_QUEUE], timeout=int(DEADLINE))
            run_id = popped[1].decode()
            worker = f"scripted-{number}:{1000 + number}"
            assert self.board.claim(run_id, worker) is not None
            self.redis.set(alive_key(worker), "1", px=500)  # one beat
            stream = RunStream(self.redis, run_id)
            stream.put({"kind": "start", "servers": []})
            if fate == "die":
                stream.line(said(f"half an answer {number}"))
                stream._lines.put(None)  # its lines sent, then silence: no end entry
                stream._sender.join(10)
                continue
            for raw in (init("s-2"), said("the answer"), result("the answer", "s-2")):
                stream.line(raw)
            stream.end({"status": "ok"}, give_up_after=10)


async def test_a_worker_dying_mid_run_reruns_the_message_once(store, redis_queue, monkeypatch):
    configure(monkeypatch, VALOR_WORKER_HEARTBEAT_SECONDS="0.5")
    settings, board, redis = get_settings(), RunBoard(), redis_of(redis_queue)
    transport = MemoryTransport()
    bridge = Bridge(transport, settings=settings, host_tools=False,
                    remote_runs=RemoteRunner.from_settings(board, settings))  # fmt: skip
    workers = ScriptedWorkers(redis, board, ["die", "finish", "die", "die"])
    async with bridge.serving():
        await bridge.receive(incoming(CHAT, 1, "first", sender_id=OWNER))
        await bridge.drain()
        await bridge.receive(incoming(CHAT, 2, "second", sender_id=OWNER))
        await bridge.drain()
    await asyncio.to_thread(workers.thread.join, 10)
    await bridge.remote_runs.close()
    (first,) = transport.replies_to(CHAT, 1)
    assert first.text == "the answer"  # the lost attempt's text is not in the answer
    (second,) = transport.replies_to(CHAT, 2)
    assert "stopped twice" in second.text
    rows = store.query("SELECT status FROM bridge_inbox ORDER BY id")
    assert [r["status"] for r in rows] == ["done", "failed"]
    said_out = store.query("SELECT text FROM messages WHERE direction = 'out'")
    assert [r["text"] for r in said_out] == ["the answer"]  # delivered once
    assert not board._runs and redis.llen(RUNS_QUEUE) == 0


# -- end to end ----------------------------------------------------------------------------------
@pytest.mark.e2e  # a worker process, the real Claude Code CLI once
async def test_a_bridge_reply_runs_on_a_worker(
    store, redis_server, redis_queue, tmp_path, claude_bin, claude_env, fake_anthropic, monkeypatch
):
    configure(monkeypatch, VALOR_WORKER_HEARTBEAT_SECONDS="2")
    history.record_message(
        store, history.Message(CHAT, 1, "We ship billing on Friday", "alice", OWNER, "in")
    )
    progress_seen = threading.Event()

    def answer_after_progress(request_body):  # the reply ends only once the chat saw progress
        progress_seen.wait(DEADLINE)
        return Text("Worker says: billing ships Friday")

    fake_anthropic.responder = Script(
        [ToolUse(mcp_tool("telegram-tools", "search_conversation_history"), {"query": "billing"}),
         answer_after_progress]
    )  # fmt: skip
    settings = get_settings()
    secret = trust.load_scope_secret(settings)
    principal = tokens_issued.principal_for(worker=True, name="test workers")
    worker_token, _ = tokens_issued.issue_token(store, secret, principal, 3600)
    daemon = Daemon(settings, port=0, schedule=False, workers=0, run_bridge=False,
                    serve_metrics=False, remote_workers=True)  # fmt: skip
    await daemon.start()
    assert daemon.run_board is not None
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("VALOR_")},
        **claude_env,
        "VALOR_ENV_FILE": os.environ["VALOR_ENV_FILE"],
        "VALOR_PROMISE_QUEUE_URL": redis_server.url,
        "VALOR_WORKER_TOOLS_URL": daemon.base_url,
        "VALOR_WORKER_TOKEN": worker_token,
        "VALOR_WORKER_HEARTBEAT_SECONDS": "2",
        "VALOR_CLAUDE_BIN": str(claude_bin),
        "ENABLE_TOOL_SEARCH": "false",
    }
    workers = Workers(tmp_path, env, hidden=settings.data_dir)
    transport = MemoryTransport()
    bridge = Bridge(transport, settings=settings, tools_base_url=daemon.base_url,
                    tools_secret=secret,
                    remote_runs=RemoteRunner.from_settings(daemon.run_board, settings))  # fmt: skip
    try:
        workers.start("worker-a")
        async with bridge.serving():
            await bridge.receive(incoming(CHAT, 2, "When does billing ship?", sender_id=OWNER))

            def progress_shown():
                versions = [v for m in transport.messages_in(CHAT) for v in m.history]
                return any("search_conversation_history" in v for v in versions)

            await transport.wait_for(progress_shown, DEADLINE)  # while the run still waits
            assert not any(r["status"] == "done" for r in store.query("SELECT status FROM "
                                                                      "bridge_inbox"))  # fmt: skip
            progress_seen.set()
            await bridge.drain()
            # The next reply resumes the session on the worker that holds its transcript.
            fake_anthropic.responder = reply_with("Second answer")
            await bridge.receive(incoming(CHAT, 3, "And the invoices?", sender_id=OWNER))
            await bridge.drain()
        # The worker process never had the daemon's store in its view.
        wrapper = psutil.Process(workers.processes["worker-a"].pid)
        worker_pid = wrapper.children()[0].pid
        assert settings.db_path.exists()
        assert not Path(f"/proc/{worker_pid}/root{settings.db_path}").exists()
    except BaseException:
        workers.print_logs()
        raise
    finally:
        progress_seen.set()
        await asyncio.to_thread(workers.stop_all)
        await bridge.remote_runs.close()
        await daemon.stop()
    (reply,) = transport.replies_to(CHAT, 2)
    assert reply.text == "Worker says: billing ships Friday"
    assert [r["status"] for r in store.query("SELECT status FROM bridge_inbox")] == ["done"] * 2
    # The run reached the daemon's tools with a token for this chat, and its hooks' records
    # came back with the end of the run (the workdir is the repository, hooks included).
    assert "valor-context" in json.dumps(fake_anthropic.main_requests[0]["messages"])  # the block
    tool_result = json.dumps(fake_anthropic.main_requests[1]["messages"])
    assert f'\\"chat_id\\": {CHAT}' in tool_result or f'\\"chat_id\\":{CHAT}' in tool_result
    calls = store.query("SELECT chat_id FROM tool_calls WHERE tool = ?",
                        ("search_conversation_history",))  # fmt: skip
    assert [row["chat_id"] for row in calls] == [CHAT]
    (second,) = transport.replies_to(CHAT, 3)
    assert second.text == "Second answer"
    resumed = json.dumps(fake_anthropic.main_requests[-1]["messages"])
    assert "When does billing ship?" in resumed and "And the invoices?" in resumed
    for process in workers.processes.values():
        if process.stderr is not None:
            process.stderr.close()


def test_a_session_resumes_only_where_its_transcript_is(store):
    """Another worker's session is not resumed: that worker starts a fresh one."""
    from servers.core.remote_runs import session_here
    from servers.core.sandbox import claude_home

    settings, session = get_settings(), "0b0d4a4e-0d6c-4a41-9d0e-6f1f3c2a9b11"
    assert not session_here(settings, CHAT, session)
    transcripts = claude_home(settings, CHAT) / "projects" / "-work-repo"
    transcripts.mkdir(parents=True)
    (transcripts / f"{session}.jsonl").write_text("{}\n")
    assert session_here(settings, CHAT, session)
    assert not session_here(settings, CHAT + 1, session)  # another chat's home
    assert not session_here(settings, CHAT, "../../x")


async def test_a_run_its_bridge_stopped_watching_is_ended(store, redis_queue):
    """A bridge that stopped or crashed no longer renews its runs' watch keys: the worker's
    heartbeat then ends the run (its message runs again when the bridge is back)."""
    from servers.core.remote_runs import abandoned

    redis = redis_of(redis_queue)
    runner = RemoteRunner.from_settings(RunBoard(), get_settings())
    await runner.watch("abc")
    await runner.close()
    assert abandoned(redis, {"run:abc", 5}) == set()  # promise ids are not its business
    assert abandoned(redis, {"run:abc", "run:def"}) == {"run:def"}
