"""Bearer tokens handed out by `valor token create`: recorded so they can be listed and revoked.

The token itself is never stored (it is printed once); its id, principal and expiry are. The host
refuses a token whose id is revoked here. Tokens Valor mints for its own runs (the bridge, the
daemon, promises) are short-lived and not recorded.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

from servers.core.principals import (
    CHAT_SCOPE,
    OPERATOR_SCOPE,
    SERVER_SCOPE_PREFIX,
    WORKER_SCOPE,
    Principal,
)
from servers.core.store import Store
from servers.core.trust import mint_token

DEFAULT_TTL_SECONDS = 30 * 86400
_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


@dataclass(frozen=True)
class IssuedToken:
    id: str
    kind: str
    chat_id: int | None
    scopes: tuple[str, ...]
    name: str | None
    created_at: float
    expires_at: float
    revoked_at: float | None

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at < time.time() else "active"


def parse_ttl(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``1y`` or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdwy]?)\s*", text.lower())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration: use e.g. 30d, 12h, 90m or seconds")
    return float(match.group(1)) * _TTL_UNITS[match.group(2) or "s"]


def principal_for(
    *,
    chat_id: int | None = None,
    operator: bool = False,
    scopes: list[str] | tuple[str, ...] = (),
    name: str | None = None,
    known_servers: tuple[str, ...] | None = None,
    worker: bool = False,
) -> Principal:
    """The principal a new token grants: ``operator`` (every tool), a chat (its data and the
    tools a chat may use), optionally narrowed to some servers by ``server:<name>`` scopes."""
    if worker:  # a remote promise worker's token grants no tool (servers.core.workers)
        if chat_id is not None or operator or scopes:
            raise ValueError("a worker token takes no --chat, --operator or --scope")
        return Principal("worker", scopes=frozenset({WORKER_SCOPE}), name=name)
    granted = set(scopes)
    for scope in granted:
        if scope in (OPERATOR_SCOPE, CHAT_SCOPE):
            continue
        server = scope.removeprefix(SERVER_SCOPE_PREFIX)
        if not scope.startswith(SERVER_SCOPE_PREFIX) or not server:
            raise ValueError(f"unknown scope {scope!r}: use operator, chat or server:<name>")
        if known_servers is not None and server not in known_servers:
            raise ValueError(f"unknown server in scope {scope!r}: {', '.join(known_servers)}")
    if operator:
        granted.add(OPERATOR_SCOPE)
    if chat_id is not None and OPERATOR_SCOPE not in granted:
        granted.add(CHAT_SCOPE)
    if OPERATOR_SCOPE in granted and chat_id is not None:
        raise ValueError("a token is either the operator's or one chat's, not both")
    if CHAT_SCOPE in granted and chat_id is None:
        # A chat scope bound to no chat would reach every chat's data.
        raise ValueError("the chat scope needs --chat N (the one chat the token may reach)")
    if not granted & {OPERATOR_SCOPE, CHAT_SCOPE}:
        raise ValueError("the token would grant no tool: give --chat N or --operator")
    kind = "operator" if OPERATOR_SCOPE in granted else "chat"
    return Principal(kind, chat_id=chat_id, scopes=frozenset(granted), name=name)


def issue_token(
    store: Store, secret: bytes, principal: Principal, ttl_seconds: float = DEFAULT_TTL_SECONDS
) -> tuple[str, IssuedToken]:
    """Mint a token for ``principal`` and record it; the token is returned, never stored."""
    token, token_id = mint_token(secret, principal, ttl_seconds)
    created = time.time()
    issued = IssuedToken(
        id=token_id,
        kind=principal.kind,
        chat_id=principal.chat_id,
        scopes=tuple(sorted(principal.scopes)),
        name=principal.name,
        created_at=created,
        expires_at=int(created + ttl_seconds),
        revoked_at=None,
    )
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO issued_tokens (id, kind, chat_id, scopes, name, created_at, expires_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                issued.id,
                issued.kind,
                issued.chat_id,
                json.dumps(list(issued.scopes)),
                issued.name,
                issued.created_at,
                issued.expires_at,
            ),
        )
    return token, issued


def list_tokens(store: Store) -> list[IssuedToken]:
    rows = store.query("SELECT * FROM issued_tokens ORDER BY created_at")
    return [
        IssuedToken(
            id=row["id"],
            kind=row["kind"],
            chat_id=row["chat_id"],
            scopes=tuple(json.loads(row["scopes"])),
            name=row["name"],
            created_at=row["created_at"],
            expires_at=row["expires_at"],
            revoked_at=row["revoked_at"],
        )
        for row in rows
    ]


def revoke_token(store: Store, token_id: str) -> bool:
    """Revoke an issued token; False when no token has that id. Revoking twice is harmless."""
    with store.transaction() as conn:
        cursor = conn.execute(
            "UPDATE issued_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
            (time.time(), token_id),
        )
        return cursor.rowcount > 0


def is_revoked(store: Store, token_id: str) -> bool:
    """One primary-key look-up; the host asks it on every request."""
    row = (
        store.connection()
        .execute("SELECT revoked_at FROM issued_tokens WHERE id = ?", (token_id,))
        .fetchone()
    )
    return row is not None and row[0] is not None
