"""Cleanup scenario run as PID 1 of a fresh PID namespace (see test_monitoring_cleanup.py).

    unshare --pid --fork --mount-proc python tests/monitoring_cleanup_scenario.py WORKDIR

Inside, /proc shows only this namespace, so cleanup_resources cannot reach any process outside
the test whatever it does. Prints one JSON document describing what happened. Every process is
registered a moment before the cleanup, with a zero age limit: each bounded one is stale.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main(workdir: Path) -> dict:
    if os.getpid() != 1:
        raise SystemExit("refusing to run outside a fresh PID namespace (expected to be PID 1)")
    os.environ["VALOR_DATA_DIR"] = str(workdir / "data")

    import psutil

    from servers.core.processes import register_process, running_registrations
    from servers.core.settings import Settings
    from servers.core.store import get_store

    # Longer than the default, so the time the stubborn tree takes shows the setting was used.
    grace = Settings.model_fields["cleanup_grace_seconds"].default + 1
    os.environ["VALOR_CLEANUP_GRACE_SECONDS"] = str(grace)

    bin_dir = workdir / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    claude = bin_dir / "claude"  # anything started through this path is literally named claude
    if not claude.exists():
        claude.symlink_to("/bin/sleep")

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen(list(args), env={**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"})

    foreign = start(str(claude), "600")  # named claude, never registered
    stale = start("sh", "-c", "claude 600 & claude 601 & wait")  # a tree: sh with two children
    stubborn = start("sh", "-c", "trap '' TERM; claude 602 & wait")  # ignores SIGTERM
    reused = start(str(claude), "603")  # registered with another create time: pid reuse
    daemon = start(str(claude), "604")  # a long-running kind: never stale by age
    exited = start("true")
    exited.wait()

    def tree(process: subprocess.Popen, children: int) -> list[int]:
        """The shell and its children once all of them run `claude` (a busy machine is slow)."""
        deadline = time.monotonic() + 60
        while True:
            found = psutil.Process(process.pid).children(recursive=True)
            started = [child for child in found if _name(child) == "claude"]
            if len(started) == children or time.monotonic() > deadline:
                return [process.pid, *(child.pid for child in found)]
            time.sleep(0.05)

    trees = {"stale": tree(stale, 2), "stubborn": tree(stubborn, 1)}
    store = get_store()
    register_process(store, stale.pid, "claude", ["claude", "-p", "stale run"], chat_id=5)
    register_process(store, stubborn.pid, "claude", "claude -p stubborn")
    actual = psutil.Process(reused.pid).create_time()
    register_process(store, reused.pid, "claude", "claude -p old", create_time=actual - 1000)
    register_process(store, daemon.pid, "daemon", "valor daemon")
    register_process(store, exited.pid, "claude", "claude -p exited", create_time=time.time() - 5)

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    everyone = {
        "foreign": [foreign.pid],
        **trees,
        "reused": [reused.pid],
        "daemon": [daemon.pid],
    }

    async def call(arguments: dict) -> dict:
        from fastmcp import Client

        from servers.monitoring import mcp

        async with Client(mcp) as client:
            result = await client.call_tool("cleanup_resources", arguments)
        return result.structured_content

    dry = asyncio.run(call({"dry_run": True, "max_age_hours": 0}))
    after_dry = {name: [alive(pid) for pid in pids] for name, pids in everyone.items()}
    started = time.monotonic()
    real = asyncio.run(call({"dry_run": False, "max_age_hours": 0}))
    elapsed = time.monotonic() - started
    after_real = {name: [alive(pid) for pid in pids] for name, pids in everyone.items()}
    open_registrations = sorted(r.pid for r in running_registrations(store))
    return {
        "pids": everyone,
        "exited_pid": exited.pid,
        "foreign_name": psutil.Process(foreign.pid).name(),
        "dry": dry,
        "after_dry": after_dry,
        "real": real,
        "after_real": after_real,
        "elapsed": elapsed,
        "grace": grace,
        "open_registrations": open_registrations,
    }


def _name(process) -> str:  # psutil.Process
    import psutil

    try:
        return process.name()
    except psutil.Error:
        return ""


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
