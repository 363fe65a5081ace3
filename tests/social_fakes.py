"""Test helpers for social-tools and notion-tools: a loopback web-page server, a connection
watchdog that fails any connection to an address other than 127.0.0.1, and a spy transport."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.base import FakeService, RecordedRequest, Reply

ARTICLE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{title}</title>
<meta name="description" content="{description}">
<meta name="keywords" content="observability, tracing">
</head><body>
<nav><a href="/">Home</a> <a href="/about">About</a> Subscribe now!</nav>
<article>
<h1>{title}</h1>
<p>{body}</p>
<p>Teams that adopted distributed tracing found the slow database calls within a day, and the
latency budget for every request became visible to the whole engineering group.</p>
<p>The rollout took three weeks. Sampling kept the storage cost low while the error traces were
always kept in full.</p>
</article>
<footer>Copyright 2026 Example Corp. Cookie settings.</footer>
</body></html>"""

DEFAULT_BODY = (
    "Distributed tracing follows a single request through every service it touches. "
    "Each hop records a span with timing, and the spans join into one trace."
)


def article(title: str, description: str = "", body: str = DEFAULT_BODY) -> str:
    return ARTICLE_HTML.format(title=title, description=description, body=body)


class FakePages(FakeService):
    """A tiny web site on 127.0.0.1: set `pages[path] = Reply(...)` or HTML text."""

    def __init__(self) -> None:
        super().__init__()
        self.pages: dict[str, Any] = {}
        self.route("GET", r"/(?P<path>.*)", self._serve)

    def html(self, path: str, html: str, content_type: str = "text/html; charset=utf-8") -> str:
        self.pages[path] = Reply(body=html, headers={"Content-Type": content_type})
        return f"{self.url}/{path}"

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        self.pages[path] = Reply(status=status, body=b"", headers={"Location": location})
        return f"{self.url}/{path}"

    def _serve(self, request: RecordedRequest, path: str) -> Reply:
        page = self.pages.get(path)
        if page is None:
            return Reply(404, b"not here", {"Content-Type": "text/plain"})
        return page if isinstance(page, Reply) else Reply(body=page)


@pytest.fixture
def pages() -> Iterator[FakePages]:
    with FakePages() as fake:
        yield fake


class ConnectionWatch:
    def __init__(self) -> None:
        self.attempts: list[Any] = []


@pytest.fixture(autouse=True)
def only_loopback_connections(monkeypatch: pytest.MonkeyPatch) -> ConnectionWatch:
    """Every TCP connect in this process must go to 127.0.0.1; anything else fails the test."""
    watch = ConnectionWatch()
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            watch.attempts.append(address)
            if address[0] != "127.0.0.1":
                raise AssertionError(f"test tried to connect to {address!r}")

    def connect(sock: socket.socket, address: Any) -> Any:
        check(sock, address)
        return original_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> Any:
        check(sock, address)
        return original_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return watch


class SpyTransport(httpx.AsyncBaseTransport):
    """A real transport that records the URL and headers of every request it sends."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport(retries=0)
        self.sent: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def stub_resolver(table: dict[str, list[str]]):
    """A resolver answering from `table` (name -> addresses) and recording each lookup."""
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        if host not in table:
            raise AssertionError(f"unexpected lookup of {host}")
        return list(table[host])

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve
