"""A real Redis server for a test: started on a free loopback port with its files under tmp_path.

Persistence is the append-only file with ``appendfsync always`` (no RDB snapshots): every write
Redis acknowledged is on disk before the reply, so a SIGKILLed server restarted on the same
directory has everything it acknowledged.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.network import free_port

START_TIMEOUT_SECONDS = 30.0


def redis_server_binary() -> str:
    """The redis-server executable, or skip the test saying how to get one."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(
            "redis-server is not installed: `bash .ci/setup --dev` installs it "
            "(apt-get install redis-server)"
        )
    return binary


class RedisServer:
    """One redis-server process on 127.0.0.1; ``restart`` keeps its port and its files."""

    def __init__(self, directory: Path, appendfsync: str = "always"):
        self.binary = redis_server_binary()
        self.appendfsync = appendfsync  # "everysec": up to a second of writes lost on a crash
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        for _ in range(5):  # a free port can be taken between the probe and the bind: retry
            self.port = self.port or free_port()
            options = {
                "bind": "127.0.0.1",
                "port": str(self.port),
                "dir": str(self.directory),
                "appendonly": "yes",
                "appendfsync": self.appendfsync,
                "save": "",
                "daemonize": "no",
                "logfile": str(self.directory / "redis.log"),
            }
            self.process = subprocess.Popen(
                [self.binary, *(part for k, v in options.items() for part in (f"--{k}", v))],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_ready():
                return self
            self.process.kill()
            self.process.wait(10)
            self.port = 0
        raise RuntimeError(f"redis-server did not start; see {self.directory / 'redis.log'}")

    def _wait_ready(self) -> bool:
        import redis

        client = redis.Redis(port=self.port, socket_timeout=2)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        try:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.RedisError:
                    time.sleep(0.02)
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown save; only what the append-only file holds survives."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def redis_server(tmp_path):
    """A real Redis for the test (a pytest plugin of tests/conftest.py)."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()
