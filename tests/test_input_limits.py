# ruff: noqa: F811 - pytest fixtures imported from tests.social_fakes are parameters here
"""Inputs no tool can use are [input] errors with a clear message (never [internal], never a
500), text arguments are capped before any work, and a compressed page is bounded as it streams.

Real tools through FastMCP's in-memory client, the real HTTP host, a loopback page server."""

from __future__ import annotations

import gzip
import time
import tracemalloc

import httpx
import pytest

from servers.context import mcp as context_server
from servers.core.errors import ValorError
from servers.core.http_guard import FetchLimits, allow_loopback_ports_for_tests, fetch
from servers.core.mcp_config import endpoint
from servers.core.trust import mint_scope_token, new_secret
from servers.hosting import hosted
from servers.social import mcp as social_server
from servers.telegram import mcp as telegram_server
from tests.fakes.base import Reply
from tests.social_fakes import only_loopback_connections, pages  # noqa: F401 - fixtures
from tests.support import INITIALIZE_REQUEST, call, configure, texts

MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def refused(result, *phrases: str) -> str:
    text = texts(result)
    assert result.is_error, text
    assert text.startswith("[input]"), text
    for phrase in phrases:
        assert phrase in text, text
    return text


# -- numbers, NUL, lone surrogates: checked on every tool's raw arguments -----------------------
@pytest.mark.parametrize("chat_id", [2**63, 2**64 + 5, -(2**63) - 1, 1e19])
async def test_ids_beyond_sqlite_integers_are_input_errors(chat_id):
    result = await call(
        telegram_server, "search_conversation_history", {"query": "hello", "chat_id": chat_id}
    )
    refused(result, "chat_id", "out of range")


async def test_the_largest_sqlite_integer_still_reaches_the_tool():
    result = await call(
        telegram_server, "search_conversation_history", {"query": "hello", "chat_id": 2**63 - 1}
    )
    assert not result.is_error, texts(result)


@pytest.mark.parametrize(
    ("text", "phrase"),
    [("hello \udcff world", "lone surrogate"), ("hello\x00world", "NUL character")],
)
async def test_nul_and_lone_surrogates_in_text_are_input_errors(text, phrase):
    search = await call(telegram_server, "search_conversation_history", {"query": text})
    refused(search, "query", phrase)
    # nested inside a structured argument too (a conversation's message)
    nested = await call(
        context_server,
        "context_health",
        {
            "messages": [{"role": "user", "content": "fine"}, {"role": "user", "content": text}],
            "max_tokens": 1000,
        },
    )
    refused(nested, "messages[1].content", phrase)


async def test_an_idna_error_in_a_link_is_an_input_error():
    for url in ("http://xn--zz.example/", "https://xn--ls8h.example/page"):
        result = await call(social_server, "save_link", {"url": url})
        refused(result, "internationalized domain name")


async def test_a_redirect_to_a_bad_idna_host_is_refused_cleanly(pages):
    port = int(pages.url.rsplit(":", 1)[1])
    pages.redirect("hop", "http://xn--zz.example/next")
    with allow_loopback_ports_for_tests(port), pytest.raises(ValorError) as caught:
        await fetch(f"{pages.url}/hop")
    assert caught.value.category in ("input", "upstream_api"), caught.value
    assert "internal" not in str(caught.value)


async def test_a_token_with_a_non_ascii_signature_is_a_401_like_any_bad_token():
    secret = new_secret()
    payload = mint_scope_token(secret, 7).rsplit(".", 1)[0]
    signatures = {
        "utf-8": "é".encode() * 32,
        "latin-1": bytes(range(0xC0, 0x100)),
        "mixed": b"ab\xff\xfe" + b"0" * 60,
    }
    async with hosted(secret) as base_url, httpx.AsyncClient(timeout=30) as http:
        for name, signature in signatures.items():
            authorization = b"Bearer " + payload.encode() + b"." + signature
            reply = await http.post(
                endpoint(base_url, "telegram-tools"),
                json=INITIALIZE_REQUEST,
                headers=[*MCP_HEADERS.items(), (b"Authorization", authorization)],
            )
            assert reply.status_code == 401, (name, reply.status_code, reply.text)
            assert 'error="invalid_token"' in reply.headers["www-authenticate"]


# -- size limits ---------------------------------------------------------------------------------
async def test_every_tool_caps_the_text_of_one_call(monkeypatch):
    # chat_id accepts a string and has no length of its own: the general cap is what refuses
    huge = "7" * 25_000
    result = await call(telegram_server, "get_conversation_context", {"chat_id": huge})
    refused(result, "25,000 characters", "VALOR_TOOL_TEXT_MAX_CHARS", "chat_id")
    configure(monkeypatch, VALOR_TOOL_TEXT_MAX_CHARS="30000")
    allowed = await call(telegram_server, "get_conversation_context", {"chat_id": huge})
    assert "VALOR_TOOL_TEXT_MAX_CHARS" not in texts(allowed)  # past the cap: the tool decided


async def test_optimize_context_refuses_10_mb_at_once():
    ten_mb = "word " * 2_000_000
    started, cpu = time.monotonic(), time.process_time()
    result = await call(
        context_server,
        "optimize_context",
        {"messages": [{"role": "user", "content": ten_mb}], "max_tokens": 4000},
    )
    elapsed, cpu_used = time.monotonic() - started, time.process_time() - cpu
    refused(result, "hold 10,000,0", "limit is 1,000,000 (VALOR_CONTEXT_TOOL_MAX_CHARS)")
    # 12 s of CPU without the limit; the refusal is one pass over the text (generous bound)
    assert cpu_used < 3.0 and elapsed < 10.0, (cpu_used, elapsed)


async def test_context_tools_have_their_own_larger_cap(monkeypatch):
    conversation = [{"role": "user", "content": "word " * 10_000}] * 3  # 150,000 characters
    ok = await call(
        context_server, "context_health", {"messages": conversation, "max_tokens": 100_000}
    )
    assert not ok.is_error, texts(ok)  # far beyond the general cap, within context-tools' own
    configure(monkeypatch, VALOR_CONTEXT_TOOL_MAX_CHARS="100000")
    capped = await call(
        context_server, "context_health", {"messages": conversation, "max_tokens": 100_000}
    )
    refused(capped, "hold 150,0", "limit is 100,000 (VALOR_CONTEXT_TOOL_MAX_CHARS)")


# -- decompression bounded as it streams -----------------------------------------------------------
LIMIT = 1_000_000
BOMB = gzip.compress(b"\0" * 64_000_000, compresslevel=9)  # 64 MB of zeros in ~60 KB


async def peak_while(work) -> tuple[int, BaseException | None]:
    tracemalloc.start()
    tracemalloc.reset_peak()
    error: BaseException | None = None
    try:
        await work()
    except Exception as exc:
        error = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, error


async def test_a_gzip_bomb_is_refused_within_a_small_multiple_of_the_limit(pages):
    port = int(pages.url.rsplit(":", 1)[1])
    pages.pages["bomb"] = Reply(
        body=BOMB, headers={"Content-Type": "text/html", "Content-Encoding": "gzip"}
    )
    limits = FetchLimits(max_bytes=LIMIT, timeout_seconds=30)

    async def guarded() -> None:
        with allow_loopback_ports_for_tests(port):
            await fetch(f"{pages.url}/bomb", limits=limits)

    async def httpx_decoding() -> None:
        # What the fetcher did before: httpx inflates each network chunk whole, then counts.
        async with (
            httpx.AsyncClient(timeout=30) as client,
            client.stream("GET", f"{pages.url}/bomb") as response,
        ):
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > LIMIT:
                    raise ValueError("too large")

    peak, error = await peak_while(guarded)
    assert isinstance(error, ValorError) and "larger than 1,000,000 bytes" in str(error), error
    assert peak < 4 * LIMIT, f"peak {peak:,} bytes for a {LIMIT:,}-byte limit"
    unbounded_peak, _ = await peak_while(httpx_decoding)
    assert unbounded_peak > 10 * LIMIT, unbounded_peak  # the measurement can tell the difference


async def test_compressed_pages_within_the_limit_still_arrive(pages):
    import zlib

    port = int(pages.url.rsplit(":", 1)[1])
    html = b"<html><body>" + b"tracing spans " * 10_000 + b"</body></html>"
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    encodings = {
        "gzip": gzip.compress(html),
        "deflate": zlib.compress(html),
        "raw-deflate": raw_deflate.compress(html) + raw_deflate.flush(),
    }
    with allow_loopback_ports_for_tests(port):
        for name, body in encodings.items():
            coding = "deflate" if name == "raw-deflate" else name
            pages.pages[name] = Reply(
                body=body, headers={"Content-Type": "text/html", "Content-Encoding": coding}
            )
            page = await fetch(f"{pages.url}/{name}", limits=FetchLimits(max_bytes=len(html)))
            assert page.body == html, name
        pages.pages["exact"] = Reply(
            body=gzip.compress(html),
            headers={"Content-Type": "text/html", "Content-Encoding": "gzip"},
        )
        with pytest.raises(ValorError, match="larger than"):
            await fetch(f"{pages.url}/exact", limits=FetchLimits(max_bytes=len(html) - 1))
