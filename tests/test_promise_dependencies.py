"""A promise whose kind cannot run here is refused at once ([config]), and nothing is recorded."""

from __future__ import annotations

from servers.promises import mcp
from tests.support import call, configure, texts


async def test_research_without_a_perplexity_key_is_refused_up_front(store, monkeypatch):
    refused = await call(mcp, "create_promise", {"description": "What is new in Python?"})
    assert refused.is_error
    text = texts(refused)
    assert text.startswith("[config]") and "PERPLEXITY_API_KEY" in text
    assert store.query("SELECT count(*) FROM promises")[0][0] == 0  # nothing half-accepted

    configure(monkeypatch, PERPLEXITY_API_KEY="pplx-test-key-123456")  # the only difference
    accepted = await call(mcp, "create_promise", {"description": "What is new in Python?"})
    assert not accepted.is_error, texts(accepted)
    assert store.query("SELECT count(*) FROM promises")[0][0] == 1


async def test_claude_code_without_the_cli_is_refused_up_front(store, monkeypatch, tmp_path):
    configure(monkeypatch, VALOR_CLAUDE_BIN=str(tmp_path / "no-such-claude"))
    refused = await call(mcp, "create_promise", {"description": "refactor", "kind": "claude_code"})
    assert refused.is_error
    assert texts(refused).startswith("[config]") and "VALOR_CLAUDE_BIN" in texts(refused)
    assert store.query("SELECT count(*) FROM promises")[0][0] == 0
