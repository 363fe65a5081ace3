"""The OS processes Valor started: their registry, recognising them, and ending their trees.

A process is identified by pid *and* create time: a pid the OS reused for something else never
matches its registration, so cleanup can end exactly Valor's own processes and nothing else.
``end_process_tree`` is the one way Valor ends a process and its descendants (the runner after a
timeout, cleanup, the bridge's recovery, the daemon at shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from servers.core.store import Store, now

if TYPE_CHECKING:
    import psutil

KILL_GRACE_SECONDS = 3.0  # SIGTERM to SIGKILL, unless the caller says otherwise
KILL_WAIT_SECONDS = 5.0  # SIGKILL lands at once, unless a process is in uninterruptible sleep
_POLL_SECONDS = 0.02


@dataclass(frozen=True)
class RegisteredProcess:
    id: int
    pid: int
    create_time: float
    kind: str
    command: str
    chat_id: int | None
    started_at: float
    ended_at: float | None


def process_create_time(pid: int) -> float:
    """The OS's create time for pid (raises psutil.NoSuchProcess when it is gone)."""
    import psutil

    return psutil.Process(pid).create_time()


def register_process(
    store: Store,
    pid: int,
    kind: str,
    command: list[str] | str = "",
    chat_id: int | None = None,
    create_time: float | None = None,
) -> RegisteredProcess:
    """Record a process Valor just started. ``kind`` says what it is, e.g. "claude"."""
    if create_time is None:
        create_time = process_create_time(pid)
    if isinstance(command, list):
        command = shlex.join(command)
    started = now()
    with store.transaction() as conn:
        row = conn.execute(
            """
            INSERT INTO processes (pid, create_time, kind, command, chat_id, started_at)
            VALUES (?, ?, ?, ?, ?, ?)
            ON CONFLICT (pid, create_time) DO UPDATE SET ended_at = NULL
            RETURNING id
            """,
            (pid, create_time, kind, command[:2000], chat_id, started),
        ).fetchone()
    return RegisteredProcess(row[0], pid, create_time, kind, command, chat_id, started, None)


def mark_process_ended(store: Store, pid: int, create_time: float) -> None:
    with store.transaction() as conn:
        conn.execute(
            "UPDATE processes SET ended_at = ? WHERE pid = ? AND create_time = ? "
            "AND ended_at IS NULL",
            (now(), pid, create_time),
        )


def running_registrations(store: Store) -> list[RegisteredProcess]:
    """Registrations not yet marked ended (the process may still have died on its own)."""
    rows = store.query(
        "SELECT id, pid, create_time, kind, command, chat_id, started_at, ended_at "
        "FROM processes WHERE ended_at IS NULL ORDER BY started_at"
    )
    return [RegisteredProcess(*tuple(row)) for row in rows]


START_TICK = 0.01  # /proc reports a process's start in clock ticks of 1/100 s


def same_start(registered: float, actual: float) -> bool:
    """Whether two wall-clock create times name the same process start.

    psutil adds the kernel's boot time to the start tick, and the kernel recomputes that boot time
    (whole seconds) from the current clock on every read: after NTP nudges the clock it can step
    by one second. The tick within the second never changes, so a difference of exactly one
    second is the same start; anything else (a reused pid) is not.
    """
    difference = abs(registered - actual)
    return difference < START_TICK or abs(difference - 1.0) < START_TICK


def matching_process(pid: int, create_time: float) -> psutil.Process | None:
    """The process with this pid if it is still the start registered at ``create_time``; None
    when it is gone, unreadable, or the pid now belongs to another program."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process if same_start(create_time, process.create_time()) else None
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def is_same_process(registration: RegisteredProcess) -> bool:
    """True only if the pid is alive and is the very process that was registered."""
    return matching_process(registration.pid, registration.create_time) is not None


def caller_and_ancestors() -> set[int]:
    """This process and every process running it: nothing Valor does ever ends these."""
    import psutil

    pids = {os.getpid()}
    with contextlib.suppress(psutil.Error):
        pids.update(parent.pid for parent in psutil.Process().parents())
    return pids


# -- ending a process tree -------------------------------------------------------------------------
@dataclass(frozen=True)
class EndedTree:
    """What ``end_process_tree`` did. ``members`` is the tree as found, root first."""

    members: list[int]
    terminated: list[int]  # gone after SIGTERM
    killed: list[int]  # needed SIGKILL
    left_running: list[int]  # not signalled (no permission) or outlived SIGKILL


def end_process_tree_blocking(
    pid: int, create_time: float | None = None, grace: float = KILL_GRACE_SECONDS
) -> EndedTree | None:
    """End pid and its descendants: SIGTERM, then SIGKILL to whatever outlives ``grace``.

    None, with nothing signalled, when pid is gone or (given ``create_time``) is no longer that
    start: a reused pid belongs to another program. Every member found in the tree is signalled
    (root first, so it cannot start replacements), which reaches descendants that left pid's
    process group; the group pid leads (a run started with ``start_new_session``) is signalled as
    a whole too, which reaches members whose parent exited. The calling process and its
    ancestors are never signalled, so a process may end its own descendants. A zombie counts as
    ended: reaping it is its parent's business.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        if create_time is not None and not same_start(create_time, root.create_time()):
            return None
    except psutil.NoSuchProcess:  # reaped already: its pid and group id may be reused by now
        return None
    try:
        members = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        members = [root]
    spared = caller_and_ancestors()
    group = pid if _leads_group_without(pid, spared) else None
    alive = [member for member in members if member.pid not in spared and not _ended(member)]
    terminated, denied = _signal(group, alive, signal.SIGTERM)
    survivors = _wait_ended(terminated, grace)
    killed, _ = _signal(group, survivors, signal.SIGKILL) if survivors else ([], [])
    outlived = _wait_ended(killed, KILL_WAIT_SECONDS)
    killed_pids = {member.pid for member in killed}
    return EndedTree(
        members=[member.pid for member in members],
        terminated=[member.pid for member in terminated if member.pid not in killed_pids],
        killed=sorted(killed_pids),
        left_running=[member.pid for member in [*denied, *outlived]],
    )


async def end_process_tree(
    pid: int,
    proc: asyncio.subprocess.Process | None = None,
    grace: float = KILL_GRACE_SECONDS,
    *,
    create_time: float | None = None,
) -> EndedTree | None:
    """``end_process_tree_blocking`` off the event loop; then ``proc`` (pid as an asyncio
    subprocess of this process, if it is one) is waited for, so it is reaped."""
    ended = await asyncio.to_thread(end_process_tree_blocking, pid, create_time, grace)
    if proc is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), timeout=grace)
    return ended


def _leads_group_without(pid: int, spared: set[int]) -> bool:
    """Whether pid leads its own process group and none of ``spared`` is in it."""
    try:
        return os.getpgid(pid) == pid and all(os.getpgid(other) != pid for other in spared)
    except OSError:
        return False


def _ended(process: psutil.Process) -> bool:
    import psutil

    try:  # is_running() is False once the pid belongs to another process
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def _signal(
    group: int | None, members: list[psutil.Process], sig: signal.Signals
) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """Signal each member, then the group: (members signalled, members we may not signal)."""
    import psutil

    received, denied = [], []
    for member in members:
        try:
            member.send_signal(sig)  # psutil refuses if the pid was reused meanwhile
            received.append(member)
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            denied.append(member)
    if group is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)
    return received, denied


def _wait_ended(processes: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    """Poll until every process has ended or ``seconds`` pass; those still running."""
    deadline = time.monotonic() + seconds
    running = [process for process in processes if not _ended(process)]
    while running and time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS)
        running = [process for process in running if not _ended(process)]
    return running
