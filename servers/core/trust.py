"""Trusted context: which chat a tool call serves is fixed by the launching process.

- stdio servers: the bridge sets ``VALOR_CHAT_ID`` in the server's environment.
- HTTP-hosted servers: every request carries ``Authorization: Bearer <token>``, an HMAC-signed
  token naming the chat, minted by the bridge per Claude Code run.

A ``chat_id`` argument from the model may narrow that scope but never widen it. With no chat fixed
(an operator's interactive session), chat-scoped tools require an explicit ``chat_id``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from servers.core.errors import Category, ValorError, input_error

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

TOKEN_VERSION = "v1"  # noqa: S105 - a format tag, not a secret
_http_secret: bytes | None = None


@dataclass(frozen=True)
class ChatScope:
    chat_id: int | None
    source: str  # "token", "environment" or "none"

    @property
    def fixed(self) -> bool:
        return self.chat_id is not None


class ScopeTokenError(ValueError):
    pass


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def configure_http_secret(secret: bytes | None) -> None:
    """Set by the process that hosts the servers over HTTP; tools verify tokens against it."""
    global _http_secret
    _http_secret = secret


def mint_scope_token(secret: bytes, chat_id: int | None, ttl_seconds: float = 6 * 3600) -> str:
    """A bearer token naming the chat a run serves ("-" for an operator run with no chat)."""
    expires = int(time.time() + ttl_seconds)
    chat = "-" if chat_id is None else str(int(chat_id))
    nonce = secrets.token_hex(8)
    payload = f"{TOKEN_VERSION}.{chat}.{expires}.{nonce}"
    return f"{payload}.{_sign(secret, payload)}"


def verify_scope_token(secret: bytes, token: str) -> ChatScope:
    parts = token.split(".")
    if len(parts) != 5 or parts[0] != TOKEN_VERSION:
        raise ScopeTokenError("malformed scope token")
    payload, signature = ".".join(parts[:4]), parts[4]
    if not hmac.compare_digest(signature, _sign(secret, payload)):
        raise ScopeTokenError("scope token signature does not match")
    if int(parts[2]) < time.time():
        raise ScopeTokenError("scope token expired")
    chat = None if parts[1] == "-" else int(parts[1])
    return ChatScope(chat_id=chat, source="token")


def _sign(secret: bytes, payload: str) -> str:
    return hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def current_scope() -> ChatScope:
    """The chat fixed for the current tool call, from the HTTP token or the environment."""
    secret = _http_secret
    if secret is not None:
        authorization = _current_authorization()
        if authorization is not None:
            token = bearer_token(authorization)
            if token is None:
                raise ValorError(Category.CONFIG, "This server requires a scope token.")
            try:
                return verify_scope_token(secret, token)
            except ScopeTokenError as exc:
                raise ValorError(Category.CONFIG, f"Scope token refused: {exc}.") from None
    from servers.core.settings import get_settings

    chat_id = get_settings().chat_id
    if chat_id is not None:
        return ChatScope(chat_id=chat_id, source="environment")
    return ChatScope(chat_id=None, source="none")


def _current_authorization() -> str | None:
    """The Authorization header of the HTTP request being served, or None outside HTTP."""
    try:
        from fastmcp.server.dependencies import get_http_request

        request = get_http_request()
    except (RuntimeError, ImportError):
        return None
    return request.headers.get("authorization", "")


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
    if wanted is None and required:
        raise input_error(
            "No chat is fixed for this session (interactive use): pass chat_id to say which "
            "chat to read."
        )
    return wanted
