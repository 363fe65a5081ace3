"""cleanup_resources: only Valor's own processes, files and store are touched.

Process tests run in a fresh PID namespace (tests/monitoring_cleanup_scenario.py as its PID 1), so
no process outside the test is reachable by the code under test, whatever it does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from fastmcp import Client

from servers.core import cleanup as cleanup_module
from servers.core.processes import register_process, running_registrations
from servers.core.settings import REPO_ROOT, get_settings
from servers.monitoring import mcp
from tests.support import configure

SCENARIO = REPO_ROOT / "tests" / "monitoring_cleanup_scenario.py"


def _namespace_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=10
    )
    return probe.returncode == 0


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict:
    if not _namespace_available():
        pytest.skip("needs `unshare --pid --fork --mount-proc` (root on Linux)")
    workdir = tmp_path_factory.mktemp("pidns")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALOR_")}
    completed = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(SCENARIO), str(workdir)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _by_pid(report: dict) -> dict[int, dict]:
    return {action["pid"]: action for action in report["processes"]}


def test_dry_run_reports_and_touches_nothing(scenario):
    pids = scenario["pids"]
    dry = _by_pid(scenario["dry"])
    assert scenario["dry"]["dry_run"] is True
    assert dry[pids["stale"][0]]["outcome"] == "would end"
    assert dry[pids["stubborn"][0]]["outcome"] == "would end"
    assert dry[pids["reused"][0]]["outcome"] == "would close registration"
    assert dry[pids["daemon"][0]]["outcome"] == "kept"
    assert all(all(states) for states in scenario["after_dry"].values())


def test_foreign_process_named_claude_survives(scenario):
    foreign = scenario["pids"]["foreign"][0]
    assert scenario["foreign_name"] == "claude"
    assert foreign not in _by_pid(scenario["real"])
    assert scenario["after_real"]["foreign"] == [True]


def test_registered_stale_tree_ends_gracefully_then_forcibly(scenario):
    pids = scenario["pids"]
    real = _by_pid(scenario["real"])
    stale = real[pids["stale"][0]]
    assert stale["outcome"] == "ended"
    assert sorted(stale["terminated"]) == sorted(pids["stale"])  # the shell and both children
    assert stale["killed"] == []
    stubborn = real[pids["stubborn"][0]]
    assert stubborn["outcome"] == "ended"
    assert sorted(stubborn["killed"]) == sorted(pids["stubborn"])  # SIGTERM ignored: SIGKILL
    assert scenario["after_real"]["stale"] == [False] * len(pids["stale"])
    assert scenario["after_real"]["stubborn"] == [False] * len(pids["stubborn"])
    # SIGKILL came only after the configured grace (longer than the default, so it was used).
    assert scenario["elapsed"] >= scenario["grace"]


def test_pid_reuse_is_left_alone(scenario):
    reused = scenario["pids"]["reused"][0]
    action = _by_pid(scenario["real"])[reused]
    assert action["outcome"] == "closed registration"
    assert "another program" in action["reason"]
    assert action["terminated"] == action["killed"] == []
    assert scenario["after_real"]["reused"] == [True]


def test_long_running_kind_kept_and_registrations_closed(scenario):
    pids = scenario["pids"]
    assert scenario["after_real"]["daemon"] == [True]
    assert _by_pid(scenario["real"])[scenario["exited_pid"]]["outcome"] == "closed registration"
    # Only the daemon's registration is still open afterwards.
    assert scenario["open_registrations"] == [pids["daemon"][0]]


def test_zero_age_limit_ends_a_run_registered_just_now(store):
    """max_age_hours=0 makes every bounded run stale, however young (its age was once rounded to
    0.0 h, which is not > 0, so a run younger than ~1.8 s was kept)."""
    run = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        registration = register_process(store, run.pid, "claude", "claude -p young")
        for now in (registration.create_time, registration.create_time - 0.5, time.time()):
            (planned,) = cleanup_module.clean_processes(
                store, dry_run=True, max_age_hours=0, grace_seconds=5, now=now
            )
            assert planned.outcome == "would end", planned.reason
        (action,) = cleanup_module.clean_processes(
            store, dry_run=False, max_age_hours=0, grace_seconds=5, now=time.time()
        )
        assert action.outcome == "ended" and action.terminated == [run.pid]
        assert run.wait(timeout=60) == -signal.SIGTERM
        assert running_registrations(store) == []
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


def test_a_run_within_its_age_limit_is_kept(store):
    run = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        registration = register_process(store, run.pid, "claude", "claude -p young")
        now = registration.create_time + 3600  # an hour old against a two-hour limit
        (action,) = cleanup_module.clean_processes(
            store, dry_run=False, max_age_hours=2, grace_seconds=5, now=now
        )
        assert action.outcome == "kept" and action.age_hours == 1.0
        assert run.poll() is None
    finally:
        run.kill()
        run.wait()


# -- files and store (no process is registered in these tests' store) -----------------------------
def _age(path, hours: float) -> None:
    stamp = time.time() - hours * 3600
    os.utime(path, (stamp, stamp), follow_symlinks=False)


async def test_temp_files_past_their_age_go_and_symlinks_are_not_followed(store, tmp_path):
    assert running_registrations(store) == []
    temp = get_settings().temp_path
    (temp / "run-1").mkdir(parents=True)
    old_file = temp / "run-1" / "mcp-config.json"
    old_file.write_text("{}")
    fresh_file = temp / "fresh.txt"
    fresh_file.write_text("keep me")
    outside = tmp_path / "outside.txt"
    outside.write_text("not Valor's")
    link = temp / "link-to-outside"
    link.symlink_to(outside)
    _age(old_file, 48)
    _age(temp / "run-1", 48)
    _age(link, 48)
    _age(outside, 48)
    leftover = get_settings().data_dir / "run" / "mcp-abc.json"  # a crashed bridge run's config
    leftover.parent.mkdir(parents=True)
    leftover.write_text('{"headers": "token"}')
    _age(leftover, 30)

    async with Client(mcp) as client:
        dry = (await client.call_tool("cleanup_resources", {})).structured_content
        assert old_file.exists() and link.is_symlink()
        real = (await client.call_tool("cleanup_resources", {"dry_run": False})).structured_content

    planned = {entry["path"] for entry in dry["temp_files"]}
    assert planned == {str(old_file), str(link), str(leftover)}
    assert {entry["path"] for entry in real["temp_files"]} == planned
    assert not old_file.exists() and not link.is_symlink() and not (temp / "run-1").exists()
    assert not leftover.exists() and leftover.parent.is_dir()  # the directory itself stays
    assert fresh_file.read_text() == "keep me"
    assert outside.read_text() == "not Valor's"  # the link went, its target stayed
    assert real["processes"] == []


async def test_a_temp_dir_that_is_not_valors_is_never_swept(store, tmp_path, monkeypatch):
    foreign = tmp_path / "somebody-elses"
    foreign.mkdir()
    precious = foreign / "thesis.tex"
    precious.write_text("years of work")
    _age(precious, 1000)
    configure(monkeypatch, VALOR_TEMP_DIR=str(foreign))
    async with Client(mcp) as client:
        report = await client.call_tool("cleanup_resources", {"dry_run": False})
    assert report.structured_content["temp_dirs_refused"] == [str(foreign)]
    assert precious.read_text() == "years of work"

    marked = cleanup_module.ensure_temp_dir(tmp_path / "valor-scratch")  # made by Valor: marked
    old = marked / "old.json"
    old.write_text("{}")
    _age(old, 48)
    _age(marked / cleanup_module.TEMP_MARKER, 48)
    configure(monkeypatch, VALOR_TEMP_DIR=str(marked))
    async with Client(mcp) as client:
        report = await client.call_tool("cleanup_resources", {"dry_run": False})
    assert report.structured_content["temp_dirs_refused"] == []
    assert not old.exists() and (marked / cleanup_module.TEMP_MARKER).exists()


def test_store_maintenance_prunes_old_metrics_and_checkpoints(store):
    now = time.time()
    old = now - 40 * 86400
    with store.transaction() as conn:
        conn.executemany(
            "INSERT INTO tool_calls (server, tool, success, duration_ms, called_at) "
            "VALUES ('monitoring-tools', 'system_health', 1, 10, ?)",
            [(old,)] * 3000 + [(now,)] * 5,
        )
        conn.execute(
            "INSERT INTO claude_sessions (session_id, started_at, ended_at) VALUES ('s', ?, ?)",
            (old, old),
        )
    dry = cleanup_module.cleanup(store, [], get_settings().data_dir, dry_run=True)
    assert dry.store.tool_calls_pruned == 3000 and dry.store.sessions_pruned == 1
    assert store.query("SELECT count(*) FROM tool_calls")[0][0] == 3005

    report = cleanup_module.cleanup(store, [], get_settings().data_dir, dry_run=False)
    assert report.store.tool_calls_pruned == 3000
    assert report.store.sessions_pruned == 1
    assert report.store.checkpointed and report.store.vacuumed
    assert store.query("SELECT count(*) FROM tool_calls")[0][0] == 5
    assert not (store.path.parent / (store.path.name + "-wal")).stat().st_size


def test_session_left_open_by_a_dead_process_is_closed(store):
    gone = subprocess.Popen(["true"])
    gone.wait()
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO claude_sessions (session_id, pid, create_time, started_at) "
            "VALUES ('dead', ?, ?, ?)",
            (gone.pid, time.time() - 60, time.time() - 60),
        )
    assert cleanup_module.close_gone_sessions(store, dry_run=True, now=time.time()) == 1
    assert cleanup_module.close_gone_sessions(store, dry_run=False, now=time.time()) == 1
    row = store.query("SELECT ended_at, end_reason FROM claude_sessions")[0]
    assert row["ended_at"] is not None and row["end_reason"] == "process gone"
