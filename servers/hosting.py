"""Host every Valor server in one process over streamable HTTP on loopback.

Each server's ``http_app()`` is mounted under ``/<server-name>`` (its endpoint is
``/<server-name>/mcp``); the parent lifespan enters every mounted app's lifespan, without which
requests fail with "Task group is not initialized".

``HostGuard`` stands before every server, always:
- ``Host`` must name this host (loopback names on the bound port, or ``VALOR_HTTP_ALLOWED_HOSTS``)
  and an ``Origin``, when sent, one of the same: a web page cannot reach it by DNS rebinding.
- every request needs a valid bearer token (``servers.core.trust``; or a JWT from a configured
  identity provider); a 401 carries ``WWW-Authenticate: Bearer resource_metadata=...`` and the
  RFC 9728 metadata is served at ``/.well-known/oauth-protected-resource[/<server>/mcp]``, as the
  MCP authorization spec asks, so clients do not go guessing at OAuth.
The verified principal rides on the request (``trust.PRINCIPAL_SCOPE_KEY``) for the tools.

``ListingCache`` then answers the listing methods a client sends at every connect
(``server/discover``, ``tools/list``, ``prompts/list``, ``resources/list``,
``resources/templates/list``; Claude Code sends 32 of them for the eight servers) from memory: the
answer is fixed by the server's components, the principal and the request itself, and building it
through FastMCP (middleware, JSON Schema dereferencing, serialization) was most of the host's work
at a connect; a hit costs well under a millisecond. Authentication still runs on every request,
before the cache.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount

from servers import load_all
from servers.core import tokens_issued, trust
from servers.core.errors import Category, ValorError
from servers.core.mcp_config import MCP_PATH
from servers.core.principals import CHAT_SCOPE, SERVER_SCOPE_PREFIX, Principal

if TYPE_CHECKING:
    from servers.core.settings import Settings

__all__ = [
    "HostGuard",
    "ListingCache",
    "RemoteBindRefused",
    "build_app",
    "check_bind_host",
    "hosted",
]

log = logging.getLogger("valor.hosting")

METADATA_PATH = "/.well-known/oauth-protected-resource"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class RemoteBindRefused(ValorError):
    pass


def is_loopback(host: str) -> bool:
    name = host.strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback bind unless the operator said so explicitly."""
    if allow_remote or is_loopback(host):
        return
    raise RemoteBindRefused(
        Category.CONFIG,
        f"Refusing to host on {host}: it is not a loopback address, so other machines could "
        "reach the tools, and tokens would travel in clear over plain HTTP. To do it anyway, put "
        "a TLS front (a reverse proxy terminating HTTPS) before Valor, add its name to "
        "VALOR_HTTP_ALLOWED_HOSTS, and pass --allow-remote (or set VALOR_HTTP_ALLOW_REMOTE=true); "
        "see docs/configuration.md.",
    )


def _split_host(value: str, default_port: int) -> tuple[str, int] | None:
    try:
        parts = urlsplit("//" + value)
        if not parts.hostname or parts.username is not None or parts.path:
            return None
        return parts.hostname.lower(), parts.port or default_port
    except ValueError:
        return None


class HostGuard:
    """ASGI middleware: Host/Origin checks, protected-resource metadata, bearer tokens."""

    def __init__(
        self,
        app: Any,
        secret: bytes,
        *,
        server_names: Iterable[str],
        allowed_hosts: Iterable[str] = (),
        revoked: Callable[[str], bool] | None = None,
        jwt_verifier: Any = None,
        authorization_servers: Iterable[str] = (),
        listings: ListingCache | None = None,
    ):
        self.app = app
        self.listings = listings
        self.secret = secret
        self.server_names = frozenset(server_names)
        self.revoked = revoked
        self.jwt_verifier = jwt_verifier
        self.authorization_servers = list(authorization_servers)
        self.exact_hosts: set[tuple[str, int]] = set()
        self.any_port_hosts: set[str] = set()
        for entry in allowed_hosts:
            parsed = _split_host(entry, 0)
            if parsed is None:
                continue
            if parsed[1]:
                self.exact_hosts.add(parsed)
            else:
                self.any_port_hosts.add(parsed[0])

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if not self._host_allowed(scope, host, scope.get("scheme", "http")):
            await _reply(scope, receive, send, 421, {"error": "misdirected_request"})
            return
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(scope, origin):
            await _reply(scope, receive, send, 403, {"error": "forbidden_origin"})
            return
        path = scope.get("path", "")
        base = f"{scope.get('scheme', 'http')}://{host}"
        if path == METADATA_PATH or path.startswith(METADATA_PATH + "/"):
            await self._metadata(scope, receive, send, base, path[len(METADATA_PATH) :])
            return
        server = self._server_of(path)
        metadata_url = base + METADATA_PATH + (f"/{server}{MCP_PATH}" if server else "")
        token = trust.bearer_token(headers.get("authorization"))
        try:
            if token is None:
                raise trust.ScopeTokenError("missing bearer token")
            principal = await self._verify(token)
        except trust.ScopeTokenError as exc:
            challenge = f'Bearer resource_metadata="{metadata_url}"'
            if token is not None:
                challenge += f', error="invalid_token", error_description="{exc}"'
            await _reply(
                scope,
                receive,
                send,
                401,
                {"error": "invalid_token" if token else "unauthorized", "detail": str(exc)},
                {"www-authenticate": challenge},
            )
            return
        if server is not None and not _may_reach(principal, server):
            challenge = (
                f'Bearer resource_metadata="{metadata_url}", error="insufficient_scope", '
                f'scope="{SERVER_SCOPE_PREFIX}{server}"'
            )
            body = {"error": "insufficient_scope", "detail": f"this token does not reach {server}"}
            await _reply(scope, receive, send, 403, body, {"www-authenticate": challenge})
            return
        scope[trust.PRINCIPAL_SCOPE_KEY] = principal
        if self.listings is not None and server is not None and path == f"/{server}{MCP_PATH}":
            await self.listings.serve(self.app, server, principal, scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _host_allowed(self, scope: dict, value: str, scheme: str) -> bool:
        parsed = _split_host(value, 443 if scheme in ("https", "wss") else 80)
        if parsed is None:
            return False
        name, port = parsed
        if parsed in self.exact_hosts or name in self.any_port_hosts:
            return True
        server = scope.get("server") or (None, None)
        local_address, bound_port = server[0], server[1]
        if port != bound_port:
            return False
        return name in LOOPBACK_NAMES or (
            local_address is not None and name == str(local_address).lower()
        )

    def _origin_allowed(self, scope: dict, origin: str) -> bool:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or parts.path not in ("", "/"):
            return False
        return self._host_allowed(scope, parts.netloc, parts.scheme)

    def _server_of(self, path: str) -> str | None:
        first = path.lstrip("/").split("/", 1)[0]
        return first if first in self.server_names else None

    async def _verify(self, token: str) -> Principal:
        if token.startswith(trust.TOKEN_PREFIX) or self.jwt_verifier is None:
            return trust.verify_token(self.secret, token, revoked=self.revoked)
        access = await self.jwt_verifier.verify_token(token)
        if access is None:
            raise trust.ScopeTokenError("invalid token")
        return principal_from_jwt(access.claims, access.scopes, access.client_id)

    async def _metadata(self, scope: dict, receive: Any, send: Any, base: str, rest: str) -> None:
        if rest in ("", "/"):
            resource = base
        else:
            server = self._server_of(rest)
            if server is None or rest.rstrip("/") != f"/{server}{MCP_PATH}":
                await _reply(scope, receive, send, 404, {"error": "not_found"})
                return
            resource = base + rest.rstrip("/")
        body: dict[str, Any] = {"resource": resource, "bearer_methods_supported": ["header"]}
        if self.authorization_servers:
            body["authorization_servers"] = self.authorization_servers
        await _reply(scope, receive, send, 200, body)


# -- the listing cache ---------------------------------------------------------------------------
LISTING_METHODS = frozenset(
    {"server/discover", "tools/list", "prompts/list", "resources/list", "resources/templates/list"}
)
MAX_LISTING_REQUEST_BYTES = 64 * 1024
# What a listing answer may depend on besides the principal and the JSON-RPC params: the MCP
# transport reads these headers (Accept, content type, protocol version and the other routing
# "mcp-*" headers, and Host/Origin in its DNS-rebinding check), so they are part of the key and a
# request differing in any of them is answered afresh.
_KEYED_HEADERS = frozenset({b"accept", b"content-type", b"host", b"origin"})
_REQUEST_KEYS = frozenset({"jsonrpc", "id", "method", "params"})


class _Listing:
    __slots__ = ("components", "headers", "result")

    def __init__(self, components: tuple, headers: list[tuple[bytes, bytes]], result: bytes):
        self.components = components
        self.headers = headers
        self.result = result


class ListingCache:
    """Answers of the listing methods, per server, principal, params and transport headers.

    Only a single JSON-RPC request of the 2026-07-28 protocol (it names its method in the
    ``Mcp-Method`` header) is cached, and only a plain ``200 application/json`` result: errors,
    SSE answers and anything else pass through untouched every time. A hit replays the stored
    result under the request's own id, byte for byte what FastMCP would have sent.

    Each entry remembers the server's components it was built from (its raw listing, before any
    middleware: identical objects while nothing changes, about 0.15 ms to get) and is used only
    while they are the same objects, so a tool added, removed, replaced or hidden (FastMCP's
    visibility transforms) is listed at once. A component mutated in place is not noticed
    (FastMCP's own transforms copy components instead). The key holds the principal's kind,
    chat and scopes, the inputs of ``PrincipalToolAccess``; a listing middleware that depended
    on anything else would have to be keyed here too.

    Per process and derived only from the request: hosts behind a load balancer stay stateless.
    """

    def __init__(self, servers: Mapping[str, Any], max_entries: int = 512):
        self.servers = dict(servers)
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple, _Listing] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self.entries.clear()

    async def serve(
        self, app: Any, server: str, principal: Principal, scope: dict, receive: Any, send: Any
    ) -> None:
        headers = scope.get("headers") or []
        method = _header(headers, b"mcp-method")
        length = _header(headers, b"content-length")
        if (
            scope.get("method") != "POST"
            or method not in LISTING_METHODS
            or server not in self.servers
            or not length
            or not length.isdigit()
            or int(length) > MAX_LISTING_REQUEST_BYTES
        ):
            await app(scope, receive, send)
            return
        received, body = await _read_body(receive)
        replay = _replaying(received, receive)
        request = None if body is None else _listing_request(body, method)
        if request is None:
            await app(scope, replay, send)
            return
        request_id, params = request
        key = (
            server,
            principal.kind,
            principal.chat_id,
            principal.scopes,
            method,
            params,
            tuple(sorted((k, v) for k, v in headers if k in _KEYED_HEADERS or k[:4] == b"mcp-")),
        )
        components = await self._components(server, method)
        entry = self.entries.get(key)
        if entry is not None and _same(entry.components, components):
            self.entries.move_to_end(key)
            self.hits += 1
            await _send_listing(send, entry, request_id)
            return
        self.misses += 1
        status: list[int] = []
        response_headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                response_headers.extend(message.get("headers") or [])
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        await app(scope, replay, capture)
        result = _cacheable_result(status, response_headers, b"".join(chunks), request_id)
        if result is not None:
            kept = [(k, v) for k, v in response_headers if k.lower() != b"content-length"]
            self.entries[key] = _Listing(components, kept, result)
            self.entries.move_to_end(key)
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)

    async def _components(self, server: str, method: str) -> tuple:
        """What the server's answer to ``method`` is built from, before any middleware."""
        mcp = self.servers[server]
        if method == "server/discover":
            return (mcp.name, mcp.version, mcp.instructions, mcp.website_url)
        lister = {
            "tools/list": mcp.list_tools,
            "prompts/list": mcp.list_prompts,
            "resources/list": mcp.list_resources,
            "resources/templates/list": mcp.list_resource_templates,
        }[method]
        return tuple(await lister(run_middleware=False))


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


async def _read_body(receive: Any) -> tuple[list[dict], bytes | None]:
    """The request's messages as received, and its body (None: not a plain complete body)."""
    received: list[dict] = []
    body = b""
    while True:
        message = await receive()
        received.append(message)
        if message["type"] != "http.request":
            return received, None
        body += message.get("body", b"")
        if len(body) > MAX_LISTING_REQUEST_BYTES:
            return received, None
        if not message.get("more_body", False):
            return received, body


def _replaying(received: list[dict], receive: Any) -> Any:
    """``receive`` that first gives back the messages already read."""
    pending = list(received)

    async def replay() -> dict:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


def _listing_request(body: bytes, method: str) -> tuple[str | int, str] | None:
    """(id, canonical params) of a single JSON-RPC listing request, else None."""
    try:
        decoded = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(decoded, dict) or not set(decoded) <= _REQUEST_KEYS:
        return None
    request_id, params = decoded.get("id"), decoded.get("params", {})
    if (
        decoded.get("jsonrpc") != "2.0"
        or decoded.get("method") != method
        or type(request_id) not in (str, int)
        or not isinstance(params, dict)
    ):
        return None
    return request_id, json.dumps(params, sort_keys=True, separators=(",", ":"))


def _same(cached: tuple, current: tuple) -> bool:
    return len(cached) == len(current) and all(
        a is b or a == b for a, b in zip(cached, current, strict=True)
    )


def _cacheable_result(
    status: list[int], headers: list[tuple[bytes, bytes]], body: bytes, request_id: str | int
) -> bytes | None:
    """The serialized ``result`` of a plain successful JSON answer to ``request_id``, else None."""
    if status != [200] or _header(headers, b"content-type") != "application/json":
        return None
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if (
        not isinstance(answer, dict)
        or set(answer) != {"jsonrpc", "id", "result"}
        or answer["id"] != request_id
        or not isinstance(answer["result"], dict)
    ):
        return None
    # Serialized as the MCP transport does (json.dumps, compact), so a hit is byte-identical.
    return json.dumps(answer["result"], separators=(",", ":")).encode()


async def _send_listing(send: Any, entry: _Listing, request_id: str | int) -> None:
    body = b'{"jsonrpc":"2.0","id":%s,"result":%s}' % (
        json.dumps(request_id).encode(),
        entry.result,
    )
    headers = [*entry.headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def principal_from_jwt(claims: dict, scopes: Iterable[str], client_id: str | None) -> Principal:
    """A JWT's principal: its ``scope`` claim gives the scopes, a ``valor_chat`` claim the chat.
    A chat scope bound to no chat grants nothing (it would reach every chat)."""
    chat = claims.get("valor_chat")
    try:
        chat_id = None if chat is None else int(chat)
    except (TypeError, ValueError):
        raise trust.ScopeTokenError("valor_chat claim is not a chat id") from None
    granted = frozenset(str(scope) for scope in scopes)
    if chat_id is None:
        granted -= {CHAT_SCOPE}
    jti = claims.get("jti")
    return Principal(
        "client",
        chat_id=chat_id,
        scopes=granted,
        token_id=None if jti is None else str(jti),
        name=client_id,
    )


def _may_reach(principal: Principal, server: str) -> bool:
    servers = {s for s in principal.scopes if s.startswith(SERVER_SCOPE_PREFIX)}
    return not servers or f"{SERVER_SCOPE_PREFIX}{server}" in servers


async def _reply(
    scope: dict,
    receive: Any,
    send: Any,
    status: int,
    body: dict,
    headers: dict[str, str] | None = None,
) -> None:
    await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


def jwt_verifier_for(settings: Settings) -> Any:
    """FastMCP's JWT verifier when an identity provider is configured, else None."""
    if not settings.jwt_jwks_uri:
        return None
    from fastmcp.server.auth.providers.jwt import JWTVerifier

    return JWTVerifier(
        jwks_uri=settings.jwt_jwks_uri,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
    )


def build_app(
    secret: bytes | None = None,
    names: list[str] | None = None,
    *,
    settings: Settings | None = None,
    extra_routes: Iterable[Any] = (),
) -> Any:
    """One Starlette app serving every (or the named) server behind ``HostGuard``.

    ``secret`` defaults to the persistent one (``trust.load_scope_secret``). ``extra_routes``
    (the daemon's token service for remote workers) sit behind the same guard."""
    from servers.core.settings import get_settings
    from servers.core.store import get_store

    settings = settings or get_settings()
    if secret is None:
        secret = trust.load_scope_secret(settings)
    servers = load_all()
    if names is not None:
        servers = {name: servers[name] for name in names}
    # Stateless: no session lives in this process, so any host sharing the secret (several
    # behind a load balancer, or one restarted) answers any request of a client's session.
    apps = {
        name: server.http_app(path=MCP_PATH, stateless_http=True)
        for name, server in servers.items()
    }

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for app in apps.values():
                await stack.enter_async_context(app.lifespan(app))
            yield

    parent = Starlette(
        routes=[*extra_routes, *(Mount(f"/{name}", app=app) for name, app in apps.items())],
        lifespan=lifespan,
    )
    db_path = settings.db_path

    def revoked(token_id: str) -> bool:
        return tokens_issued.is_revoked(get_store(db_path), token_id)

    verifier = jwt_verifier_for(settings)
    return HostGuard(
        parent,
        secret,
        server_names=apps,
        allowed_hosts=settings.http_allowed_hosts,
        revoked=revoked,
        jwt_verifier=verifier,
        authorization_servers=[settings.jwt_issuer] if verifier and settings.jwt_issuer else [],
        listings=ListingCache(servers),
    )


@asynccontextmanager
async def hosted(
    secret: bytes | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    allow_remote: bool | None = None,
    extra_routes: Iterable[Any] = (),
) -> AsyncIterator[str]:
    """Serve every server on loopback inside the running event loop; yields the base URL.

    uvicorn's own serve() loop wakes ten times a second to refresh the Date header and poll for
    shutdown; here the block's end is the shutdown signal, so only startup() and shutdown() are
    used and an idle host does not wake at all (the daemon's idle CPU is measured).
    """
    import uvicorn

    from servers.core.settings import get_settings

    settings = get_settings()
    check_bind_host(host, settings.http_allow_remote if allow_remote is None else allow_remote)
    config = uvicorn.Config(
        build_app(secret, settings=settings, extra_routes=extra_routes),
        host=host,
        port=port,
        log_level="warning",
        log_config=None,  # Valor's logging (servers.core.logs) keeps uvicorn's lines, redacted
        lifespan="on",
        date_header=False,
    )
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup()  # raises SystemExit when it cannot bind or start
    try:
        bound_port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://{host}:{bound_port}"
    finally:
        await server.shutdown()
