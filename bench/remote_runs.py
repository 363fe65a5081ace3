"""What relaying a bridge run through Redis costs (``VALOR_RUN_ON_WORKERS``), Claude Code aside.

In one process: a real redis-server (append-only file, ``appendfsync always``), the daemon's
tool host with the token service and the bridge-run claim route, the real worker pool
(``RemoteWorkerPool``: its pop, its claim over HTTP, its relay) and the bridge's
``RemoteRunner``. The Claude Code process is replaced by a stand-in that prints ``--lines``
stream-json lines at once (``RelayRunner._run_once``), so what is measured is Valor's plumbing:

  reply overhead: RemoteRunner.run called → RunOutcome back (queue, claim, token, relay, end);
  event latency:  a line handed to the worker's relay → the bridge's event handler has it.

    .venv/bin/python bench/remote_runs.py                 # 50 replies of 20 lines
    .venv/bin/python bench/remote_runs.py --replies 100 --lines 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import ms  # noqa: E402


def line(**event: object) -> bytes:
    return (json.dumps(event) + "\n").encode()


async def bench(replies: int, lines: int, root: Path) -> None:
    from pydantic import SecretStr

    from servers import SERVERS
    from servers.core import promises, tokens_issued, trust
    from servers.core.claude_command import ClaudeRun
    from servers.core.claude_events import TextEvent
    from servers.core.claude_runner import RunOutcome
    from servers.core.remote_runs import RelayRunner, RemoteRunner, RunBoard, run_claim_routes
    from servers.core.settings import get_settings, reset_settings_cache
    from servers.core.worker_results import token_service_routes
    from servers.core.workers import RemoteWorkerPool, ToolHost, WorkerIdentity
    from servers.hosting import hosted
    from tests.support.redis_server import RedisServer

    redis_server = RedisServer(root / "redis").start()
    os.environ.update(VALOR_PROMISE_QUEUE_URL=redis_server.url, VALOR_RUN_ON_WORKERS="true")
    reset_settings_cache()
    settings = get_settings()

    async def stand_in(self, run, on_event, cancel):  # Claude Code's place: lines at once
        session = "bench-session"
        servers = [{"name": name, "status": "connected"} for name in SERVERS]
        self.stream.line(
            line(type="system", subtype="init", session_id=session, mcp_servers=servers)
        )
        for number in range(lines - 2):
            text = json.dumps({"n": number, "at": time.perf_counter()})
            content = [{"type": "text", "text": text}]
            self.stream.line(line(type="assistant", message={"content": content}))
        self.stream.line(line(type="result", subtype="success", is_error=False, result="done",
                              session_id=session, total_cost_usd=0.0))  # fmt: skip
        return RunOutcome("ok", text="done", session_id=session)

    RelayRunner._run_once = stand_in  # type: ignore[method-assign]
    secret = trust.new_secret()
    token = trust.mint_token(secret, tokens_issued.principal_for(worker=True), 3600)[0]
    board = RunBoard()
    routes = [*token_service_routes(secret, settings, tuple(SERVERS)),
              *run_claim_routes(board, secret, settings, tuple(SERVERS))]  # fmt: skip
    queue = promises.get_queue(settings)
    overheads: list[float] = []
    latencies: list[float] = []

    async def on_event(event: object) -> None:
        if isinstance(event, TextEvent):
            latencies.append(time.perf_counter() - json.loads(event.text)["at"])

    try:
        async with hosted(secret, extra_routes=routes) as base:
            identity = WorkerIdentity("bench", os.getpid(), 1.0)
            pool = RemoteWorkerPool(queue, ToolHost(base, SecretStr(token)), settings, identity, 1)
            pool.start()
            runner = RemoteRunner.from_settings(board, settings)
            try:
                for number in range(replies + 5):  # the first five warm up
                    request = ClaudeRun(prompt="hi", chat_id=4242, user_id=1)
                    started = time.perf_counter()
                    outcome = await runner.run(request, "<context>", on_event, asyncio.Event())
                    assert outcome.status == "ok", outcome.error
                    if number >= 5:
                        overheads.append(time.perf_counter() - started)
                    else:
                        latencies.clear()
            finally:
                await asyncio.to_thread(pool.stop, 5.0)
    finally:
        promises.close_queues()
        redis_server.stop()
    print(f"bridge runs on a worker over Redis (appendfsync always), {lines} lines per reply")
    print(f"  reply overhead ({replies} replies, Claude Code aside): {ms(overheads)}")
    print(f"  event latency  ({len(latencies)} lines, worker relay → bridge): {ms(latencies)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=50)
    parser.add_argument("--lines", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="valor-bench-") as tmp:
        root = Path(tmp)
        (root / "empty.env").touch()
        for name in [k for k in os.environ if k.startswith("VALOR_")]:
            del os.environ[name]
        os.environ.update(VALOR_ENV_FILE=str(root / "empty.env"), VALOR_DATA_DIR=str(root / "data"))
        asyncio.run(bench(args.replies, max(args.lines, 3), root))


if __name__ == "__main__":
    main()
