"""Host every Valor server in one process over streamable HTTP on loopback.

Each server's ``http_app()`` is mounted under ``/<server-name>`` (its endpoint is
``/<server-name>/mcp``); the parent lifespan enters every mounted app's lifespan, without which
requests fail with "Task group is not initialized". With a scope secret, every request must carry
a valid bearer token (see ``servers.core.trust``); others get 401 before reaching a server.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Mount

from servers import load_all
from servers.core import trust
from servers.core.mcp_config import MCP_PATH, endpoint

__all__ = ["MCP_PATH", "RequireScopeToken", "build_app", "endpoint", "hosted"]


class RequireScopeToken:
    """ASGI middleware: refuse any HTTP request without a valid signed scope token."""

    def __init__(self, app: Any, secret: bytes):
        self.app = app
        self.secret = secret

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        token = trust.bearer_token(headers.get("authorization"))
        try:
            if token is None:
                raise trust.ScopeTokenError("missing bearer token")
            trust.verify_scope_token(self.secret, token)
        except trust.ScopeTokenError as exc:
            body = json.dumps({"error": "unauthorized", "detail": str(exc)}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def build_app(secret: bytes | None = None, names: list[str] | None = None) -> Any:
    """One Starlette app serving every (or the named) server; token-checked when secret is set."""
    servers = load_all()
    if names is not None:
        servers = {name: servers[name] for name in names}
    apps = {name: server.http_app(path=MCP_PATH) for name, server in servers.items()}

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for app in apps.values():
                await stack.enter_async_context(app.lifespan(app))
            yield

    parent = Starlette(
        routes=[Mount(f"/{name}", app=app) for name, app in apps.items()], lifespan=lifespan
    )
    trust.configure_http_secret(secret)
    if secret is None:
        return parent
    return RequireScopeToken(parent, secret)


@asynccontextmanager
async def hosted(
    secret: bytes | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve every server on loopback inside the running event loop; yields the base URL.

    uvicorn's own serve() loop wakes ten times a second to refresh the Date header and poll for
    shutdown; here the block's end is the shutdown signal, so only startup() and shutdown() are
    used and an idle host does not wake at all (the daemon's idle CPU is measured).
    """
    import uvicorn

    config = uvicorn.Config(
        build_app(secret),
        host=host,
        port=port,
        log_level="warning",
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
