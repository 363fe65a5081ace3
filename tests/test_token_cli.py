"""`valor token create | list | revoke` and the token format behind them."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from scheduler.cli import app
from servers.core import tokens_issued
from servers.core.principals import Principal
from servers.core.settings import get_settings
from servers.core.store import get_store
from servers.core.trust import (
    ScopeTokenError,
    load_scope_secret,
    mint_scope_token,
    mint_token,
    new_secret,
    verify_token,
)


def valor(*args: str):
    return CliRunner().invoke(app, list(args))


def is_revoked(token_id: str) -> bool:
    return tokens_issued.is_revoked(get_store(get_settings().db_path), token_id)


def test_create_prints_the_token_once_and_records_only_its_id():
    created = valor("token", "create", "--chat", "42", "--name", "laptop", "--ttl", "2h")
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    assert "\n" not in token
    principal = verify_token(load_scope_secret(get_settings()), token)
    assert principal == Principal(
        "chat", chat_id=42, scopes=frozenset({"chat"}), token_id=principal.token_id, name="laptop"
    )
    assert principal.token_id in created.stderr and "Shown once" in created.stderr
    [issued] = tokens_issued.list_tokens(get_store(get_settings().db_path))
    assert (issued.id, issued.kind, issued.chat_id, issued.name) == (
        principal.token_id,
        "chat",
        42,
        "laptop",
    )
    assert 2 * 3600 - 60 < issued.expires_at - issued.created_at <= 2 * 3600
    rows = get_store(get_settings().db_path).query("SELECT * FROM issued_tokens")
    assert token not in repr([tuple(row) for row in rows])


def test_list_and_revoke():
    operator = valor("token", "create", "--operator", "--scope", "server:monitoring-tools")
    assert operator.exit_code == 0, operator.output
    token_id = verify_token(load_scope_secret(get_settings()), operator.stdout.strip()).token_id
    assert token_id is not None
    listed = valor("token", "list")
    assert token_id in listed.stdout and "active" in listed.stdout
    assert "server:monitoring-tools" in listed.stdout
    revoked = valor("token", "revoke", token_id)
    assert revoked.exit_code == 0 and is_revoked(token_id)
    assert "revoked" in valor("token", "list").stdout
    assert valor("token", "revoke", "nosuchid").exit_code == 1
    with pytest.raises(ScopeTokenError, match="revoked"):
        verify_token(load_scope_secret(get_settings()), operator.stdout.strip(), revoked=is_revoked)


@pytest.mark.parametrize(
    "args",
    [
        [],  # grants nothing
        ["--scope", "chat"],  # a chat scope bound to no chat would reach every chat
        ["--chat", "1", "--operator"],
        ["--chat", "1", "--scope", "server:no-such-tools"],
        ["--chat", "1", "--scope", "everything"],
        ["--chat", "1", "--ttl", "soon"],
        ["--chat", "1", "--ttl", "0"],
    ],
)
def test_create_refuses_unclear_grants(args):
    result = valor("token", "create", *args)
    assert result.exit_code == 2, result.output
    assert tokens_issued.list_tokens(get_store(get_settings().db_path)) == []


def test_list_with_no_tokens():
    assert "No tokens issued" in valor("token", "list").stdout


@pytest.mark.parametrize(
    ("text", "seconds"), [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("45", 45)]
)
def test_parse_ttl(text, seconds):
    assert tokens_issued.parse_ttl(text) == seconds


def test_token_reasons():
    secret = new_secret()
    chat = mint_scope_token(secret, 7)
    assert verify_token(secret, chat).chat_id == 7
    assert verify_token(secret, mint_scope_token(secret, None)).scopes == {"operator"}
    for token, reason in [
        ("nonsense", "malformed"),
        ("v2.e30", "malformed"),
        (chat[:-1] + ("0" if chat[-1] != "0" else "1"), "bad signature"),
        (mint_scope_token(new_secret(), 7), "bad signature"),
        (mint_token(secret, Principal("chat", 7, frozenset({"chat"})), -1)[0], "expired"),
    ]:
        with pytest.raises(ScopeTokenError, match=reason):
            verify_token(secret, token)
    # Tokens carry distinct short ids.
    ids = {verify_token(secret, mint_scope_token(secret, 7)).token_id for _ in range(20)}
    assert len(ids) == 20 and all(len(i) == 12 for i in ids if i)
