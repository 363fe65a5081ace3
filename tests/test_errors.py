"""Unexpected failures are masked with a correlation id and never leak secrets."""

from __future__ import annotations

import logging

from fastmcp import Client

from servers.core.app import create_server
from servers.core.errors import Category, ValorError
from servers.core.settings import reset_settings_cache

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
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    reset_settings_cache()
    caplog.set_level(logging.DEBUG)
    async with Client(broken_server()) as client:
        result = await client.call_tool("explode", {}, raise_on_error=False)
    text = result.content[0].text
    assert result.is_error
    assert text.startswith("[internal]") and "correlation id" in text
    correlation_id = text.split("correlation id ")[1].split(")")[0]
    formatter = logging.Formatter("%(name)s %(message)s")
    logged = "\n".join(formatter.format(record) for record in caplog.records)  # + tracebacks
    assert correlation_id in logged  # the log line an operator can find
    assert FAKE_KEY not in logged and FAKE_KEY not in text
    assert "Traceback" not in logged


async def test_categorized_error_reaches_the_client_as_written():
    async with Client(broken_server()) as client:
        result = await client.call_tool("refuse", {}, raise_on_error=False)
    assert result.is_error
    assert result.content[0].text == "[rate_limit] Perplexity is rate limiting; retry in 30 s."
