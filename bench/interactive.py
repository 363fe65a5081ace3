"""Interactive Claude Code with Valor's tools: start-up cost of each way to connect them.

The real Claude Code CLI (node_modules/.bin/claude) answers one `-p` prompt against the fake
Anthropic API (tests/fakes), started from a directory outside the repository, with:
  (bare)    no MCP servers;
  (eight)   the eight stdio servers of .mcp.json (its commands made absolute);
  (single)  the single stdio process from `valor mcp-config`: the bundle behind its front
            (servers.stdio_front), which answers Claude Code's listings from its cache (warm:
            the untimed first run filled it; that cold run is printed too) and starts the bundle
            as its child once Claude Code has the tool list (also: at once, at the first call);
  (direct)  the same bundle without the front (`valor mcp-config --direct`);
  (http)    every server hosted over HTTP by a separate host process (`valor serve --all --http`,
            what the daemon hosts), with an operator token.
For each: the time from starting `claude` to its first model request (Claude Code waits for every
MCP server before that request), and the total RSS of the tool processes (the claude process's
python descendants: for single, the front and the bundle) sampled at that request. Medians over
interleaved rounds, and each median's ratio to bare.
Targets: single <= 1.5x bare and <= 150 MB of tool processes; http <= 1.15x bare.

    .venv/bin/python bench/interactive.py              # 5 rounds
    .venv/bin/python bench/interactive.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import CLAUDE, PYTHON, claude_env, start_claude_print  # noqa: E402

VARIANTS = {
    "bare": "bare claude -p, no MCP servers",
    "eight": "eight stdio servers (.mcp.json)",
    "single": "single stdio process (front, warm cache)",
    "eager": "  same, bundle started at once",
    "lazy": "  same, bundle started at the first call",
    "direct": "single stdio process (bundle, no front)",
    "http": "HTTP host process, with a token",
}


@dataclass
class FirstRequest:
    """Filled by the fake's responder when Claude Code's first model request arrives."""

    claude_pid: int | None = None
    arrived: float | None = None
    tool_rss_mb: float = 0.0
    tool_processes: int = 0
    descendants: list = field(default_factory=list)  # claude's process tree at that request
    done: threading.Event = field(default_factory=threading.Event)


class Run(NamedTuple):
    seconds: float  # from starting claude to its first model request
    tool_rss_mb: float  # python processes below claude, at that request
    tool_processes: int
    not_connected: int  # MCP servers Claude Code did not wait for


def claude_descendants(claude_pid: int) -> list:
    import psutil

    try:
        return psutil.Process(claude_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def wait_gone(processes: list, deadline_seconds: float = 60) -> None:
    import psutil

    psutil.wait_procs(processes, timeout=deadline_seconds)


def tool_processes_rss(claude_pid: int) -> tuple[float, int]:
    """Total RSS (MB) and count of the python processes below ``claude_pid``."""
    import psutil

    total, count = 0, 0
    try:
        children = psutil.Process(claude_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0, 0
    for child in children:
        try:
            if "python" in os.path.basename(child.exe() or child.name()):
                total += child.memory_info().rss
                count += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total / 2**20, count


async def one_run(env: dict[str, str], workdir: Path, probe: list, config: Path | None) -> Run:
    """Start `claude -p` and wait for its answer."""
    current = FirstRequest()
    probe[0] = current
    started = time.perf_counter()
    proc = await start_claude_print(env, workdir, config)
    current.claude_pid = proc.pid
    out, err = await proc.communicate(b"hello")
    # The next run starts only once this run's tool processes are gone, so a slow exit of
    # the heavy variants does not load the machine while a light one is timed.
    await asyncio.to_thread(wait_gone, current.descendants)
    lines = [json.loads(line) for line in out.decode().strip().splitlines() if line.strip()]
    if not lines or lines[-1].get("result") != "pong":
        raise RuntimeError(f"claude failed: {lines[-1:] or err.decode()[-2000:]}")
    init = next(line for line in lines if line.get("subtype") == "init")
    # On a loaded machine Claude Code may give up waiting on slow stdio servers ("pending"):
    # counted and shown, since its first request then went out without them.
    missing = sum(1 for s in init["mcp_servers"] if s["status"] != "connected")
    if current.arrived is None:
        raise RuntimeError("the fake saw no model request")
    return Run(current.arrived - started, current.tool_rss_mb, current.tool_processes, missing)


def absolute_mcp_json(path: Path) -> dict:
    """The repository's .mcp.json with its relative python made absolute (usable anywhere)."""
    config = json.loads((REPO / ".mcp.json").read_text())
    for entry in config["mcpServers"].values():
        entry["command"] = str(REPO / entry["command"])
    path.write_text(json.dumps(config))
    return config


async def measure(rounds: int, work: Path) -> tuple[dict[str, list[Run]], dict[str, Run], int]:
    """Interleaved rounds of every variant; also the untimed first (cold) run of each."""
    from servers import SERVERS
    from servers.core import client_config
    from servers.core.mcp_config import HostedTools, runtime_mcp_config
    from tests.fakes import FakeAnthropic, is_main_conversation

    probe: list[FirstRequest | None] = [None]

    def responder(request: dict):
        current = probe[0]
        if current is not None and is_main_conversation(request) and current.arrived is None:
            current.arrived = time.perf_counter()
            if current.claude_pid is not None:
                current.tool_rss_mb, current.tool_processes = tool_processes_rss(current.claude_pid)
                current.descendants = claude_descendants(current.claude_pid)
        return "pong"

    workdir = work / "elsewhere"  # outside the repository: no project hooks, no .mcp.json
    workdir.mkdir()
    home = work / "home"
    home.mkdir()
    data_dir = work / "data"
    eight = work / "eight.json"
    absolute_mcp_json(eight)
    stdio_configs = {}
    for key, direct in (("single", False), ("eager", False), ("lazy", False), ("direct", True)):
        stdio_configs[key] = work / f"{key}.json"
        config = client_config.build("claude-code", "stdio", list(SERVERS), direct=direct)
        if key in ("eager", "lazy"):  # when the front starts the bundle (default: listed)
            config["mcpServers"][client_config.BUNDLE_SERVER]["env"]["VALOR_STDIO_FRONT_START"] = (
                key
            )
        stdio_configs[key].write_text(client_config.to_text(config))
    secret = secrets.token_hex(32)
    results: dict[str, list[Run]] = {key: [] for key in VARIANTS}
    cold: dict[str, Run] = {}
    with FakeAnthropic() as fake, http_host(work, data_dir, secret) as base_url:
        fake.responder = responder
        env = claude_env(fake.url, home, CLAUDE_CODE_MAX_RETRIES="0", VALOR_DATA_DIR=str(data_dir))
        tools = HostedTools(base_url, secret.encode(), tuple(SERVERS))
        with runtime_mcp_config(tools.config(None, ttl_seconds=3600), work) as http_config:
            configs = {"bare": None, "eight": eight, **stdio_configs, "http": http_config}
            for key, config in configs.items():  # warms file caches and the front's cache
                cold[key] = await one_run(env, workdir, probe, config)
            for _ in range(rounds):
                for key, config in configs.items():
                    results[key].append(await one_run(env, workdir, probe, config))
    return results, cold, len(list((data_dir / "stdio_front").glob("*.json")))


@contextlib.contextmanager
def http_host(work: Path, data_dir: Path, secret: str):
    """`valor serve --all --http` in its own process (as the daemon hosts the servers): the
    bench's fake API and event loop do not share its CPU time or GIL."""
    import httpx

    port = free_port()
    log = (work / "host.log").open("w")
    host = subprocess.Popen(
        [PYTHON, "-m", "scheduler.cli", "serve", "--all", "--http", "--port", str(port)],
        cwd=work,
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(REPO),
            "VALOR_DATA_DIR": str(data_dir),
            "VALOR_SCOPE_SECRET": secret,
            "VALOR_LOG_LEVEL": "WARNING",
        },
        stdout=log,
        stderr=log,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{base_url}/telegram-tools/mcp", timeout=2)
                break
            except httpx.HTTPError:
                if host.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the HTTP host did not start: {work / 'host.log'}"
                    ) from None
                time.sleep(0.2)
        yield base_url
    finally:
        host.terminate()
        host.wait(timeout=30)
        log.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def report(results: dict[str, list[Run]], cold: dict[str, Run], rounds: int, caches: int) -> None:
    med = {key: statistics.median(r.seconds for r in runs) for key, runs in results.items()}
    rss = {key: statistics.median(r.tool_rss_mb for r in runs) for key, runs in results.items()}
    procs = {key: max(r.tool_processes for r in runs) for key, runs in results.items()}
    missing = {key: sum(r.not_connected for r in runs) for key, runs in results.items()}
    print(f"Claude Code {CLAUDE.name} + fake Anthropic API, {rounds} rounds, run outside the repo")
    print(f"  {'':42} {'first request':>14} {'x bare':>7} {'tool RSS':>9}  spread (s)")
    for key, label in VARIANTS.items():
        spread = ", ".join(f"{r.seconds:.2f}" for r in results[key])
        note = f", {missing[key]} servers not connected in time" if missing[key] else ""
        print(
            f"  {label:42} {med[key]:>12.3f} s {med[key] / med['bare']:>7.2f} {rss[key]:>6.0f} MB"
            f"  [{spread}]  ({procs[key]} tool processes{note})"
        )
    print(
        f"  first runs (cold caches): single {cold['single'].seconds:.2f} s, "
        f"direct {cold['direct'].seconds:.2f} s, bare {cold['bare'].seconds:.2f} s"
    )
    single_ratio = med["single"] / med["bare"]
    http_ratio = med["http"] / med["bare"]

    def verdict(ok: bool) -> str:
        return "meets" if ok else "MISSES"

    print(
        f"  single/bare = {single_ratio:.2f} ({verdict(single_ratio <= 1.5)} <= 1.5); "
        f"single tool RSS {rss['single']:.0f} MB ({verdict(rss['single'] <= 150)} <= 150 MB)"
    )
    if caches != 1:
        print(f"  note: {caches} front cache keys: a source file changed during the run (misses)")
    print(f"  http/bare = {http_ratio:.3f} ({verdict(http_ratio <= 1.15)} <= 1.15)")
    print(f"  eight/bare = {med['eight'] / med['bare']:.2f}, eight tool RSS {rss['eight']:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not CLAUDE.exists():
        sys.exit("Claude Code is not installed: run `bash .ci/setup` first.")
    import logging

    logging.basicConfig(level=logging.ERROR)
    for name in list(os.environ):  # nothing from the developer's environment reaches the runs
        if name.startswith(("VALOR_", "ANTHROPIC_", "TELEGRAM_", "OPENAI_", "NOTION_")):
            del os.environ[name]
    with tempfile.TemporaryDirectory(prefix="valor-bench-interactive-") as tmp:
        os.environ["VALOR_DATA_DIR"] = str(Path(tmp) / "data")  # never the developer's store
        results, cold, caches = asyncio.run(measure(args.rounds, Path(tmp)))
    report(results, cold, args.rounds, caches)


if __name__ == "__main__":
    main()
