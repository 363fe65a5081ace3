"""`valor worker` processes for the remote-worker tests, each with a data directory of its own
and the daemon's data directory hidden from it (a bubblewrap mount view with that folder empty)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from servers.core.settings import REPO_ROOT
from tests.support.waiting import wait_until


class Workers:
    """`valor worker` processes, each in a mount view without the daemon's data directory."""

    def __init__(self, tmp_path, env, hidden: Path):
        self.tmp_path, self.env, self.hidden = tmp_path, env, hidden
        self.processes: dict[str, subprocess.Popen] = {}

    def wrapped(self, argv):
        view = ["--dev-bind", "/", "/", "--tmpfs", str(self.hidden), "--die-with-parent"]
        return ["bwrap", *view, "--", *argv]

    def signal(self, name, sig):
        """To the worker itself (bwrap would not pass it on); bwrap exits with its status."""
        wrapper = psutil.Process(self.processes[name].pid)
        worker = wait_until(wrapper.children, 30, f"{name} started")[0]
        worker.send_signal(sig)

    def start(self, name, **extra):
        data = self.tmp_path / name
        # The workdir is the repository (read-only in the sandbox): its hooks fire and spool.
        env = {**self.env, "VALOR_DATA_DIR": str(data), "VALOR_CLAUDE_WORKDIR": str(REPO_ROOT)}
        env.update(extra)
        argv = [sys.executable, "-m", "scheduler.cli", "worker", "--workers", "1", "--name", name]
        process = subprocess.Popen(
            self.wrapped(argv),
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.processes[name] = process
        return process

    def print_logs(self):
        for name in self.processes:
            log_file = self.tmp_path / name / "logs" / "worker.log"
            lines = log_file.read_text().splitlines()[-15:] if log_file.exists() else []
            print(f"--- {name}:", *lines, sep="\n")

    def stop_all(self):
        for name, process in self.processes.items():
            if process.poll() is None:
                with contextlib.suppress(psutil.Error, AssertionError, IndexError):
                    self.signal(name, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
