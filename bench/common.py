"""What several benches share: timing summaries and a stdio server's spawn-to-tools/list time."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = str(REPO / ".venv" / "bin" / "python")
CLAUDE = REPO / "node_modules" / ".bin" / "claude"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def ms(values: list[float]) -> str:
    """Median and p95 of durations in seconds, printed in milliseconds."""
    median, p95 = statistics.median(values) * 1000, percentile(values, 0.95) * 1000
    return f"median {median:8.2f} ms   p95 {p95:8.2f} ms"


async def spawn_to_tools_list(args: list[str], data_dir: str) -> float:
    """Seconds from spawning ``PYTHON *args`` to its answer to tools/list (official mcp client)."""
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    params = StdioServerParameters(
        command=PYTHON,
        args=args,
        env={"VALOR_DATA_DIR": data_dir, "PATH": os.environ.get("PATH", "")},
        cwd=str(REPO),
    )
    started = time.perf_counter()
    with open(os.devnull, "w") as quiet:  # the servers' start-up banner lines
        async with (
            stdio_client(params, errlog=quiet) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            await session.list_tools()
            return time.perf_counter() - started


async def compare_starts(modules: list[str], starts: int, data_dir: str) -> None:
    """Print each module's stdio start, alternated, as a ratio of the first module's."""
    times: dict[str, list[float]] = {m: [] for m in modules}
    for _ in range(starts):
        for module in modules:
            times[module].append(await spawn_to_tools_list(["-m", module], data_dir))
    base = statistics.median(times[modules[0]])
    print(f"stdio spawn-to-tools/list, {starts} starts each, alternated:")
    for module in modules:
        ratio = statistics.median(times[module]) / base
        print(f"  {module:20s} {ms(times[module])}   x{ratio:.2f} of {modules[0]}")


def heavy_modules_loaded(modules: list[str], heavy: tuple[str, ...]) -> str:
    """Which of ``heavy`` a fresh interpreter has loaded after importing ``modules``."""
    import subprocess
    import sys

    probe = (
        f"import sys, {', '.join(modules)}; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules) or 'none')"
    )
    return subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def claude_env(api_url: str, home: Path, **extra: str) -> dict[str, str]:
    """An environment for the real Claude Code against a fake Anthropic API: its own home, no
    traffic to Anthropic's hosts, no auto-update."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": api_url,
        "ANTHROPIC_API_KEY": "bench-key",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        **extra,
    }


async def start_claude_print(
    env: dict[str, str], workdir: Path, mcp_config: Path | None = None
) -> asyncio.subprocess.Process:
    """`claude -p` with stream-json output and only ``mcp_config``'s servers (none without it);
    the caller writes the prompt to its stdin (``communicate``)."""
    extra = ["--mcp-config", str(mcp_config)] if mcp_config else []
    return await asyncio.create_subprocess_exec(
        str(CLAUDE),
        "-p",
        "--output-format",
        "stream-json",
        "--verbose",
        "--strict-mcp-config",
        *extra,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=str(workdir),
    )
