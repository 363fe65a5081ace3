"""The SQLite store shared by every Valor process.

WAL journal, busy_timeout and short transactions make it safe for eight servers, the bridge and
the daemon at once. Schema changes are versioned migrations (``PRAGMA user_version``) in
``servers.core.migrations``; opening the store applies the missing ones under a write lock.

The file is owner-only (0600, and SQLite gives its -wal and -shm the same mode); a looser one is
tightened on open, with a log line. A store SQLite cannot use (corrupt, read-only, full, locked)
is a ``[store]`` error saying what to do (``servers.core.errors.store_error``).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from servers.core.migrations import MIGRATIONS
from servers.core.safe_files import (
    PRIVATE_DIR_MODE,
    PRIVATE_FILE_MODE,
    ensure_private_dir,
    tighten,
)

BUSY_TIMEOUT_MS = 10_000
SIDE_FILES = ("-wal", "-shm", "-journal")  # SQLite's own files beside a database


class Store:
    """One database file; one connection per thread, opened lazily."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        make_private(self.path)
        try:
            self.migrate()
        except sqlite3.Error as exc:
            raise self._store_error(exc) from None

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = self._open()
            except sqlite3.Error as exc:
                raise self._store_error(exc) from None
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _store_error(self, exc: sqlite3.Error) -> Exception:
        """What opening the store failed with: a [store] error when SQLite says what is wrong.
        (Imported here: the errors module loads FastMCP, and the hooks open the store without.)"""
        from servers.core.errors import store_error

        return store_error(exc, self.path) or exc

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE for writes so that lock waits happen up front, not at commit."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        return self.connection().execute(sql, params).fetchall()

    def schema_version(self) -> int:
        return self.connection().execute("PRAGMA user_version").fetchone()[0]

    def migrate(self) -> int:
        latest = max(MIGRATIONS)
        if self.schema_version() >= latest:
            return latest
        with self.transaction() as conn:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            for version in sorted(MIGRATIONS):
                if version > current:
                    for statement in MIGRATIONS[version]:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version={int(version)}")
        return latest

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            candidate = Path(str(self.path) + suffix)
            if candidate.exists():
                total += candidate.stat().st_size
        return total

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()


def make_private(db_path: Path) -> None:
    """Create the database file owner-only if it is missing (SQLite gives its -wal and -shm the
    database's mode), and tighten it and them if they are looser, with a log line."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))
    for candidate in (db_path, *(Path(f"{db_path}{suffix}") for suffix in SIDE_FILES)):
        tighten(candidate, PRIVATE_FILE_MODE)


def secure_data_dir(data_dir: Path, db_path: Path | None = None) -> None:
    """At a process's start: the data directory 0700 and the store's files 0600, tightening
    (with a log line each) whatever an older version or a copy left looser."""
    ensure_private_dir(data_dir)
    if db_path is not None and db_path.exists():
        make_private(db_path)


_stores: dict[Path, Store] = {}
_stores_lock = threading.Lock()


def get_store(path: Path | None = None) -> Store:
    """The process-wide store for the configured data directory."""
    from servers.core.settings import get_settings

    settings = get_settings()
    path = Path(settings.db_path if path is None else path)
    with _stores_lock:
        store = _stores.get(path)
        if store is None:
            if path == settings.db_path:  # the data directory's own store
                ensure_private_dir(settings.data_dir)
            store = _stores[path] = Store(path)
        return store


def close_all_stores() -> None:
    with _stores_lock:
        for store in _stores.values():
            store.close()
        _stores.clear()


def now() -> float:
    return time.time()
