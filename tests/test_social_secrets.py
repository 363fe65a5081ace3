"""No API key reaches a log line or an error text, even when an upstream echoes it back."""

from __future__ import annotations

import json
import logging

import pytest
from fastmcp import Client

from servers.notion import mcp as notion_mcp
from servers.social import mcp as social_mcp
from tests.fakes.base import RecordedRequest, Reply
from tests.fakes.notion_api import FakeNotion
from tests.fakes.openai_api import FakeOpenAI, tiny_png
from tests.social_fakes import only_loopback_connections  # noqa: F401 - autouse fixture
from tests.support import configure, texts

# Shapes the generic redaction patterns do not know: only Valor's handling protects these.
OPENAI_KEY = "valor-fake-openai-K3Y-8c1f2e"
PERPLEXITY_KEY = "valor-fake-pplx-K3Y-55d0aa"
NOTION_KEY = "valor-fake-notion-K3Y-e7b9c4"
KEYS = (OPENAI_KEY, PERPLEXITY_KEY, NOTION_KEY)
DATABASE = "3f0c6a5e-8d9b-4c1e-9a57-1b2c3d4e5f60"


def echo_key(fake, status: int):
    """Answer like a provider that quotes the offending key back in its error message."""

    def handler(request: RecordedRequest, **_: str) -> Reply:
        sent = request.headers.get("authorization", "")
        reply = fake.error(status, f"Incorrect API key provided: {sent}. Request was {sent!r}")
        reply.headers["Retry-After"] = "0"
        return reply

    return handler


@pytest.fixture
def echoing_services(monkeypatch, valor_env):
    with FakeOpenAI() as openai_fake, FakeOpenAI() as pplx_fake, FakeNotion() as notion_fake:
        (valor_env / "media").mkdir(parents=True)
        (valor_env / "media" / "photo.png").write_bytes(tiny_png())
        env = {
            "OPENAI_API_KEY": OPENAI_KEY,
            "VALOR_OPENAI_BASE_URL": f"{openai_fake.url}/v1",
            "VALOR_OPENAI_MAX_RETRIES": "1",
            "PERPLEXITY_API_KEY": PERPLEXITY_KEY,
            "VALOR_PERPLEXITY_BASE_URL": f"{pplx_fake.url}/v1",
            "VALOR_PERPLEXITY_MAX_RETRIES": "1",
            "NOTION_API_KEY": NOTION_KEY,
            "VALOR_NOTION_BASE_URL": notion_fake.url,
            "VALOR_NOTION_WORKSPACES": json.dumps({"Valor": DATABASE}),
            "VALOR_NOTION_MAX_RETRIES": "1",
            "VALOR_LOG_LEVEL": "DEBUG",
        }
        configure(monkeypatch, **env)
        yield openai_fake, pplx_fake, notion_fake


@pytest.mark.parametrize("status", [400, 401, 403, 404, 429, 500])
async def test_keys_never_appear_in_errors_or_logs(echoing_services, caplog, status):
    openai_fake, pplx_fake, notion_fake = echoing_services
    caplog.set_level(logging.DEBUG)  # every logger, the SDKs' and httpx's included
    for path in (r"/v1/chat/completions", r"/v1/images/generations"):
        openai_fake.route("POST", path, echo_key(openai_fake, status))
        pplx_fake.route("POST", path, echo_key(pplx_fake, status))
    notion_fake.route("GET", r"/v1/databases/(?P<object_id>[\w-]+)", echo_key(notion_fake, status))

    errors = []
    async with Client(social_mcp) as social, Client(notion_mcp) as notion:
        for client, tool, arguments in [
            (social, "search_current_info", {"query": "news"}),
            (social, "create_image", {"prompt": "a cat"}),
            (social, "analyze_shared_image", {"image_path": "photo.png", "question": "what?"}),
            (notion, "query_notion_projects", {"workspace": "Valor", "question": "billing"}),
        ]:
            result = await client.call_tool(tool, arguments, raise_on_error=False)
            assert result.is_error, tool
            errors.append(texts(result))

    # The keys really were sent (and echoed), so the absence below is not vacuous.
    assert openai_fake.requests[0].headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert pplx_fake.requests[0].headers["authorization"] == f"Bearer {PERPLEXITY_KEY}"
    assert notion_fake.requests[0].headers["authorization"] == f"Bearer {NOTION_KEY}"
    seen = "\n".join(errors) + "\n" + caplog.text
    for record in caplog.records:
        seen += "\n" + record.getMessage() + repr(record.args) + str(record.exc_info or "")
    for key in KEYS:
        assert key not in seen
        assert key[-10:] not in seen  # not even a tail of it
    assert all(error.startswith("[") for error in errors), errors
