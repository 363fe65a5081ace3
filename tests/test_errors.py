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
