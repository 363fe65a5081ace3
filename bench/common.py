"""What several benches share: timing summaries and a stdio server's spawn-to-tools/list time."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = str(REPO / ".venv" / "bin" / "python")


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
