"""The bridge's cost per message, and the bridge under load.

Part 1 — latency, the real Claude Code CLI against the fake Anthropic API (tests/fakes), measured
round-robin in one run so the three see the same machine:
  (a) bare `claude -p` with no MCP servers (a subprocess, prompt on stdin);
  (a1) the same `claude -p` given ONE hosted server (Claude Code's fixed cost of using MCP);
  (a2) the same `claude -p` given the bridge's hosted config, without the bridge (splits (b)'s
       cost into Claude Code's MCP start-up and the bridge's own work);
  (b) a bridge round trip (message in → reply in the in-memory transport) with every Valor
      server available through the hosted HTTP config; runs sandboxed (bubblewrap, the default);
  (b0) the same round trip with VALOR_SANDBOX=off: (b) - (b0) is the sandbox's cost per run;
  (c) the same round trip with the stdio `.mcp.json` (every server started per message);
  (w) the bridge round trip in a warm chat: warm sessions on (a resident Claude Code per chat,
      servers/core/claude_resident.py), the chat's process already running.
  (b), (b0), (c) run with warm sessions off. Also printed: the time from the message entering
  the bridge to the fake API receiving the model request, cold (b) and warm (w).
Target: median (b) / median (a) <= 1.15; the sandbox adds <= 30 ms per run; (w)/(a) <= 0.5
and a warm chat's message reaches the model API in <= 50 ms.

Part 2 — load, with a FAKE fast Claude (tests/fake_claude_stream.py, a script printing
stream-json; not Claude Code): N chats × M messages through one bridge with the tools hosted,
once with warm sessions off and once on (VALOR_WARM_MAX_PROCESSES resident fakes at most). Checks
that none is lost, each is answered once, per-chat order is kept; prints throughput, the peak
number of Claude Code processes, the bridge's RSS and the Claude processes' peak total RSS.

    .venv/bin/python bench/bridge.py                   # 9 rounds, 50 chats x 10 messages
    .venv/bin/python bench/bridge.py --rounds 3 --chats 10 --messages 5
    .venv/bin/python bench/bridge.py --sandbox-only --rounds 21   # (b) vs (b0) alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import CLAUDE, claude_env, start_claude_print  # noqa: E402


def isolated_env(data_dir: Path, **extra: str) -> None:
    """Fresh settings for this process: its own data dir, nothing from the developer's env."""
    for name in list(os.environ):
        if name.startswith(("VALOR_", "ANTHROPIC_", "TELEGRAM_", "OPENAI_", "NOTION_")):
            del os.environ[name]
    os.environ["VALOR_DATA_DIR"] = str(data_dir)
    os.environ.update(extra)
    from servers.core.settings import reset_settings_cache

    reset_settings_cache()


def rss_mb() -> tuple[float, float]:
    import psutil

    current = psutil.Process().memory_info().rss / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return current, peak


# -- part 2: load ---------------------------------------------------------------------------------
class ProcessSampler:
    """The bench's child processes (each run's root: bwrap, or the fake when unsandboxed) and
    their trees' resident memory, sampled while the load runs."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_processes = 0
        self.peak_rss_mb = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        import psutil

        from servers.core.claude_resident import tree_rss_mb

        me = psutil.Process()
        while True:
            children = [c for c in me.children() if c.status() != psutil.STATUS_ZOMBIE]
            self.peak_processes = max(self.peak_processes, len(children))
            if children:
                rss = sum(tree_rss_mb(child.pid) for child in children)
                self.peak_rss_mb = max(self.peak_rss_mb, rss)
            await asyncio.sleep(self.interval)

    def __enter__(self) -> ProcessSampler:
        self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


async def load(chats: int, messages: int, work: Path, warm: bool, warm_limit: int = 4) -> None:
    from bridge.memory import MemoryTransport, incoming
    from bridge.pipeline import Bridge

    fake = work / "fake-claude"
    fake.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "tests" / "fake_claude_stream.py"}" "$@"\n'
    )
    fake.chmod(0o755)
    mode = "on" if warm else "off"
    isolated_env(
        work / f"load-data-{mode}-{warm_limit}",
        VALOR_CLAUDE_BIN=str(fake),
        VALOR_CLAUDE_WORKDIR=str(work),
        VALOR_WARM_SESSIONS=mode,
        VALOR_WARM_MAX_PROCESSES=str(warm_limit),
    )
    transport = MemoryTransport()
    bridge = Bridge(transport, authorize_all=True)
    total = chats * messages
    async with bridge.serving():
        before, _ = rss_mb()
        started = time.perf_counter()
        with ProcessSampler() as sampler:
            for n in range(1, messages + 1):  # interleaved across chats, as real traffic arrives
                for chat in range(1, chats + 1):
                    await bridge.receive(incoming(chat, n, f"chat {chat} message {n}"))
            await bridge.drain()
        elapsed = time.perf_counter() - started
        after, peak = rss_mb()
    lost, duplicated, out_of_order = 0, 0, 0
    for chat in range(1, chats + 1):
        # The first paragraph is the answer; the fake reports no MCP servers, so the bridge
        # rightly appends a "tools unavailable" note after it.
        answers = [m.text.split("\n\n")[0] for m in transport.messages_in(chat)]
        expected = [f"Echo: chat {chat} message {n}" for n in range(1, messages + 1)]
        lost += len(set(expected) - set(answers))
        duplicated += len(answers) - len(set(answers))
        out_of_order += answers != expected and set(answers) == set(expected)
    statuses = bridge.store.query("SELECT status, COUNT(*) FROM bridge_inbox GROUP BY status")
    warm_limit = bridge.warm.limits.max_processes
    print(
        f"load (FAKE fast Claude), warm sessions {mode}"
        + (f" (limit {warm_limit})" if warm else "")
        + f": {chats} chats x {messages} messages = {total}"
    )
    print(
        f"  answered in {elapsed:.1f} s ({total / elapsed:.1f} messages/s, "
        f"{bridge.settings.max_concurrent_runs} concurrent runs)"
    )
    print(f"  lost {lost}, answered twice {duplicated}, chats out of order {out_of_order}")
    print(f"  inbox: {dict((row[0], row[1]) for row in statuses)}")
    processes = f"  peak Claude processes: {sampler.peak_processes}"
    if warm:
        within = "within" if bridge.warm.peak <= warm_limit else "OVER"
        processes += (
            f" (warm pool peak {bridge.warm.peak}, {within} the limit {warm_limit}; "
            f"{bridge.warm.started_total} started, closed: {bridge.warm.closed_reasons})"
        )
    print(processes)
    print(f"  bridge RSS: {before:.0f} MB before, {after:.0f} MB after, peak {peak:.0f} MB")
    print(f"  Claude processes' RSS (their trees, summed): peak {sampler.peak_rss_mb:.0f} MB")


# -- part 1: latency ------------------------------------------------------------------------------
async def bare_claude(env: dict[str, str], workdir: Path, mcp_config: Path | None = None) -> float:
    """`claude -p` alone; with ``mcp_config`` it also connects to the servers named there."""
    started = time.perf_counter()
    proc = await start_claude_print(env, workdir, mcp_config)
    out, _ = await proc.communicate(b"hello")
    elapsed = time.perf_counter() - started
    lines = [json.loads(line) for line in out.decode().strip().splitlines()]
    assert lines[-1].get("result") == "pong", lines[-1]
    init = next(line for line in lines if line.get("subtype") == "init")
    assert all(s["status"] == "connected" for s in init["mcp_servers"]), init["mcp_servers"]
    return elapsed


async def round_trip(
    bridge,
    transport,
    chat: int,
    message_id: int,
    arrivals: list[float] | None = None,
    to_model: list[float] | None = None,
) -> float:
    """Seconds from the message entering the bridge to its reply; with ``arrivals`` (times the
    fake API received model requests) also the time to the model request, into ``to_model``."""
    from bridge.memory import incoming

    seen = len(arrivals) if arrivals is not None else 0
    started = time.perf_counter()
    await bridge.receive(incoming(chat, message_id, "hello"))
    await bridge.drain()
    elapsed = time.perf_counter() - started
    (reply,) = transport.replies_to(chat, message_id)
    assert reply.text == "pong", reply.text  # a failed tool server would add a note
    if arrivals is not None and to_model is not None:
        to_model.append(arrivals[seen] - started)
    return elapsed


def sandbox_cost(times: dict[str, list[float]]) -> None:
    """(b) sandboxed against (b0) unsandboxed, both measured in the same rounds; then the
    sandbox's launch alone, which a busy machine's noise on a whole run cannot hide."""
    on, off = statistics.median(times["b"]), statistics.median(times["b0"])
    paired = statistics.median(b - b0 for b, b0 in zip(times["b"], times["b0"], strict=True))
    print(
        f"  sandbox cost per run: median (b) {on * 1000:.0f} ms - median (b0) {off * 1000:.0f} ms"
        f" = {(on - off) * 1000:+.1f} ms; median of the paired differences {paired * 1000:+.1f} ms"
    )
    wrapped, plain = launch_cost()
    verdict = "meets" if wrapped - plain <= 30 else "MISSES"
    print(
        f"  the sandbox's launch alone (/bin/true, 50 starts): median {wrapped:.1f} ms in bwrap, "
        f"{plain:.1f} ms without: {wrapped - plain:+.1f} ms  ({verdict} the <= 30 ms target)"
    )


def launch_cost(starts: int = 50) -> tuple[float, float]:
    """Median ms to start and reap /bin/true through ``sandbox.launch`` (mount plan, spool,
    bwrap) and directly, alternated."""
    import subprocess

    from servers.core import sandbox
    from servers.core.claude_command import ClaudeRun
    from servers.core.settings import get_settings

    settings = get_settings().model_copy(update={"sandbox": "bwrap"})
    run = ClaudeRun(prompt="", chat_id=1)
    env = {**os.environ, "ANTHROPIC_API_KEY": "unused"}
    wrapped, plain = [], []
    for _ in range(starts):
        started = time.perf_counter()
        with sandbox.launch(["/bin/true"], env, run, settings, REPO, str(CLAUDE)) as go:
            subprocess.run(go.argv, env=go.env, check=True)
        wrapped.append(time.perf_counter() - started)
        started = time.perf_counter()
        subprocess.run(["/bin/true"], check=True)
        plain.append(time.perf_counter() - started)
    return statistics.median(wrapped) * 1000, statistics.median(plain) * 1000


def variant_bridge(transport, env: dict[str, str], work: Path, tools, **settings_update):
    """A bridge like the hosted one with some settings changed (and a data dir of its own: one
    bridge per data dir), sharing the same hosted tools."""
    from bridge.pipeline import Bridge
    from servers.core.settings import get_settings

    name = "-".join(f"{key}-{value}" for key, value in settings_update.items())
    settings = get_settings().model_copy(
        update={"data_dir": work / f"{name}-data", **settings_update}
    )
    return Bridge(
        transport,
        settings=settings,
        claude_env=env,
        authorize_all=True,
        tools_base_url=tools.base_url,
        tools_secret=tools.secret,
    )


async def sandbox_only(rounds: int, work: Path) -> None:
    """Only (b) and (b0), alternated: the sandbox's cost on the bridge round trip."""
    from bridge.memory import MemoryTransport
    from bridge.pipeline import Bridge
    from tests.fakes import FakeAnthropic, reply_with

    with FakeAnthropic() as fake:
        fake.responder = reply_with("pong")
        home = work / "home"
        home.mkdir(exist_ok=True)
        env = claude_env(fake.url, home)
        isolated_env(
            work / "sandbox-data",
            VALOR_CLAUDE_BIN=str(CLAUDE),
            VALOR_CLAUDE_MAX_RETRIES="0",
            VALOR_CLAUDE_WORKDIR=str(REPO),
            VALOR_WARM_SESSIONS="off",  # (b) and (b0) are cold runs
        )
        on_transport, off_transport = MemoryTransport(), MemoryTransport()
        times: dict[str, list[float]] = {"b": [], "b0": []}
        on_bridge = Bridge(on_transport, claude_env=env, authorize_all=True)
        async with on_bridge.serving():
            assert on_bridge.tools is not None
            off_bridge = variant_bridge(off_transport, env, work, on_bridge.tools, sandbox="off")
            async with off_bridge.serving():
                await round_trip(on_bridge, on_transport, 1, 0)  # warm both, not measured
                await round_trip(off_bridge, off_transport, 1, 0)
                for n in range(1, rounds + 1):
                    times["b"].append(await round_trip(on_bridge, on_transport, 1, n))
                    times["b0"].append(await round_trip(off_bridge, off_transport, 1, n))
    print(f"sandbox cost (real Claude Code {CLAUDE.name} + fake Anthropic API), {rounds} rounds:")
    for key, label in (("b", "(b) bridge round trip, sandboxed"), ("b0", "(b0) unsandboxed")):
        spread = ", ".join(f"{t:.2f}" for t in times[key])
        print(f"  {label:48} median {statistics.median(times[key]):.3f} s   [{spread}]")
    sandbox_cost(times)


async def latency(rounds: int, work: Path) -> None:
    from bridge.memory import MemoryTransport
    from bridge.pipeline import Bridge
    from tests.fakes import FakeAnthropic, Text

    with FakeAnthropic() as fake:
        arrivals: list[float] = []  # when the fake received each main model request

        def answer(request: dict) -> list:
            arrivals.append(time.perf_counter())
            return [Text("pong")]

        fake.responder = answer
        home = work / "home"
        home.mkdir()
        env = claude_env(fake.url, home)
        # The repo is the workdir (its hooks run in all three); .mcp.json's commands are relative.
        # (b), (b0) and (c) are cold: one `claude -p` per message.
        isolated_env(
            work / "latency-data",
            VALOR_CLAUDE_BIN=str(CLAUDE),
            VALOR_CLAUDE_MAX_RETRIES="0",
            VALOR_CLAUDE_WORKDIR=str(REPO),
            VALOR_WARM_SESSIONS="off",
        )
        env["VALOR_DATA_DIR"] = os.environ["VALOR_DATA_DIR"]
        hosted_transport, stdio_transport = MemoryTransport(), MemoryTransport()
        hosted_bridge = Bridge(hosted_transport, claude_env=env, authorize_all=True)
        times: dict[str, list[float]] = {
            "a": [], "a1": [], "a2": [], "b": [], "b0": [], "c": [], "w": []
        }  # fmt: skip
        to_model: dict[str, list[float]] = {"b": [], "w": []}
        warm_transport = MemoryTransport()
        unsandboxed_transport = MemoryTransport()
        async with hosted_bridge.serving():
            from servers.core.settings import get_settings

            # A second bridge needs its own data dir (one bridge per data dir).
            stdio_settings = get_settings().model_copy(update={"data_dir": work / "stdio-data"})
            stdio_bridge = Bridge(
                stdio_transport,
                settings=stdio_settings,
                claude_env=env,
                authorize_all=True,
                host_tools=False,
                stdio_mcp_config=REPO / ".mcp.json",
            )
            # (a2): the hosted config the bridge writes, used by claude -p directly.
            from servers.core.mcp_config import runtime_mcp_config

            tools = hosted_bridge.tools
            assert tools is not None
            config = tools.config(3, ttl_seconds=6 * 3600)
            one_server = tools.without(
                [name for name in tools.servers if name != "telegram-tools"]
            ).config(3, ttl_seconds=6 * 3600)
            with (
                runtime_mcp_config(config, work / "run") as hosted_config,
                runtime_mcp_config(one_server, work / "run") as one_server_config,
            ):
                off_bridge = variant_bridge(unsandboxed_transport, env, work, tools, sandbox="off")
                warm_bridge = variant_bridge(warm_transport, env, work, tools, warm_sessions="on")
                async with stdio_bridge.serving(), off_bridge.serving(), warm_bridge.serving():
                    await bare_claude(env, REPO)  # warm the file cache once, not measured
                    await round_trip(warm_bridge, warm_transport, 5, 0)  # starts chat 5's process
                    for n in range(1, rounds + 1):
                        times["a"].append(await bare_claude(env, REPO))
                        times["a1"].append(await bare_claude(env, REPO, one_server_config))
                        times["a2"].append(await bare_claude(env, REPO, hosted_config))
                        times["b"].append(
                            await round_trip(
                                hosted_bridge, hosted_transport, 1, n, arrivals, to_model["b"]
                            )
                        )
                        times["w"].append(
                            await round_trip(
                                warm_bridge, warm_transport, 5, n, arrivals, to_model["w"]
                            )
                        )
                        times["b0"].append(
                            await round_trip(off_bridge, unsandboxed_transport, 1, n)
                        )
                        times["c"].append(await round_trip(stdio_bridge, stdio_transport, 2, n))
                        await asyncio.sleep(1.0)  # let (c)'s eight servers exit before (a)
        servers = len(tools.servers)
    med = {key: statistics.median(values) for key, values in times.items()}
    print(f"latency (real Claude Code {CLAUDE.name} + fake Anthropic API), {rounds} rounds:")
    labels = {
        "a": "(a) bare claude -p, no MCP servers",
        "a1": "(a1) bare claude -p + one hosted server",
        "a2": "(a2) bare claude -p + the hosted config",
        "b": "(b) bridge round trip, tools hosted over HTTP",
        "b0": "(b0) the same round trip, sandbox off",
        "c": "(c) bridge round trip, stdio .mcp.json",
        "w": "(w) bridge round trip, warm chat",
    }
    for key, label in labels.items():
        spread = ", ".join(f"{t:.2f}" for t in times[key])
        print(f"  {label:48} median {med[key]:.3f} s   [{spread}]")
    ratio = med["b"] / med["a"]
    verdict = "meets" if ratio <= 1.15 else "MISSES"
    print(
        f"  (b)/(a) = {ratio:.3f}  ({verdict} the <= 1.15 target);  (c)/(a) = "
        f"{med['c'] / med['a']:.2f}"
    )
    print(
        "  Claude Code's fixed cost of MCP, one hosted server: (a1)/(a) = "
        f"{med['a1'] / med['a']:.3f}; each further server: "
        f"{(med['a2'] - med['a1']) / max(1, servers - 1) * 1000:.0f} ms ({servers} servers)"
    )
    print(
        "  split: Claude Code connecting to the hosted servers (a2)/(a) = "
        f"{med['a2'] / med['a']:.3f}; the bridge's own work (b)/(a2) = {med['b'] / med['a2']:.3f}"
    )
    warm = med["w"] / med["a"]
    print(
        f"  (w)/(a) = {warm:.3f}  ({'meets' if warm <= 0.5 else 'MISSES'} the <= 0.5 target); "
        f"(w)/(b) = {med['w'] / med['b']:.3f}"
    )
    cold_ms, warm_ms = (statistics.median(to_model[key]) * 1000 for key in ("b", "w"))
    print(
        f"  message in -> model request: cold (b) median {cold_ms:.0f} ms, warm (w) median "
        f"{warm_ms:.0f} ms  ({'meets' if warm_ms <= 50 else 'MISSES'} the warm <= 50 ms target)"
    )
    sandbox_cost(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--chats", type=int, default=50)
    parser.add_argument("--messages", type=int, default=10)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument(
        "--sandbox-only", action="store_true", help="only (b) vs (b0): the sandbox's cost"
    )
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)  # the fake's "tools unavailable" warnings are noise
    with tempfile.TemporaryDirectory(prefix="valor-bench-bridge-") as tmp:
        work = Path(tmp)
        if args.sandbox_only:
            asyncio.run(sandbox_only(args.rounds, work))
            return
        asyncio.run(load(args.chats, args.messages, work, warm=False))
        # At the default limit (4) 50 interleaved chats evict on every message (the LRU's worst
        # case); with a limit of one per chat, each chat's process is started once.
        asyncio.run(load(args.chats, args.messages, work, warm=True))
        asyncio.run(load(args.chats, args.messages, work, warm=True, warm_limit=args.chats))
        if not args.skip_latency:
            if not CLAUDE.exists():
                sys.exit("Claude Code is not installed: run `bash .ci/setup` first.")
            asyncio.run(latency(args.rounds, work))


if __name__ == "__main__":
    main()
