"""Interactive Claude Code with Valor's tools: start-up cost of each way to connect them.

The real Claude Code CLI (node_modules/.bin/claude) answers one `-p` prompt against the fake
Anthropic API (tests/fakes), started from a directory outside the repository, with:
  (bare)   no MCP servers;
  (eight)  the eight stdio servers of .mcp.json (its commands made absolute);
  (single) the single stdio process from `valor mcp-config` (servers.bundle);
  (http)   every server hosted over HTTP in this process (servers.hosting.hosted), with a token.
For each: the time from starting `claude` to its first model request (Claude Code waits for every
MCP server before that request), and the total RSS of the tool processes (the claude process's
python descendants) sampled at that request. Medians over interleaved rounds.
Targets: single <= 1.5x bare and <= 150 MB of tool processes; http <= 1.15x bare.

    .venv/bin/python bench/interactive.py              # 5 rounds
    .venv/bin/python bench/interactive.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import CLAUDE, claude_env, start_claude_print  # noqa: E402

VARIANTS = {
    "bare": "bare claude -p, no MCP servers",
    "eight": "eight stdio servers (.mcp.json)",
    "single": "single stdio process (bundle)",
    "http": "hosted HTTP endpoint, with a token",
}


@dataclass
class FirstRequest:
    """Filled by the fake's responder when Claude Code's first model request arrives."""

    claude_pid: int | None = None
    arrived: float | None = None
    tool_rss_mb: float = 0.0
    tool_processes: int = 0
    done: threading.Event = field(default_factory=threading.Event)


class Run(NamedTuple):
    seconds: float  # from starting claude to its first model request
    tool_rss_mb: float  # python processes below claude, at that request
    tool_processes: int
    not_connected: int  # MCP servers Claude Code did not wait for


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


async def measure(rounds: int, work: Path) -> dict[str, list[Run]]:
    from servers import SERVERS
    from servers.core import client_config
    from servers.core.mcp_config import HostedTools, runtime_mcp_config
    from servers.core.trust import new_secret
    from servers.hosting import hosted
    from tests.fakes import FakeAnthropic, is_main_conversation

    probe: list[FirstRequest | None] = [None]

    def responder(request: dict):
        current = probe[0]
        if current is not None and is_main_conversation(request) and current.arrived is None:
            current.arrived = time.perf_counter()
            if current.claude_pid is not None:
                current.tool_rss_mb, current.tool_processes = tool_processes_rss(current.claude_pid)
        return "pong"

    workdir = work / "elsewhere"  # outside the repository: no project hooks, no .mcp.json
    workdir.mkdir()
    home = work / "home"
    home.mkdir()
    eight = work / "eight.json"
    absolute_mcp_json(eight)
    single = work / "single.json"
    single.write_text(
        client_config.to_text(client_config.build("claude-code", "stdio", list(SERVERS)))
    )
    secret = new_secret()
    results: dict[str, list[Run]] = {key: [] for key in VARIANTS}
    with FakeAnthropic() as fake:
        fake.responder = responder
        env = claude_env(
            fake.url, home, CLAUDE_CODE_MAX_RETRIES="0", VALOR_DATA_DIR=str(work / "data")
        )
        async with hosted(secret) as base_url:
            tools = HostedTools(base_url, secret, tuple(SERVERS))
            with runtime_mcp_config(tools.config(None, ttl_seconds=3600), work) as http_config:
                configs = {"bare": None, "eight": eight, "single": single, "http": http_config}
                for config in configs.values():  # warm the file cache, not measured
                    await one_run(env, workdir, probe, config)
                for _ in range(rounds):
                    for key, config in configs.items():
                        results[key].append(await one_run(env, workdir, probe, config))
                        await asyncio.sleep(0.5)  # let the last run's servers exit
    return results


def report(results: dict[str, list[Run]], rounds: int) -> None:
    med = {key: statistics.median(r.seconds for r in runs) for key, runs in results.items()}
    rss = {key: statistics.median(r.tool_rss_mb for r in runs) for key, runs in results.items()}
    procs = {key: max(r.tool_processes for r in runs) for key, runs in results.items()}
    missing = {key: sum(r.not_connected for r in runs) for key, runs in results.items()}
    print(f"Claude Code {CLAUDE.name} + fake Anthropic API, {rounds} rounds, run outside the repo")
    print(f"  {'':40} {'first request':>14} {'tool RSS':>10}  spread (s)")
    for key, label in VARIANTS.items():
        spread = ", ".join(f"{r.seconds:.2f}" for r in results[key])
        note = f", {missing[key]} servers not connected in time" if missing[key] else ""
        print(
            f"  {label:40} {med[key]:>12.3f} s {rss[key]:>7.0f} MB  [{spread}]"
            f"  ({procs[key]} tool processes{note})"
        )
    single_ratio = med["single"] / med["bare"]
    http_ratio = med["http"] / med["bare"]

    def verdict(ok: bool) -> str:
        return "meets" if ok else "MISSES"

    print(
        f"  single/bare = {single_ratio:.2f} ({verdict(single_ratio <= 1.5)} <= 1.5); "
        f"single tool RSS {rss['single']:.0f} MB ({verdict(rss['single'] <= 150)} <= 150 MB)"
    )
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
        os.environ["VALOR_DATA_DIR"] = str(Path(tmp) / "data")  # the in-process host's
        results = asyncio.run(measure(args.rounds, Path(tmp)))
    report(results, args.rounds)


if __name__ == "__main__":
    main()
