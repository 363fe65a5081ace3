"""Cleanup of what Valor itself left behind: stale processes, old temporary files, store slack.

Only processes in Valor's registry are candidates, and one is ended only while its pid *and* OS
create time still match the registration (a reused pid is some other program: never touched).
Its process tree is ended gracefully (SIGTERM), then forcibly (SIGKILL) after a grace period.
Nothing is ever chosen by name. Temporary files are removed only inside Valor's temp directory.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from servers.core.health import LONG_RUNNING_KINDS, is_stale
from servers.core.model_results import bytes_text, duration_text, human_bytes
from servers.core.processes import (
    caller_and_ancestors,
    end_process_tree_blocking,
    mark_process_ended,
    matching_process,
    running_registrations,
    same_start,
)
from servers.core.store import Store

TEMP_MARKER = ".valor-temp"  # a temp directory outside the data dir must carry this file

ProcessOutcome = Literal[
    "ended", "would end", "closed registration", "would close registration", "kept", "failed"
]


class ProcessAction(BaseModel):
    pid: int
    kind: str
    command: str
    age_hours: float | None = Field(description="Since the OS started it; None when gone")
    age = duration_text("age_hours", unit="hours")
    outcome: ProcessOutcome
    reason: str
    terminated: list[int] = Field(default_factory=list, description="Ended by SIGTERM")
    killed: list[int] = Field(default_factory=list, description="Needed SIGKILL")


class FileAction(BaseModel):
    path: str
    bytes: int
    size = bytes_text("bytes")
    age_hours: float
    age = duration_text("age_hours", unit="hours")


class StoreMaintenance(BaseModel):
    bytes_before: int
    bytes_after: int
    size_before = bytes_text("bytes_before")
    size_after = bytes_text("bytes_after")
    tool_calls_pruned: int
    sessions_pruned: int
    checkpointed: bool
    vacuumed: bool


class CleanupReport(BaseModel):
    dry_run: bool
    max_age_hours: float
    processes: list[ProcessAction]
    temp_files: list[FileAction] = Field(description="Removed (or, in a dry run, to remove)")
    temp_bytes: int
    temp_size = bytes_text("temp_bytes")
    temp_dirs_refused: list[str] = Field(
        description=f"Not cleaned: outside the data directory and without a {TEMP_MARKER} marker"
    )
    sessions_closed: int = Field(description="Open session rows whose Claude Code process is gone")
    store: StoreMaintenance
    summary: str


# -- processes -----------------------------------------------------------------------------------
def clean_processes(
    store: Store, dry_run: bool, max_age_hours: float, grace_seconds: float, now: float
) -> list[ProcessAction]:
    """End registered processes running longer than ``max_age_hours`` (0: every one that is not
    exempt); close the registrations of processes already gone."""
    import psutil

    actions = []
    protected = caller_and_ancestors()
    for registration in running_registrations(store):
        common = {"pid": registration.pid, "kind": registration.kind}
        common["command"] = registration.command[:200]
        reason = "the registered process has exited"
        try:
            actual = psutil.Process(registration.pid).create_time()
            alive = same_start(registration.create_time, actual)
            if not alive:
                reason = "its pid now belongs to another program (create time differs): left alone"
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            alive = False
        if not alive:
            # Gone, or the pid now belongs to another program: only the bookkeeping changes.
            if not dry_run:
                mark_process_ended(store, registration.pid, registration.create_time)
            actions.append(
                ProcessAction(
                    **common,
                    age_hours=None,
                    outcome="would close registration" if dry_run else "closed registration",
                    reason=reason,
                )
            )
            continue
        age_hours = round(max(0.0, now - registration.create_time) / 3600, 3)  # display only
        if registration.pid in protected:
            reason, stale = "this process or one running it", False
        elif registration.kind in LONG_RUNNING_KINDS:
            reason, stale = f"a {registration.kind} is meant to keep running", False
        elif is_stale(registration, True, now, max_age_hours):
            reason, stale = f"running {age_hours:g} h, longer than {max_age_hours:g} h", True
        else:
            reason, stale = f"running {age_hours:g} h, within {max_age_hours:g} h", False
        if not stale:
            actions.append(
                ProcessAction(**common, age_hours=age_hours, outcome="kept", reason=reason)
            )
            continue
        if dry_run:
            actions.append(
                ProcessAction(**common, age_hours=age_hours, outcome="would end", reason=reason)
            )
            continue
        try:
            ended = end_process_tree_blocking(
                registration.pid, registration.create_time, grace_seconds
            )
            if ended is not None and ended.left_running:
                raise OSError(f"processes {ended.left_running} could not be ended")
        except (OSError, psutil.Error) as exc:
            actions.append(
                ProcessAction(
                    **common, age_hours=age_hours, outcome="failed", reason=f"{reason}; {exc}"
                )
            )
            continue
        mark_process_ended(store, registration.pid, registration.create_time)
        actions.append(
            ProcessAction(
                **common,
                age_hours=age_hours,
                outcome="ended" if ended is not None else "closed registration",
                reason=reason,
                terminated=ended.terminated if ended is not None else [],
                killed=ended.killed if ended is not None else [],
            )
        )
    return actions


def close_gone_sessions(store: Store, dry_run: bool, now: float) -> int:
    """Session rows left open by a Claude Code process that died without SessionEnd."""
    gone = []
    for row in store.query(
        "SELECT session_id, pid, create_time FROM claude_sessions "
        "WHERE ended_at IS NULL AND pid IS NOT NULL AND create_time IS NOT NULL"
    ):
        if matching_process(row["pid"], row["create_time"]) is None:
            gone.append(row["session_id"])
    if gone and not dry_run:
        with store.transaction() as conn:
            conn.executemany(
                "UPDATE claude_sessions SET ended_at = ?, end_reason = 'process gone' "
                "WHERE session_id = ? AND ended_at IS NULL",
                [(now, session_id) for session_id in gone],
            )
    return len(gone)


# -- temporary files -----------------------------------------------------------------------------
def ensure_temp_dir(path: Path) -> Path:
    """Create a temporary directory for Valor (owner-only), marked so cleanup may clean it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    marker = path / TEMP_MARKER
    if not marker.exists() and not any(path.iterdir()):
        marker.write_text("Valor's temporary files: cleanup_resources removes old ones.\n")
    return path


def is_valor_temp_dir(path: Path, data_dir: Path) -> bool:
    """Strictly inside the data directory, or marked by ensure_temp_dir.

    A misconfigured VALOR_TEMP_DIR (/tmp, a home directory) is thereby never swept.
    """
    resolved, data = Path(path).resolve(), Path(data_dir).resolve()
    return (resolved != data and data in resolved.parents) or (Path(path) / TEMP_MARKER).is_file()


def clean_temp_files(
    temp_dir: Path, dry_run: bool, max_age_hours: float, now: float
) -> list[FileAction]:
    """Files (and then emptied directories) in Valor's temp directory older than the age.

    Symlinks are removed as links, never followed, so nothing outside the directory is touched.
    The caller checks ``is_valor_temp_dir`` first.
    """
    if not temp_dir.is_dir() or temp_dir.is_symlink():
        return []
    cutoff = now - max_age_hours * 3600
    removed = []
    emptied: set[str] = set()  # directories this run removed something from (mtime now fresh)
    for directory, subdirs, files in os.walk(temp_dir, topdown=False, followlinks=False):
        for name in [*files, *(d for d in subdirs if os.path.islink(os.path.join(directory, d)))]:
            path = os.path.join(directory, name)
            if name == TEMP_MARKER and directory == str(temp_dir):
                continue
            info = os.lstat(path)
            if info.st_mtime >= cutoff:
                continue
            if not dry_run:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                emptied.add(directory)
            removed.append(
                FileAction(
                    path=path,
                    bytes=info.st_size,
                    age_hours=round((now - info.st_mtime) / 3600, 3),
                )
            )
        if not dry_run and directory != str(temp_dir):
            try:
                old = os.lstat(directory).st_mtime < cutoff
                if not os.listdir(directory) and (old or directory in emptied):
                    os.rmdir(directory)
                    emptied.add(os.path.dirname(directory))
            except OSError:
                pass
    return removed


# -- the store -----------------------------------------------------------------------------------
VACUUM_FREE_FRACTION = 0.2  # vacuum only when a fifth of the file is free pages


def maintain_store(
    store: Store, dry_run: bool, retention_days: float, now: float
) -> StoreMaintenance:
    before = store.size_bytes()
    cutoff = now - retention_days * 86400
    conn = store.connection()
    if dry_run:
        calls = conn.execute("SELECT count(*) FROM tool_calls WHERE called_at < ?", (cutoff,))
        sessions = conn.execute(
            "SELECT count(*) FROM claude_sessions WHERE ended_at IS NOT NULL AND ended_at < ?",
            (cutoff,),
        )
        return StoreMaintenance(
            bytes_before=before,
            bytes_after=before,
            tool_calls_pruned=calls.fetchone()[0],
            sessions_pruned=sessions.fetchone()[0],
            checkpointed=False,
            vacuumed=False,
        )
    with store.transaction() as tx:
        calls_pruned = tx.execute("DELETE FROM tool_calls WHERE called_at < ?", (cutoff,)).rowcount
        sessions_pruned = tx.execute(
            "DELETE FROM claude_sessions WHERE ended_at IS NOT NULL AND ended_at < ?", (cutoff,)
        ).rowcount
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    vacuumed = False
    if pages and free / pages >= VACUUM_FREE_FRACTION:
        conn.execute("VACUUM")
        vacuumed = True
    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return StoreMaintenance(
        bytes_before=before,
        bytes_after=store.size_bytes(),
        tool_calls_pruned=calls_pruned,
        sessions_pruned=sessions_pruned,
        checkpointed=busy == 0,
        vacuumed=vacuumed,
    )


def cleanup(
    store: Store,
    temp_dirs: Path | list[Path],
    data_dir: Path,
    dry_run: bool = True,
    max_age_hours: float = 24.0,
    retention_days: float = 30.0,
    grace_seconds: float = 5.0,
    now: float | None = None,
) -> CleanupReport:
    now = time.time() if now is None else now
    processes = clean_processes(store, dry_run, max_age_hours, grace_seconds, now)
    sessions = close_gone_sessions(store, dry_run, now)
    dirs = [Path(temp_dirs)] if isinstance(temp_dirs, Path | str) else list(temp_dirs)
    refused = [str(d) for d in dirs if d.exists() and not is_valor_temp_dir(d, data_dir)]
    files = [
        entry
        for directory in dirs
        if str(directory) not in refused
        for entry in clean_temp_files(directory, dry_run, max_age_hours, now)
    ]
    maintenance = maintain_store(store, dry_run, retention_days, now)
    verb = "would" if dry_run else "did"
    ended = sum(1 for p in processes if p.outcome in ("ended", "would end"))
    closed = sum(1 for p in processes if "registration" in p.outcome)
    temp_bytes = sum(f.bytes for f in files)
    summary = (
        f"{'Dry run: ' if dry_run else ''}{verb} end {ended} stale process(es), close "
        f"{closed} registration(s) of processes already gone, remove {len(files)} temporary "
        f"file(s) ({human_bytes(temp_bytes)}), prune {maintenance.tool_calls_pruned} old tool-call "
        f"record(s)."
    )
    return CleanupReport(
        dry_run=dry_run,
        max_age_hours=max_age_hours,
        processes=processes,
        temp_files=files,
        temp_bytes=temp_bytes,
        temp_dirs_refused=refused,
        sessions_closed=sessions,
        store=maintenance,
        summary=summary,
    )
