"""Docs and examples keep up with the code."""

from __future__ import annotations

import json

from servers import SERVERS
from servers.core.settings import REPO_ROOT, Settings


def setting_names() -> list[str]:
    names = []
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names.append(alias.choices[0] if alias is not None else f"VALOR_{name.upper()}")
    return names


def test_every_setting_is_documented_and_in_env_example():
    docs = (REPO_ROOT / "docs" / "configuration.md").read_text()
    example = (REPO_ROOT / ".env.example").read_text()
    missing_docs = [n for n in setting_names() if f"`{n}`" not in docs]
    missing_example = [n for n in setting_names() if f"{n}=" not in example]
    assert not missing_docs, f"add to docs/configuration.md: {missing_docs}"
    assert not missing_example, f"add to .env.example: {missing_example}"


def test_every_server_is_registered_and_documented():
    config = json.loads((REPO_ROOT / ".mcp.json").read_text())["mcpServers"]
    assert set(config) == set(SERVERS)
    for name in SERVERS:
        assert (REPO_ROOT / "docs" / "tools" / f"{name}.md").exists(), name
