"""The data directory is 0700 and every file Valor creates in it 0600: a fresh one is made so,
and a looser one left by an older version or a copy is tightened on start, with a log line."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from servers.core.settings import REPO_ROOT
from servers.core.store import close_all_stores, get_store, secure_data_dir
from tests.support import call, texts


@pytest.fixture(autouse=True)
def research_is_configured(valor_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A research promise is accepted only with Perplexity configured; no worker runs here, so
    nothing is ever sent (and the base URL is a closed loopback port)."""
    monkeypatch.setenv("PERPLEXITY_API_KEY", "pplx-test-key-not-used")
    monkeypatch.setenv("VALOR_PERPLEXITY_BASE_URL", "http://127.0.0.1:9")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def loose_umask() -> Iterator[None]:
    """The umask most shells start with (0022): what each Valor process must not rely on."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def private_files(folder: Path) -> dict[str, int]:
    """Every file and folder under ``folder`` that group or others could reach, with its mode."""
    loose = {}
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        if mode(path) & 0o077:
            loose[str(path.relative_to(folder))] = oct(mode(path))
    return loose


async def test_a_fresh_data_directory_is_owner_only_from_each_entry_point(
    valor_env: Path, stdio_client_for
):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with loose_umask():
        # the `valor` command: a token for a chat creates the store and the scope secret
        created = subprocess.run(
            [sys.executable, "-m", "scheduler.cli", "token", "create", "--chat", "5"],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert created.returncode == 0, created.stderr
        # a stdio server as Claude Code starts it: a promise writes the store and the queue
        research = {"PERPLEXITY_API_KEY": "pplx-test-key-not-used"}  # accepted, never run
        async with stdio_client_for("promise-tools", env=research) as session:
            result = await session.call_tool(
                "create_promise", {"description": "look into the slow build", "chat_id": 5}
            )
            assert not result.is_error, texts(result)
    assert mode(valor_env) == 0o700
    for name in ("valor.db", "scope_secret", "promise_queue.db"):
        assert mode(valor_env / name) == 0o600, name
    assert private_files(valor_env) == {}  # -wal, -shm and anything else too


def test_without_the_umask_the_queue_file_would_be_readable_by_all(tmp_path: Path):
    """What the entry points' umask protects: huey creates its SQLite file with the default
    mode, which a 0022 umask leaves world-readable."""
    from huey import SqliteHuey

    with loose_umask():
        queue = SqliteHuey("probe", filename=str(tmp_path / "queue.db"))
        queue.pending_count()  # its first query creates the file
    assert mode(tmp_path / "queue.db") == 0o644


async def test_a_looser_data_directory_and_store_are_tightened_with_a_log_line(
    valor_env: Path, caplog
):
    with loose_umask():
        valor_env.mkdir(parents=True)
        get_store()
        close_all_stores()
        valor_env.chmod(0o755)
        (valor_env / "valor.db").chmod(0o644)
    assert mode(valor_env) == 0o755  # as an older version left it
    caplog.set_level(logging.WARNING, logger="valor.files")
    from servers.telegram import mcp

    result = await call(mcp, "search_conversation_history", {"query": "hello", "chat_id": 5})
    assert not result.is_error, texts(result)
    assert mode(valor_env) == 0o700
    assert mode(valor_env / "valor.db") == 0o600
    assert private_files(valor_env) == {}
    lines = [record.getMessage() for record in caplog.records]
    assert any("valor-data from 755 to 700" in line for line in lines), lines
    assert any("valor.db from 644 to 600" in line for line in lines), lines


def test_the_daemon_start_tightens_the_store_and_its_side_files(valor_env: Path, caplog):
    get_store().connection().execute("SELECT 1")
    wal = valor_env / "valor.db-wal"
    assert wal.exists()
    for path in (valor_env / "valor.db", wal):
        path.chmod(0o664)
    valor_env.chmod(0o750)
    caplog.set_level(logging.WARNING, logger="valor.files")
    secure_data_dir(valor_env, valor_env / "valor.db")  # what run_daemon calls first
    assert private_files(valor_env) == {}
    assert len([r for r in caplog.records if "tightened" in r.getMessage()]) >= 3
