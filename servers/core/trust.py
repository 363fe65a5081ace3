"""Trusted context: who a tool call serves is fixed by the launching process, never the model.

- stdio servers: the bridge sets ``VALOR_CHAT_ID`` in the server's environment (a chat run);
  without it the caller is the operator at their own terminal.
- HTTP-hosted servers: every request carries ``Authorization: Bearer <token>``, an HMAC-signed
  token naming a principal (kind, chat, scopes, id, expiry). The host (``servers.hosting``)
  verifies it before any server sees the request and keeps the principal on the request.

A ``chat_id`` argument from the model may narrow that scope but never widen it. With no chat fixed
(an operator's interactive session), chat-scoped tools require an explicit ``chat_id``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from servers.core.errors import Category, ValorError, input_error
from servers.core.principals import OPERATOR, Principal, chat_principal

if TYPE_CHECKING:
    from servers.core.settings import Settings

# The chat_id parameter of chat-scoped tools, described once for every server.
ChatIdArg = Annotated[
    int | str | None,
    Field(
        description="Telegram chat id. Leave empty in a chat session (the bridge fixes the "
        "chat); in interactive use it is optional."
    ),
]
RequiredChatIdArg = Annotated[
    int | str | None,
    Field(
        description="Telegram chat id. Leave empty in a chat session (the bridge fixes the "
        "chat); required in interactive use."
    ),
]

TOKEN_VERSION = "v2"  # noqa: S105 - a format tag, not a secret
TOKEN_PREFIX = TOKEN_VERSION + "."
SECRET_FILE_NAME = "scope_secret"  # noqa: S105 - a file name
MIN_SECRET_CHARS = 16
# Where the host keeps the verified principal on the ASGI scope of the request it lets through.
PRINCIPAL_SCOPE_KEY = "valor.principal"


@dataclass(frozen=True)
class ChatScope:
    chat_id: int | None
    source: str  # "token", "environment" or "none"

    @property
    def fixed(self) -> bool:
        return self.chat_id is not None


class ScopeTokenError(ValueError):
    """A bearer token was refused; the message is the reason (safe to show the client)."""


def new_secret() -> bytes:
    return secrets.token_bytes(32)


# -- the persistent secret -----------------------------------------------------------------------
def load_scope_secret(settings: Settings) -> bytes:
    """The HMAC key every host of this data directory signs and checks tokens with.

    ``VALOR_SCOPE_SECRET`` when set; else a random key generated once into
    ``DATA_DIR/scope_secret`` (owner-only, created atomically, never through a symlink), so a
    restarted host accepts the tokens it issued.
    """
    if settings.scope_secret is not None:
        value = settings.scope_secret.get_secret_value()
        if len(value) < MIN_SECRET_CHARS:
            raise ValorError(
                Category.CONFIG,
                f"VALOR_SCOPE_SECRET is too short: use at least {MIN_SECRET_CHARS} random "
                "characters (or unset it and Valor keeps a generated one in the data directory).",
            )
        return value.encode()
    return _secret_file(Path(settings.data_dir))


def _secret_file(data_dir: Path) -> bytes:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)
    path = data_dir / SECRET_FILE_NAME
    for _ in range(3):
        try:
            return _read_secret(path)
        except FileNotFoundError:
            pass
        _create_secret(path)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValorError(
            Category.CONFIG, f"Cannot read the scope secret {path}: {exc.strerror}."
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise ValorError(Category.CONFIG, f"{path} is not a regular file owned by this user.")
        if info.st_mode & 0o077:
            raise ValorError(
                Category.CONFIG,
                f"{path} is readable by others (mode {info.st_mode & 0o777:o}): run "
                f"`chmod 600 {path}`.",
            )
        text = os.read(fd, 4096).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise ValorError(Category.CONFIG, f"{path} does not hold a scope secret; delete it.")
    return secret


def _create_secret(path: Path) -> None:
    """Write a fresh secret beside ``path`` and link it into place: readers never see half a
    file, and when two processes race, the first link wins and both read that one."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    fd = os.open(temp, flags, 0o600)
    try:
        os.write(fd, (new_secret().hex() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(temp)


# -- tokens ----------------------------------------------------------------------------------------
def new_token_id() -> str:
    return secrets.token_hex(6)


def mint_token(secret: bytes, principal: Principal, ttl_seconds: float) -> tuple[str, str]:
    """A signed bearer token for ``principal``; returns (token, token id)."""
    token_id = principal.token_id or new_token_id()
    claims = {
        "i": token_id,
        "k": principal.kind,
        "c": principal.chat_id,
        "s": sorted(principal.scopes),
        "n": principal.name,
        "e": int(time.time() + ttl_seconds),
    }
    body = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode())
    payload = TOKEN_PREFIX + body.decode().rstrip("=")
    return f"{payload}.{_sign(secret, payload)}", token_id


def mint_scope_token(secret: bytes, chat_id: int | None, ttl_seconds: float = 6 * 3600) -> str:
    """A token for one chat's run, or the operator's when ``chat_id`` is None."""
    principal = OPERATOR if chat_id is None else chat_principal(int(chat_id))
    return mint_token(secret, principal, ttl_seconds)[0]


def verify_token(
    secret: bytes, token: str, *, revoked: Callable[[str], bool] | None = None
) -> Principal:
    """The principal a token names; ScopeTokenError says why it is refused.

    ``revoked`` answers whether a token id was revoked (the host passes the store's look-up).
    """
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_VERSION or not parts[1] or not parts[2]:
        raise ScopeTokenError("malformed token")
    payload, signature = f"{parts[0]}.{parts[1]}", parts[2]
    if not hmac.compare_digest(signature.encode(), _sign(secret, payload).encode()):
        raise ScopeTokenError("bad signature")
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
        principal = Principal(
            kind=str(claims["k"]),
            chat_id=None if claims["c"] is None else int(claims["c"]),
            scopes=frozenset(str(scope) for scope in claims["s"]),
            token_id=str(claims["i"]),
            name=None if claims.get("n") is None else str(claims["n"]),
        )
        expires = float(claims["e"])
    except (ValueError, KeyError, TypeError):
        raise ScopeTokenError("malformed token") from None
    if expires < time.time():
        raise ScopeTokenError("expired")
    if revoked is not None and principal.token_id and revoked(principal.token_id):
        raise ScopeTokenError("revoked")
    return principal


def _sign(secret: bytes, payload: str) -> str:
    return hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


# -- who the current tool call serves -----------------------------------------------------------
def current_principal() -> Principal:
    """The principal of the tool call being served.

    Over HTTP: the one the host (``servers.hosting.HostGuard``) verified from the request's
    bearer token; a request no host vouched for is refused. Outside HTTP (stdio, an in-memory
    client): a chat run when ``VALOR_CHAT_ID`` is set, else the operator.
    """
    request = _current_request()
    if request is not None:
        principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
        if not isinstance(principal, Principal):
            raise ValorError(Category.CONFIG, "This server answers only behind Valor's host.")
        return principal
    from servers.core.settings import get_settings

    chat_id = get_settings().chat_id
    return OPERATOR if chat_id is None else chat_principal(chat_id)


def current_scope() -> ChatScope:
    """The chat fixed for the current tool call, from the HTTP token or the environment."""
    from_http = _current_request() is not None
    chat_id = current_principal().chat_id
    if chat_id is None:
        return ChatScope(chat_id=None, source="none")
    return ChatScope(chat_id=chat_id, source="token" if from_http else "environment")


def _current_request() -> Any:
    """The HTTP request being served, or None outside HTTP."""
    try:
        from fastmcp.server.dependencies import get_http_request

        return get_http_request()
    except (RuntimeError, ImportError):
        return None


def parse_chat_id(value: int | str | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    text = value.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise input_error(
            f"chat_id must be a Telegram chat id (an integer), not {text!r}."
        ) from None


def resolve_chat_id(requested: int | str | None, *, required: bool = True) -> int | None:
    """Apply the trusted-context rule to a model-supplied chat id."""
    wanted = parse_chat_id(requested)
    scope = current_scope()
    if scope.fixed:
        if wanted is not None and wanted != scope.chat_id:
            raise input_error(
                "This session serves one chat; chat_id "
                f"{wanted} is outside it. Leave chat_id empty to use the current chat."
            )
        return scope.chat_id
    if "operator" not in current_principal().scopes:
        # Only the operator may choose a chat: any other caller bound to no chat reaches none.
        raise ValorError(
            Category.CONFIG, "This token is bound to no chat, so it cannot read chat data."
        )
    if wanted is None and required:
        raise input_error(
            "No chat is fixed for this session (interactive use): pass chat_id to say which "
            "chat to read."
        )
    return wanted
