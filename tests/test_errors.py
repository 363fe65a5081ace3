"""Unexpected failures are masked with a correlation id and never leak secrets."""

from __future__ import annotations

import logging

from servers.core.app import create_server
from servers.core.errors import Category, ValorError
from tests.support import call, configure, texts

FAKE_KEY = "sk-test-VALOR-secret-123456789"


def broken_server():
    server = create_server("broken-tools", instructions="test")

    @server.tool
    def explode() -> str:
        raise RuntimeError(f"upstream said no to key {FAKE_KEY}")

    @server.tool
    def refuse() -> str:
        raise ValorError(Category.RATE_LIMIT, "Perplexity is rate limiting; retry in 30 s.")

    return server


async def test_unexpected_error_is_masked_with_correlation_id(caplog, monkeypatch):
    configure(monkeypatch, OPENAI_API_KEY=FAKE_KEY)
    caplog.set_level(logging.DEBUG)
    result = await call(broken_server(), "explode")
    text = texts(result)
    assert result.is_error
    assert text.startswith("[internal]") and "correlation id" in text
    correlation_id = text.split("correlation id ")[1].split(")")[0]
    formatter = logging.Formatter("%(name)s %(message)s")
    logged = "\n".join(formatter.format(record) for record in caplog.records)  # + tracebacks
    assert correlation_id in logged  # the log line an operator can find
    assert FAKE_KEY not in logged and FAKE_KEY not in text
    assert "Traceback" not in logged


async def test_categorized_error_reaches_the_client_as_written():
    result = await call(broken_server(), "refuse")
    assert result.is_error
    assert texts(result) == "[rate_limit] Perplexity is rate limiting; retry in 30 s."


# -- log lines describe an unexpected error without its text -----------------------------------
PLANTED = "Alice wrote: my flat is at 12 Garden Lane, the door code is 4471"


def all_logged(caplog) -> str:
    formatter = logging.Formatter("%(name)s %(message)s")
    return "\n".join(formatter.format(record) for record in caplog.records)  # + tracebacks


async def test_an_unexpected_error_is_logged_by_type_and_place_not_by_its_text(caplog):
    caplog.set_level(logging.DEBUG)
    server = create_server("leaky-tools", instructions="test")

    @server.tool
    def summarize(text: str) -> str:
        raise ValueError(f"could not summarize {text!r}")

    result = await call(server, "summarize", {"text": PLANTED})
    assert texts(result).startswith("[internal]")
    logged = all_logged(caplog)
    assert "ValueError at tests/test_errors.py:" in logged and "in summarize" in logged, logged
    assert "characters withheld" in logged
    assert "Garden Lane" not in logged and "4471" not in logged, logged


def test_a_failed_daemon_job_is_recorded_without_the_exception_text():
    import asyncio

    from scheduler.daemon import Daemon
    from servers.core.settings import get_settings

    daemon = Daemon(get_settings(), schedule=False, workers=0, run_bridge=False)

    async def job_health():
        raise RuntimeError(PLANTED)

    daemon.job_health = job_health
    outcome = asyncio.run(daemon.run_job("health"))
    assert not outcome.ok
    assert "RuntimeError" in outcome.detail and "Garden Lane" not in outcome.detail, outcome.detail


def test_the_description_keeps_codes_that_hold_no_private_text(tmp_path):
    import sqlite3

    from servers.core.errors import describe_exception

    try:
        sqlite3.connect(":memory:").execute(f"SELECT * FROM nowhere WHERE x = '{PLANTED}'")
    except sqlite3.Error as exc:
        sql = describe_exception(exc)
    try:
        (tmp_path / "missing" / PLANTED).read_text()
    except OSError as exc:
        missing = describe_exception(exc)
    assert "sqlite3.OperationalError" in sql and "(SQLITE_ERROR)" in sql and "Garden" not in sql
    assert "FileNotFoundError" in missing and "ENOENT" in missing and "Garden" not in missing


async def test_a_long_digit_run_in_an_error_is_redacted_in_milliseconds():
    import time

    from servers.core.errors import redact

    started = time.monotonic()
    assert redact("7" * 25_000).startswith("777")  # quadratic before: 5 s on this input
    assert redact("token 123456789:" + "A" * 35 + " end") == "token *** end"
    assert time.monotonic() - started < 0.5
