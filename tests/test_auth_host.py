"""The HTTP host: tokens always, MCP-spec 401s, protected-resource metadata, Host/Origin checks,
a persistent secret, revocation, and no accidental non-loopback bind. Real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from typer.testing import CliRunner

from scheduler.cli import app as cli_app
from servers import SERVERS
from servers.core import tokens_issued
from servers.core.mcp_config import endpoint
from servers.core.principals import OPERATOR, Principal, chat_principal
from servers.core.settings import REPO_ROOT, get_settings
from servers.core.store import get_store
from servers.core.trust import load_scope_secret, mint_scope_token, mint_token, new_secret
from servers.hosting import hosted
from tests.support import INITIALIZE_REQUEST, configure, free_port, texts, wait_until

CHAT = 4242
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def refused_tokens(secret: bytes) -> dict[str, str | None]:
    """Each kind of token the host must refuse, by name (None: no Authorization header)."""
    store = get_store(get_settings().db_path)
    revoked, issued = tokens_issued.issue_token(store, secret, chat_principal(CHAT), 3600)
    tokens_issued.revoke_token(store, issued.id)
    return {
        "none": None,
        "bad": "v2.garbage.abc",
        "not a valor token": "hello",
        "expired": mint_token(secret, chat_principal(CHAT), -5)[0],
        "revoked": revoked,
        "foreign secret": mint_scope_token(new_secret(), CHAT),
        "tampered": mint_scope_token(secret, CHAT)[:-2] + "00",
    }


def assert_refused_everywhere(
    base_url: str, secret: bytes, servers: tuple[str, ...] | list[str]
) -> None:
    with httpx.Client(timeout=30) as http:
        for name, token in refused_tokens(secret).items():
            headers = dict(MCP_HEADERS)
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            for server in servers:
                reply = http.post(
                    endpoint(base_url, server), json=INITIALIZE_REQUEST, headers=headers
                )
                assert reply.status_code == 401, (name, server, reply.text)
                challenge = reply.headers["www-authenticate"]
                metadata = f"{base_url}/.well-known/oauth-protected-resource/{server}/mcp"
                assert challenge.startswith(f'Bearer resource_metadata="{metadata}"'), challenge
                if token is None:
                    assert "error=" not in challenge
                else:
                    assert 'error="invalid_token"' in challenge, (name, challenge)


async def test_every_server_path_refuses_missing_bad_expired_revoked_and_foreign_tokens():
    secret = new_secret()
    expired = mint_token(secret, chat_principal(CHAT), -5)[0]
    async with hosted(secret) as base_url:
        await asyncio.to_thread(assert_refused_everywhere, base_url, secret, tuple(SERVERS))
        async with httpx.AsyncClient(timeout=30) as http:
            reason = await http.post(
                endpoint(base_url, "telegram-tools"),
                json=INITIALIZE_REQUEST,
                headers={**MCP_HEADERS, "Authorization": f"Bearer {expired}"},
            )
    assert 'error_description="expired"' in reason.headers["www-authenticate"]


async def test_protected_resource_metadata_is_served_without_a_token():
    async with hosted(new_secret()) as base_url, httpx.AsyncClient(timeout=30) as http:
        root = await http.get(f"{base_url}/.well-known/oauth-protected-resource")
        one = await http.get(f"{base_url}/.well-known/oauth-protected-resource/telegram-tools/mcp")
        unknown = await http.get(
            f"{base_url}/.well-known/oauth-protected-resource/no-such-tools/mcp"
        )
    assert root.status_code == 200 and one.status_code == 200
    assert root.json() == {"resource": base_url, "bearer_methods_supported": ["header"]}
    assert one.json() == {
        "resource": endpoint(base_url, "telegram-tools"),
        "bearer_methods_supported": ["header"],
    }
    assert unknown.status_code == 404


async def test_foreign_host_and_origin_are_refused():
    secret = new_secret()
    token = mint_scope_token(secret, None)
    async with hosted(secret) as base_url, httpx.AsyncClient(timeout=30) as http:
        port = base_url.rsplit(":", 1)[1]
        url = endpoint(base_url, "telegram-tools")
        auth = {**MCP_HEADERS, "Authorization": f"Bearer {token}"}
        foreign_host = await http.post(
            url, json=INITIALIZE_REQUEST, headers={**auth, "Host": f"evil.example:{port}"}
        )
        wrong_port = await http.post(
            url, json=INITIALIZE_REQUEST, headers={**auth, "Host": "127.0.0.1:1"}
        )
        metadata_foreign = await http.get(
            f"{base_url}/.well-known/oauth-protected-resource",
            headers={"Host": f"evil.example:{port}"},
        )
        foreign_origin = await http.post(
            url, json=INITIALIZE_REQUEST, headers={**auth, "Origin": f"http://evil.example:{port}"}
        )
        null_origin = await http.post(
            url, json=INITIALIZE_REQUEST, headers={**auth, "Origin": "null"}
        )
        own_origin = await http.post(
            url, json=INITIALIZE_REQUEST, headers={**auth, "Origin": f"http://localhost:{port}"}
        )
        localhost = await http.post(
            url, json=INITIALIZE_REQUEST, headers={**auth, "Host": f"localhost:{port}"}
        )
    assert foreign_host.status_code == 421
    assert wrong_port.status_code == 421
    assert metadata_foreign.status_code == 421
    assert foreign_origin.status_code == 403
    assert null_origin.status_code == 403
    assert own_origin.status_code == 200, own_origin.text
    assert localhost.status_code == 200, localhost.text


async def test_configured_host_names_are_answered(monkeypatch):
    configure(monkeypatch, VALOR_HTTP_ALLOWED_HOSTS='["valor.example"]')
    secret = new_secret()
    token = mint_scope_token(secret, None)
    async with hosted(secret) as base_url, httpx.AsyncClient(timeout=30) as http:
        reply = await http.post(
            endpoint(base_url, "telegram-tools"),
            json=INITIALIZE_REQUEST,
            headers={
                **MCP_HEADERS,
                "Authorization": f"Bearer {token}",
                "Host": "valor.example",
                "Origin": "https://valor.example",
            },
        )
    assert reply.status_code == 200, reply.text


async def test_a_token_narrowed_to_one_server_reaches_only_that_server():
    secret = new_secret()
    principal = Principal("chat", chat_id=CHAT, scopes=frozenset({"chat", "server:telegram-tools"}))
    narrowed = mint_token(secret, principal, 3600)[0]
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {narrowed}"}
    async with hosted(secret) as base_url, httpx.AsyncClient(timeout=30) as http:
        own = await http.post(
            endpoint(base_url, "telegram-tools"), json=INITIALIZE_REQUEST, headers=headers
        )
        other = await http.post(
            endpoint(base_url, "social-tools"), json=INITIALIZE_REQUEST, headers=headers
        )
    assert own.status_code == 200
    assert other.status_code == 403
    assert 'error="insufficient_scope"' in other.headers["www-authenticate"]


async def mcp_session_call(url: str, token: str, tool: str, arguments: dict):
    """List tools and call one through the official MCP SDK's streamable-HTTP client."""
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        listed = await session.list_tools()
        result = await session.call_tool(tool, arguments)
    return {t.name for t in listed.tools}, result


async def test_a_token_from_valor_token_create_works_with_the_official_mcp_client():
    created = CliRunner().invoke(cli_app, ["token", "create", "--chat", str(CHAT), "--ttl", "1h"])
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    async with hosted() as base_url:  # the persistent secret `valor token` signed with
        url = endpoint(base_url, "telegram-tools")
        names, own = await mcp_session_call(url, token, "get_conversation_context", {})
        _, other = await mcp_session_call(
            url, token, "get_conversation_context", {"chat_id": CHAT + 1}
        )
    assert "get_conversation_context" in names
    assert not own.is_error, texts(own)
    assert other.is_error and "outside it" in texts(other)


async def test_a_token_survives_a_host_restart_and_revocation_takes_effect():
    store = get_store(get_settings().db_path)
    secret = load_scope_secret(get_settings())
    token, issued = tokens_issued.issue_token(store, secret, OPERATOR, 3600)
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {token}"}
    for _ in range(2):  # the second host is a fresh start on the same data directory
        async with hosted() as base_url, httpx.AsyncClient(timeout=30) as http:
            reply = await http.post(
                endpoint(base_url, "monitoring-tools"), json=INITIALIZE_REQUEST, headers=headers
            )
        assert reply.status_code == 200, reply.text
    tokens_issued.revoke_token(store, issued.id)
    async with hosted() as base_url, httpx.AsyncClient(timeout=30) as http:
        reply = await http.post(
            endpoint(base_url, "monitoring-tools"), json=INITIALIZE_REQUEST, headers=headers
        )
    assert reply.status_code == 401
    assert 'error_description="revoked"' in reply.headers["www-authenticate"]


def test_the_generated_secret_is_owner_only_and_stable(valor_env: Path):
    first = load_scope_secret(get_settings())
    path = valor_env / "scope_secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(valor_env.stat().st_mode) == 0o700
    assert load_scope_secret(get_settings()) == first
    assert [p.name for p in valor_env.iterdir() if p.name.startswith(".scope_secret")] == []


def test_a_secret_file_behind_a_symlink_or_readable_by_others_is_refused(valor_env: Path):
    from servers.core.errors import ValorError

    target = valor_env.parent / "elsewhere"
    target.write_text(new_secret().hex())
    (valor_env).mkdir(parents=True, exist_ok=True)
    (valor_env / "scope_secret").symlink_to(target)
    with pytest.raises(ValorError):
        load_scope_secret(get_settings())
    (valor_env / "scope_secret").unlink()
    (valor_env / "scope_secret").write_text(new_secret().hex())
    os.chmod(valor_env / "scope_secret", 0o644)
    with pytest.raises(ValorError, match="chmod 600"):
        load_scope_secret(get_settings())


def test_the_scope_secret_setting_is_used_when_set(monkeypatch, valor_env: Path):
    configure(monkeypatch, VALOR_SCOPE_SECRET="a" * 32)
    assert load_scope_secret(get_settings()) == b"a" * 32
    assert not (valor_env / "scope_secret").exists()
    configure(monkeypatch, VALOR_SCOPE_SECRET="short")
    from servers.core.errors import ValorError

    with pytest.raises(ValorError, match="too short"):
        load_scope_secret(get_settings())


# -- `valor serve ... --http` as a process ------------------------------------------------------
@pytest.fixture
def serve_process(valor_env: Path) -> Iterator:
    started: list[subprocess.Popen] = []

    def start(*args: str) -> tuple[subprocess.Popen, str]:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "scheduler.cli", "serve", *args, "--port", str(port)],
            cwd=REPO_ROOT,
            env={**os.environ, "VALOR_DATA_DIR": str(valor_env)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        base_url = f"http://127.0.0.1:{port}"

        def answering() -> bool:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                httpx.get(f"{base_url}/.well-known/oauth-protected-resource", timeout=5)
            except httpx.TransportError:
                return False
            return True

        wait_until(answering, timeout=90, message="valor serve answering")
        return process, base_url

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_valor_serve_all_http_refuses_every_bad_token(serve_process):
    _, base_url = serve_process("--all", "--http")
    secret = load_scope_secret(get_settings())  # the same data directory: the same secret
    assert_refused_everywhere(base_url, secret, tuple(SERVERS))
    token = tokens_issued.issue_token(get_store(get_settings().db_path), secret, OPERATOR, 60)[0]
    reply = httpx.post(
        endpoint(base_url, "daydream-tools"),
        json=INITIALIZE_REQUEST,
        headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text


def test_valor_serve_one_server_http_requires_a_token(serve_process):
    _, base_url = serve_process("telegram-tools", "--http")
    assert_refused_everywhere(base_url, load_scope_secret(get_settings()), ["telegram-tools"])


INSPECTOR = REPO_ROOT / "node_modules" / ".bin" / "mcp-inspector"


def inspector(tmp_path: Path, url: str, *args: str, token: str | None = None):
    """MCP Inspector's CLI (the pinned npm package) against ``url``; its catalog stays in tmp."""
    headers = ["--header", f"Authorization: Bearer {token}"] if token else []
    return subprocess.run(
        [str(INSPECTOR), "--cli", url, *headers, *args],
        env={**os.environ, "HOME": str(tmp_path), "MCP_CATALOG_PATH": str(tmp_path / "mcp.json")},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(
    not INSPECTOR.exists() and not os.environ.get("CI"),  # CI installs it: there it must run
    reason="`bash .ci/setup --dev` installs MCP Inspector (npm ci); it is not installed here",
)
def test_mcp_inspector_cli_works_with_a_token_from_valor_token_create(serve_process, tmp_path):
    _, base_url = serve_process("--all", "--http")
    created = CliRunner().invoke(cli_app, ["token", "create", "--chat", str(CHAT), "--ttl", "1h"])
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    url = endpoint(base_url, "telegram-tools")
    listed = inspector(tmp_path, url, "--method", "tools/list", token=token)
    assert listed.returncode == 0, listed.stderr
    assert "search_conversation_history" in listed.stdout
    called = inspector(
        tmp_path,
        url,
        "--method",
        "tools/call",
        "--tool-name",
        "search_conversation_history",
        "--tool-arg",
        "query=hello",
        token=token,
    )
    assert called.returncode == 0, called.stderr
    assert f'"chat_id": {CHAT}' in called.stdout and '"isError": false' in called.stdout
    operator_tools = inspector(
        tmp_path, endpoint(base_url, "monitoring-tools"), "--method", "tools/list", token=token
    )
    assert operator_tools.returncode == 0, operator_tools.stderr
    assert "cleanup_resources" not in operator_tools.stdout  # a chat token lists no operator tool
    refused = inspector(tmp_path, url, "--method", "tools/list")
    assert refused.returncode != 0
    assert "search_conversation_history" not in refused.stdout


@pytest.mark.parametrize("how", ["flag", "setting"])
def test_a_non_loopback_bind_exits_2_unless_allowed(valor_env: Path, how: str):
    args = [sys.executable, "-m", "scheduler.cli", "serve", "--all", "--http", "--port", "0"]
    env = {**os.environ, "VALOR_DATA_DIR": str(valor_env)}
    if how == "flag":
        args += ["--host", "0.0.0.0"]
    else:
        env["VALOR_HTTP_HOST"] = "0.0.0.0"
    completed = subprocess.run(
        args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 2, completed.stderr
    assert "Refusing to host on 0.0.0.0" in completed.stderr
    assert "--allow-remote" in completed.stderr and "TLS" in completed.stderr


# -- JWTs from an identity provider ---------------------------------------------------------------
@pytest.fixture
def jwks_server() -> Iterator[tuple[str, object]]:
    """A loopback JWKS endpoint serving one freshly generated RSA key (kid "k1")."""
    import base64
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cryptography.hazmat.primitives import serialization
    from fastmcp.server.auth.providers.jwt import RSAKeyPair

    keys = RSAKeyPair.generate()
    numbers = serialization.load_pem_public_key(keys.public_key.encode()).public_numbers()  # type: ignore[union-attr]

    def b64(value: int) -> str:
        raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    body = json.dumps(
        {
            "keys": [
                {
                    "kty": "RSA",
                    "kid": "k1",
                    "alg": "RS256",
                    "use": "sig",
                    "n": b64(numbers.n),
                    "e": b64(numbers.e),
                }
            ]
        }
    ).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", keys
    finally:
        server.shutdown()
        server.server_close()


async def test_jwts_from_a_configured_identity_provider_are_accepted(monkeypatch, jwks_server):
    jwks_uri, keys = jwks_server
    issuer, audience = "https://idp.example", "valor"
    configure(
        monkeypatch,
        VALOR_JWT_JWKS_URI=jwks_uri,
        VALOR_JWT_ISSUER=issuer,
        VALOR_JWT_AUDIENCE=audience,
    )

    def jwt(**options: object) -> str:
        claims = {"issuer": issuer, "audience": audience, "kid": "k1", **options}
        return keys.create_token(**claims)  # type: ignore[attr-defined]

    chat_jwt = jwt(scopes=["chat"], additional_claims={"valor_chat": CHAT})
    async with hosted(new_secret()) as base_url:
        url = endpoint(base_url, "telegram-tools")
        _, own = await mcp_session_call(url, chat_jwt, "get_conversation_context", {})
        _, other = await mcp_session_call(
            url, chat_jwt, "get_conversation_context", {"chat_id": CHAT + 1}
        )
        async with httpx.AsyncClient(timeout=30) as http:
            refused = {}
            for name, token in {
                "wrong audience": jwt(audience="someone-else", scopes=["operator"]),
                "wrong issuer": jwt(issuer="https://evil.example", scopes=["operator"]),
                "expired": jwt(expires_in_seconds=-60, scopes=["operator"]),
            }.items():
                reply = await http.post(
                    url,
                    json=INITIALIZE_REQUEST,
                    headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"},
                )
                refused[name] = reply.status_code
            metadata = await http.get(f"{base_url}/.well-known/oauth-protected-resource")
    assert not own.is_error, texts(own)
    assert other.is_error and "outside it" in texts(other)
    assert refused == {"wrong audience": 401, "wrong issuer": 401, "expired": 401}
    assert metadata.json()["authorization_servers"] == [issuer]


async def test_two_hosts_sharing_the_secret_serve_one_client_session_in_turns(monkeypatch):
    """Stateless hosting: every request may land on another host process (a load balancer),
    and the official client's session still works, with the chat fixed by its token."""
    import httpx2

    configure(monkeypatch, VALOR_HTTP_ALLOWED_HOSTS='["valor-lb.test"]')  # the balancer's name

    store = get_store(get_settings().db_path)
    token = tokens_issued.issue_token(
        store, load_scope_secret(get_settings()), chat_principal(CHAT), 3600
    )[0]
    async with hosted() as first, hosted() as second:
        ports = [httpx.URL(first).port, httpx.URL(second).port]
        landed: list[int] = []

        class RoundRobin(httpx2.AsyncBaseTransport):
            """Sends each request to the next host in turn, as a load balancer would."""

            def __init__(self) -> None:
                self.inner = httpx2.AsyncHTTPTransport()

            async def handle_async_request(self, request):
                port = ports[len(landed) % 2]
                landed.append(port)
                request.url = request.url.copy_with(port=port)
                request.headers["host"] = "valor-lb.test"
                return await self.inner.handle_async_request(request)

            async def aclose(self) -> None:
                await self.inner.aclose()

        async with (
            httpx2.AsyncClient(
                headers={"Authorization": f"Bearer {token}"}, timeout=60, transport=RoundRobin()
            ) as http,
            streamable_http_client(endpoint(first, "telegram-tools"), http_client=http) as (
                read,
                write,
            ),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            listed = await session.list_tools()
            result = await session.call_tool("get_conversation_context", {})
            again = await session.call_tool("get_conversation_context", {})
    assert "get_conversation_context" in {tool.name for tool in listed.tools}
    assert not result.is_error and not again.is_error, texts(result)
    assert set(landed) == set(ports)  # both hosts answered requests of the one session
