"""The shipped systemd unit: systemd-analyze accepts it, and `valor daemon` runs and stops under its
settings (environment, directories, stop signal and timeout) as systemd would apply them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from servers.core.settings import REPO_ROOT
from tests.support import free_port, wait_until

UNIT = REPO_ROOT / "scheduler" / "systemd" / "valor-daemon.service"
SHIPPED_ROOT = "/opt/valor"
DEADLINE_SECONDS = 120.0


def unit_for_this_checkout(tmp_path, text: str | None = None):
    """The unit with this checkout in place of /opt/valor (where verify looks for ExecStart)."""
    path = tmp_path / "valor-daemon.service"
    path.write_text((text or UNIT.read_text()).replace(SHIPPED_ROOT, str(REPO_ROOT)))
    return path


def verify(path):
    return subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
    )


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed here (the unit is still checked by the other tests)",
)


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    result = verify(unit_for_this_checkout(tmp_path))
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


@needs_systemd_analyze
def test_verify_would_catch_a_broken_unit(tmp_path):
    """The check above can fail: a typo in a setting and a missing executable are reported."""
    broken = UNIT.read_text().replace("KillMode=mixed", "KillMode=sometimes")
    assert "Failed to parse kill mode" in verify(unit_for_this_checkout(tmp_path, broken)).stderr
    missing = UNIT.read_text().replace("ExecStart=/opt/valor", "ExecStart=/nonexistent")
    result = verify(unit_for_this_checkout(tmp_path, missing))
    assert result.returncode != 0 and "is not executable" in result.stderr


def service_section() -> dict[str, list[str]]:
    """The [Service] settings, each with every value it is given (Environment= repeats)."""
    values: dict[str, list[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_the_unit_restarts_on_failure_and_stops_within_the_grace_period():
    service = service_section()
    assert service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == ["2"]  # a configuration error
    assert service["KillMode"] == ["mixed"] and service["KillSignal"] == ["SIGTERM"]
    timeout = float(service["TimeoutStopSec"][0].removesuffix("s"))
    from servers.core.settings import Settings

    grace = Settings.model_fields["daemon_shutdown_grace_seconds"].default
    assert timeout >= grace + 20  # jobs' grace, then children's TERM/KILL, then the host
    assert service["StateDirectory"] == ["valor"] and service["LogsDirectory"] == ["valor"]


@pytest.mark.e2e  # the daemon's command line in a subprocess
def test_valor_daemon_runs_and_stops_cleanly_under_the_units_settings(tmp_path):
    """ExecStart with the unit's environment (%S and %L as systemd expands them, here under a
    temporary root), stopped the way systemd stops it: KillSignal, then TimeoutStopSec."""
    service = service_section()
    state, logs = tmp_path / "state", tmp_path / "log"
    for folder in (state / "valor", logs / "valor"):
        folder.mkdir(parents=True, mode=0o700)  # StateDirectory= / LogsDirectory=
    env = {key: value for key, value in os.environ.items() if not key.startswith("VALOR_")}
    for assignment in service["Environment"]:
        key, _, value = assignment.partition("=")
        env[key] = value.replace("%S", str(state)).replace("%L", str(logs))
    metrics_port = free_port()
    env.update(
        VALOR_HTTP_PORT="0",  # tests run side by side; the unit uses the defaults
        VALOR_METRICS_PORT=str(metrics_port),
        VALOR_PROMISE_WORKERS="1",
        VALOR_DAYDREAM_BASE_URL="http://127.0.0.1:9/v1",
        VALOR_ENV_FILE=str(tmp_path / "valor.env"),  # not this checkout's .env
    )
    (tmp_path / "valor.env").write_text("")
    command = service["ExecStart"][0].replace(SHIPPED_ROOT, str(REPO_ROOT)).split()
    process = subprocess.Popen(
        command,
        cwd=service["WorkingDirectory"][0].replace(SHIPPED_ROOT, str(REPO_ROOT)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own control group, as it were
    )

    def healthy():
        assert process.poll() is None, process.stderr.read()[-3000:]
        try:
            url = f"http://127.0.0.1:{metrics_port}/healthz"
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())["status"] == "ok"
        except (OSError, urllib.error.HTTPError):
            return False

    try:
        wait_until(healthy, DEADLINE_SECONDS, "/healthz answering under the unit's settings")
    finally:
        process.send_signal(getattr(signal, service["KillSignal"][0]))
        started = time.monotonic()
        timeout = float(service["TimeoutStopSec"][0].removesuffix("s"))
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
        stopped_in = time.monotonic() - started
    assert returncode == 0, process.stderr.read()[-3000:]
    assert stopped_in < timeout
    data = state / "valor"
    assert (data / "valor.db").exists() and stat.S_IMODE(data.stat().st_mode) == 0o700
    log_text = (logs / "valor" / "daemon.log").read_text()
    assert "daemon ready" in log_text and "daemon stopped" in log_text
