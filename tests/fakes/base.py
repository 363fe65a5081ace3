"""Loopback HTTP fakes: real HTTP servers on 127.0.0.1 that record requests and inject failures."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

FAILURE_KINDS = ("401", "403", "404", "429", "500", "503", "timeout", "malformed", "disconnect")
MALFORMED_BODY = b'{"this is": not json'


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # keys lowercased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Reply:
    """What a route handler returns (a plain dict or list means 200 JSON)."""

    status: int = 200
    body: Any = None  # JSON-able, or bytes/str sent as is
    headers: dict[str, str] = field(default_factory=dict)
    stream: Iterable[bytes] | None = None  # sent chunked, e.g. server-sent events


def sse(events: Iterable[tuple[str | None, Any]]) -> Reply:
    """A server-sent-events reply from (event name or None, JSON data or raw str) pairs."""

    def chunks() -> Iterable[bytes]:
        for name, data in events:
            text = data if isinstance(data, str) else json.dumps(data)
            head = f"event: {name}\n" if name else ""
            yield f"{head}data: {text}\n\n".encode()

    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    return Reply(headers=headers, stream=chunks())


@dataclass
class _Failure:
    kind: str
    remaining: int
    retry_after: float | None
    path: str | None


Handler = Callable[..., Any]


class FakeService:
    """Base for the fakes. Subclasses call `route()` and override `error_body()`."""

    hang_seconds: float = 30.0

    def __init__(self, required_api_key: str | None = None) -> None:
        self.required_api_key = required_api_key
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self._requests: list[RecordedRequest] = []
        self._failures: list[_Failure] = []
        self.errors: list[Exception] = []  # exceptions raised by handlers or responders
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FakeService:
        if self._server is None:
            self._closing.clear()
            self._server = _Server(("127.0.0.1", 0), _RequestHandler)
            self._server.service = self
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},  # close() waits up to one poll interval
                name=type(self).__name__,
                daemon=True,
            )
            self._thread.start()
        return self

    def close(self) -> None:
        if self._server is None:
            return
        self._closing.set()  # wakes handlers sleeping in a "timeout" failure
        self._server.shutdown()
        self._server.close_open_connections()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- recording ---------------------------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, path_pattern: str, method: str | None = None) -> list[RecordedRequest]:
        return [
            r
            for r in self.requests
            if re.search(path_pattern, r.path) and (method is None or r.method == method)
        ]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- failure injection -------------------------------------------------------------------
    def fail_next(
        self,
        kind: str,
        count: int = 1,
        retry_after: float | None = None,
        path: str | None = None,
    ) -> None:
        """Make the next `count` requests (whose path matches the regex `path`) fail as `kind`."""
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}; use one of {FAILURE_KINDS}")
        with self._lock:
            self._failures.append(_Failure(kind, count, retry_after, path))

    def _take_failure(self, path: str) -> _Failure | None:
        with self._lock:
            for failure in self._failures:
                if failure.path is None or re.search(failure.path, path):
                    failure.remaining -= 1
                    if failure.remaining <= 0:
                        self._failures.remove(failure)
                    return failure
        return None

    # -- routing and provider shapes ---------------------------------------------------------
    def route(self, method: str, path_regex: str, handler: Handler) -> None:
        """Register `handler(request, **named_groups)`; later registrations win."""
        self._routes.insert(0, (method.upper(), re.compile(path_regex + r"\Z"), handler))

    def error_body(self, status: int, message: str) -> Any:
        """The provider's JSON error shape; subclasses override."""
        return {"error": {"status": status, "message": message}}

    def error(self, status: int, message: str | None = None, **headers: str) -> Reply:
        message = message or _DEFAULT_MESSAGES.get(status, f"HTTP {status}")
        return Reply(status, self.error_body(status, message), dict(headers))

    def has_valid_key(self, request: RecordedRequest) -> bool:
        key = self.required_api_key
        bearer = request.headers.get("authorization", "")
        return bearer == f"Bearer {key}" or request.headers.get("x-api-key") == key

    def dispatch(self, request: RecordedRequest) -> Reply | str:
        """Returns a Reply, or "disconnect" to drop the connection without an answer."""
        failure = self._take_failure(request.path)
        if failure is not None:
            if failure.kind == "timeout":
                if self._closing.wait(self.hang_seconds):
                    return "disconnect"  # closing: stop hanging at once
            elif failure.kind == "disconnect":
                return "disconnect"
            elif failure.kind == "malformed":
                return Reply(body=MALFORMED_BODY, headers={"Content-Type": "application/json"})
            else:
                reply = self.error(int(failure.kind))
                if failure.retry_after is not None:
                    reply.headers["Retry-After"] = f"{failure.retry_after:g}"
                return reply
        if self.required_api_key is not None and not self.has_valid_key(request):
            return self.error(401, "Invalid or missing API key")
        for method, pattern, handler in self._routes:
            match = pattern.match(request.path)
            if match and method == request.method:
                result = handler(request, **match.groupdict())
                return result if isinstance(result, Reply) else Reply(body=result)
        return self.error(404, f"No route for {request.method} {request.path}")


_DEFAULT_MESSAGES = {
    401: "Invalid API key",
    403: "Permission denied",
    404: "Not found",
    429: "Rate limit exceeded",
    500: "Internal server error",
    503: "Service unavailable",
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung handler must never block interpreter exit or close()
    service: FakeService

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.open_connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self.open_connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self.open_connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hang up; that's fine
            super().handle_error(request, client_address)

    def close_open_connections(self) -> None:
        """Ends idle keep-alive connections so their handler threads exit."""
        with self._connections_lock:
            connections = list(self.open_connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                connection.shutdown(socket.SHUT_RDWR)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive plus chunked streaming, like real APIs
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return body
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        split = urlsplit(self.path)
        request = RecordedRequest(
            method=self.command,
            path=split.path,
            query=dict(parse_qsl(split.query, keep_blank_values=True)),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=self._read_body(),
        )
        service = self.server.service
        with service._lock:
            service._requests.append(request)
        try:
            reply = service.dispatch(request)
        except Exception as exc:  # a bug in a fake or a responder: answer 500, keep it for the test
            service.errors.append(exc)
            reply = service.error(500, f"fake crashed: {exc!r}")
        if reply == "disconnect":
            self.close_connection = True
            return
        assert isinstance(reply, Reply)
        self._send(reply)

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        headers = {k.lower(): v for k, v in reply.headers.items()}
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.stream is not None:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for chunk in reply.stream:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            return
        body = reply.body
        if isinstance(body, str):
            body = body.encode()
        elif not isinstance(body, bytes):
            body = json.dumps(body).encode()
            if "content-type" not in headers:
                self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle
