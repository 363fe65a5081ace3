"""Recognizing the very process Valor started (pid plus create time), and ending its tree."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from servers.core.settings import REPO_ROOT
from tests.support import wait_until
from tests.support.bridge import alive


def test_same_start_tolerates_the_kernels_boot_time_step_only():
    from servers.core.processes import same_start

    start = 1_795_675_021.37
    assert same_start(start, start)
    assert same_start(start, start + 1.0)  # boot time re-read after an NTP step
    assert same_start(start, start - 1.0)
    assert not same_start(start, start + 0.02)  # another start, two ticks later
    assert not same_start(start, start + 0.5)
    assert not same_start(start, start + 2.0)  # the pid was reused


# -- ending a process tree (only processes these tests start) --------------------------------------
@pytest.fixture
def started() -> Iterator[list[psutil.Process]]:
    """Every process a test starts; whatever is left is killed (psutil checks the pid is still
    that process, so a pid reused meanwhile is never hit)."""
    processes: list[psutil.Process] = []
    yield processes
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()


def _start(script: str, started: list[psutil.Process]) -> tuple[subprocess.Popen, list[int]]:
    """A shell leading its own process group; it prints pids, then "ready", then waits."""
    shell = subprocess.Popen(
        ["sh", "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    started.append(psutil.Process(shell.pid))
    pids = []
    assert shell.stdout is not None
    for line in shell.stdout:  # blocks until the shell has started what it reports
        if line.strip() == "ready":
            shell.stdout.close()
            return shell, pids
        pids.append(int(line))
        started.append(psutil.Process(pids[-1]))
    raise AssertionError(f"the shell ended early: {shell.wait()}")


def test_the_tree_ends_with_descendants_that_left_the_group_and_members_that_left_the_tree(
    started,
):
    from servers.core.processes import end_process_tree_blocking, process_create_time

    shell, (own_session, orphan) = _start(
        "setsid sleep 600 & echo $!; (sleep 601 & echo $!); echo ready; wait", started
    )
    assert orphan not in [c.pid for c in psutil.Process(shell.pid).children(recursive=True)]
    ended = end_process_tree_blocking(shell.pid, process_create_time(shell.pid), grace=30)
    assert ended is not None and ended.members[0] == shell.pid
    assert own_session in ended.terminated and ended.killed == ended.left_running == []
    assert shell.wait(timeout=60) == -signal.SIGTERM
    wait_until(  # the setsid'd child, and via the group
        lambda: not alive(own_session) and not alive(orphan), 60, "both children ending"
    )


def test_a_tree_that_ignores_sigterm_gets_sigkill_after_the_grace(started):
    from servers.core.processes import end_process_tree_blocking

    shell, (child,) = _start("trap '' TERM; sleep 600 & echo $!; echo ready; wait", started)
    began = time.monotonic()
    ended = end_process_tree_blocking(shell.pid, grace=0.5)
    assert time.monotonic() - began >= 0.5
    assert ended is not None and ended.terminated == []
    assert ended.killed == sorted([shell.pid, child]) and ended.left_running == []
    assert shell.wait(timeout=60) == -signal.SIGKILL


def test_a_pid_that_is_not_the_registered_start_is_never_signalled(started):
    from servers.core.processes import end_process_tree_blocking, process_create_time

    shell, _ = _start("echo ready; exec sleep 600", started)
    registered = process_create_time(shell.pid) - 1000  # as if the pid had been reused since
    assert end_process_tree_blocking(shell.pid, registered, grace=0) is None
    assert alive(shell.pid)
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid is free for reuse, so nothing may be signalled
    assert end_process_tree_blocking(gone.pid, time.time() - 60) is None


async def test_the_async_form_reaps_an_asyncio_subprocess():
    import asyncio

    from servers.core.processes import end_process_tree, process_create_time

    proc = await asyncio.create_subprocess_exec("sleep", "600", start_new_session=True)
    create_time = process_create_time(proc.pid)
    ended = await end_process_tree(proc.pid, proc, grace=30, create_time=create_time)
    assert ended is not None and ended.terminated == [proc.pid]
    assert proc.returncode == -signal.SIGTERM


def test_a_process_ending_its_own_tree_is_spared():
    """What the daemon does at shutdown: its descendants end, it does not."""
    script = (
        "import os, subprocess\n"
        "from servers.core.processes import end_process_tree_blocking\n"
        "child = subprocess.Popen(['sleep', '600'])\n"
        "ended = end_process_tree_blocking(os.getpid(), grace=30)\n"
        "print(child.pid in ended.terminated, os.getpid() in ended.terminated, child.wait())\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,  # its own group: the test's process is not in it
    )
    assert completed.stdout.split() == ["True", "False", f"-{signal.SIGTERM.value}"], (
        completed.stderr
    )
