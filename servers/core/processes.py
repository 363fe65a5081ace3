"""The registry of OS processes Valor started (Claude Code runs, workers).

A process is identified by pid *and* create time: a pid the OS reused for something else never
matches its registration, so cleanup can end exactly Valor's own processes and nothing else.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from servers.core.store import Store, now


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


def is_same_process(registration: RegisteredProcess) -> bool:
    """True only if the pid is alive and is the very process that was registered."""
    import psutil

    try:
        actual = psutil.Process(registration.pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return same_start(registration.create_time, actual)
