"""The idle daemon's memory and CPU: `python bench/daemon.py [--seconds 60]`.

Starts `valor daemon` exactly as a user would (fresh data directory, nothing configured, every
server hosted in-process, the health job every 30 s, two promise workers polling), waits until it
is ready and its start-up health check has run, then samples it for the window:

- RSS: the daemon plus any children, sampled every second; median and max printed.
- CPU: (user + system CPU time at the end - at the start) / wall time, in % of one core.

Targets (issue #8): RSS <= 120 MB, CPU <= 1 % idle.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
RSS_TARGET_MB = 120.0
CPU_TARGET_PERCENT = 1.0


def tree(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rss_bytes(process: psutil.Process) -> int:
    total = 0
    for member in tree(process):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += member.memory_info().rss
    return total


def cpu_seconds(process: psutil.Process) -> float:
    total = 0.0
    for member in tree(process):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = member.cpu_times()
            total += times.user + times.system
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="valor-bench-") as data_dir:
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("VALOR_", "OPENAI_", "PERPLEXITY_", "NOTION_", "TELEGRAM_"))
        }
        env.update({"VALOR_DATA_DIR": data_dir, "VALOR_HTTP_PORT": "0"})
        started = time.monotonic()
        daemon = subprocess.Popen(
            [sys.executable, "-m", "scheduler.cli", "daemon"],
            cwd=data_dir,  # no .env from the repository
            env={**env, "PYTHONPATH": str(REPO_ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: list[str] = []
        reader = threading.Thread(
            target=lambda: lines.extend(daemon.stderr),
            daemon=True,
        )
        reader.start()
        try:
            while not any("job health:" in line for line in lines):
                if daemon.poll() is not None or time.monotonic() - started > 60:
                    print("".join(lines[-30:]), file=sys.stderr)
                    print("the daemon did not become ready", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            ready_seconds = time.monotonic() - started
            time.sleep(2)  # let the start-up work settle
            process = psutil.Process(daemon.pid)
            samples = []
            cpu_start, wall_start = cpu_seconds(process), time.monotonic()
            while time.monotonic() - wall_start < args.seconds:
                samples.append(rss_bytes(process))
                time.sleep(1.0)
            cpu_percent = 100 * (cpu_seconds(process) - cpu_start) / (time.monotonic() - wall_start)
            health_runs = sum("job health:" in line for line in lines)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                returncode = daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                returncode = None

    median_mb = statistics.median(samples) / 2**20
    max_mb = max(samples) / 2**20
    print(f"valor daemon, idle, {args.seconds:g} s window, {len(samples)} RSS samples")
    print(f"  start-up to first health check: {ready_seconds:.2f} s")
    print(f"  RSS median {median_mb:.1f} MB, max {max_mb:.1f} MB (target <= {RSS_TARGET_MB:g} MB)")
    print(f"  CPU {cpu_percent:.2f} % of one core (target <= {CPU_TARGET_PERCENT:g} %)")
    print(f"  health checks run: {health_runs}; exit code after SIGTERM: {returncode}")
    ok = max_mb <= RSS_TARGET_MB and cpu_percent <= CPU_TARGET_PERCENT and returncode == 0
    print("  within targets" if ok else "  OUTSIDE targets")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
