"""A store SQLite cannot use is a [store] error that says what to do, never [internal].

Real SQLite in every case: a garbage file and a damaged page (corrupt), a read-only bind mount
(bubblewrap around a subprocess: the tests run as root, whom file modes do not stop), a tiny
tmpfs filled up (full), and another connection holding the write lock (locked)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from servers.core import store as store_module
from servers.core.errors import Category, ValorError
from servers.core.settings import REPO_ROOT
from servers.core.store import Store, close_all_stores, get_store
from servers.promises import mcp as promise_server
from servers.telegram import mcp as telegram_server
from tests.support import call, texts


@pytest.fixture(autouse=True)
def research_is_configured(valor_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A research promise is accepted only with Perplexity configured; no worker runs here, so
    nothing is ever sent (and the base URL is a closed loopback port)."""
    monkeypatch.setenv("PERPLEXITY_API_KEY", "pplx-test-key-not-used")
    monkeypatch.setenv("VALOR_PERPLEXITY_BASE_URL", "http://127.0.0.1:9")


BWRAP = shutil.which("bwrap")
needs_bwrap = pytest.mark.skipif(BWRAP is None, reason="bubblewrap (bwrap) is not installed")

SEARCH = ("search_conversation_history", {"query": "hello", "chat_id": 5})
PROMISE = ("create_promise", {"description": "look into the slow build", "chat_id": 5})


def store_refusal(result, *phrases: str) -> str:
    text = texts(result)
    assert result.is_error, text
    assert text.startswith("[store]"), text
    for phrase in phrases:
        assert phrase in text, text
    return text


async def test_a_garbage_file_as_the_store_says_restore_from_a_backup(valor_env: Path):
    valor_env.mkdir(parents=True)
    (valor_env / "valor.db").write_bytes(b"these are not the pages you are looking for\n" * 200)
    result = await call(telegram_server, *SEARCH)
    store_refusal(result, "corrupt", "restore it from a backup")
    with pytest.raises(ValorError) as opened:
        Store(valor_env / "valor.db")  # where the store is opened: the same error
    assert opened.value.category == Category.STORE


async def test_a_damaged_page_in_a_real_store_is_a_store_error(valor_env: Path):
    store = get_store()
    with store.transaction() as conn:
        conn.executemany(
            "INSERT INTO messages (chat_id, message_id, text, sender, direction, sent_at) "
            "VALUES (5, ?, ?, 'Ann', 'in', 0)",
            [(index, f"hello number {index} " * 40) for index in range(2000)],
        )
    store.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the file
    close_all_stores()
    path = valor_env / "valor.db"
    page_size = 4096
    data = bytearray(path.read_bytes())
    for page in range(2, len(data) // page_size):  # every page but the header's
        data[page * page_size : page * page_size + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    result = await call(telegram_server, *SEARCH)
    store_refusal(result, "corrupt", "restore it from a backup")


async def test_a_locked_store_says_another_process_holds_it(valor_env: Path, monkeypatch):
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 300)  # not the real 10 s wait
    get_store()  # created and migrated
    holder = sqlite3.connect(valor_env / "valor.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        locked = await call(promise_server, *PROMISE)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store_refusal(locked, "locked", "another process")
    after = await call(promise_server, *PROMISE)
    assert not after.is_error, texts(after)  # the lock, not the store, was the problem


def run_in_sandbox(data_dir: Path, script: str, *mount: str) -> str:
    """``script`` in a fresh Python under bubblewrap, the data directory mounted as ``mount``
    says; returns its stdout (each tool result on one line)."""
    env = {**os.environ, "VALOR_DATA_DIR": str(data_dir), "PYTHONPATH": str(REPO_ROOT)}
    command = [BWRAP, "--dev-bind", "/", "/", *mount, sys.executable, "-c", script]
    done = subprocess.run(
        command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


CALLS = """
import asyncio, sys
from tests.support import call, texts

async def main():
    for server, tool, arguments in CALLS:
        module = __import__("servers." + server, fromlist=["mcp"])
        result = await call(module.mcp, tool, arguments)
        print(tool, "->", texts(result).replace("\\n", " "))

asyncio.run(main())
"""


def calls_script(calls: list[tuple[str, str, dict]]) -> str:
    return f"CALLS = {calls!r}\n" + CALLS


@needs_bwrap
def test_a_read_only_data_directory_says_check_permissions_and_the_disk(valor_env: Path):
    get_store()  # a healthy store, closed cleanly (no -wal, -shm left)
    close_all_stores()
    script = calls_script([("telegram", *SEARCH)])
    writable = run_in_sandbox(valor_env, script)
    assert '"hits":[]' in writable, writable  # the same call in a writable mount works
    read_only = run_in_sandbox(valor_env, script, "--ro-bind", str(valor_env), str(valor_env))
    assert "[store]" in read_only and "read-only" in read_only, read_only
    assert "check the permissions" in read_only and "[internal]" not in read_only, read_only


@needs_bwrap
def test_a_write_to_a_store_on_a_read_only_mount_says_read_only(valor_env: Path):
    from servers.core import promises

    get_store()
    promises.get_queue()  # the queue's own file exists too: the store is what gets written
    holder = sqlite3.connect(valor_env / "valor.db", isolation_level=None)
    holder.execute("SELECT count(*) FROM messages").fetchone()  # keeps -wal and -shm in place
    try:
        output = run_in_sandbox(
            valor_env,
            calls_script([("promises", *PROMISE)]),
            "--ro-bind",
            str(valor_env),
            str(valor_env),
        )
    finally:
        holder.close()
    assert "create_promise -> [store]" in output and "read-only" in output, output


FILL_THE_DISK = """
import asyncio, os
from servers.promises import mcp
from tests.support import call, texts

async def main():
    print("room ->", texts(await call(mcp, *PROMISE)))
    with open(os.path.join(os.environ["VALOR_DATA_DIR"], "filler"), "wb") as filler:
        try:
            while True:
                filler.write(b"\\0" * 65536)
                filler.flush()
        except OSError:  # ENOSPC: the disk is full now
            pass
    print("full ->", texts(await call(mcp, *PROMISE)))

asyncio.run(main())
"""


@needs_bwrap
def test_a_full_disk_says_free_space(tmp_path: Path):
    data_dir = tmp_path / "tiny"
    data_dir.mkdir()
    script = f"PROMISE = {PROMISE!r}\n" + FILL_THE_DISK
    tmpfs = ("--size", str(4 * 1024 * 1024), "--tmpfs", str(data_dir))  # a real, tiny disk
    output = run_in_sandbox(data_dir, script, *tmpfs)
    assert "room -> {" in output, output  # with room on that disk the same call works
    assert "full -> [store]" in output, output
    assert "disk is full" in output and "Free space" in output, output
