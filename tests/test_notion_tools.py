"""notion-tools through real MCP clients against the loopback Notion fake (notion-client 3.x)."""

from __future__ import annotations

import json
import time

import pytest

from servers.core import notion_projects
from servers.notion import mcp
from tests.fakes.notion_api import FakeNotion
from tests.social_fakes import only_loopback_connections  # noqa: F401 - autouse fixture
from tests.support import call, configure, texts

VALOR_DB = "3f0c6a5e-8d9b-4c1e-9a57-1b2c3d4e5f60"
OTHER_DB = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
NOTION_KEY = "ntn_test0000000000000000"
ROWS = [
    {"title": "Billing rewrite", "status": "In progress", "priority": "High"},
    {"title": "Landing page copy", "status": "Done", "priority": "Low"},
    {"title": "Billing alerts", "status": "Not started", "priority": "Medium"},
    {"title": "Mobile onboarding", "status": "In progress", "priority": "High"},
    {"title": "Docs cleanup", "status": None, "priority": None},
]


def use_notion(monkeypatch, fake: FakeNotion, **extra: str) -> None:
    env = {
        "NOTION_API_KEY": NOTION_KEY,
        "VALOR_NOTION_BASE_URL": fake.url,
        "VALOR_NOTION_WORKSPACES": json.dumps({"Valor": VALOR_DB, "Other": OTHER_DB}),
        "VALOR_NOTION_MAX_RETRIES": "0",
    }
    configure(monkeypatch, **(env | extra))


@pytest.fixture
def notion(fake_notion, monkeypatch):
    fake_notion.add_database(VALOR_DB, ROWS)
    use_notion(monkeypatch, fake_notion)
    return fake_notion


async def test_list_workspaces(notion):
    result = await call(mcp, "list_notion_workspaces", {})
    assert result.structured_content == {
        "workspaces": [
            {"name": "Other", "database_id": OTHER_DB},
            {"name": "Valor", "database_id": VALOR_DB},
        ],
        "configured": True,
    }
    assert notion.requests == []  # listing reads settings only


async def test_a_question_filters_the_rows_by_its_terms(notion):
    result = await call(
        mcp, "query_notion_projects", {"workspace": "valor", "question": "How is billing going?"}
    )
    data = result.structured_content
    assert data["workspace"] == "Valor"
    assert data["answer_source"] == "listing"
    assert data["filtered"] is True
    assert data["total_rows"] == 5
    assert [row["title"] for row in data["rows"]] == ["Billing rewrite", "Billing alerts"]
    assert data["rows"][0]["status"] == "In progress"
    assert data["rows"][0]["priority"] == "High"
    assert data["rows"][0]["url"].startswith("https://www.notion.so/")
    assert "2 of 5 rows match" in data["answer"]
    assert "Billing rewrite | status: In progress | priority: High" in data["answer"]
    request = notion.requests[0]
    assert request.headers["authorization"] == f"Bearer {NOTION_KEY}"
    assert request.headers["notion-version"] == "2025-09-03"


async def test_status_and_priority_words_match_too(notion):
    result = await call(
        mcp,
        "query_notion_projects",
        {"workspace": "Valor", "question": "which high priority items are in progress?"},
    )
    titles = [row["title"] for row in result.structured_content["rows"]]
    assert titles[:2] == ["Billing rewrite", "Mobile onboarding"]


async def test_a_general_question_lists_every_row(notion):
    result = await call(
        mcp, "query_notion_projects", {"workspace": "Valor", "question": "what's up?"}
    )
    data = result.structured_content
    assert data["filtered"] is False
    assert len(data["rows"]) == 5
    assert "all 5 rows" in data["answer"]
    assert "Docs cleanup | status: — | priority: —" in data["answer"]


async def test_pagination_is_followed_to_the_end(fake_notion, monkeypatch):
    rows = [{"title": f"Task {i:02d}", "status": "Done"} for i in range(23)]
    fake_notion.add_database(VALOR_DB, rows)
    fake_notion.page_size = 5
    use_notion(monkeypatch, fake_notion)
    result = await call(
        mcp, "query_notion_projects", {"workspace": "Valor", "question": "all tasks"}
    )
    assert result.structured_content["total_rows"] == 23
    queries = fake_notion.requests_to(r"/query$", "POST")
    assert len(queries) == 5
    assert "start_cursor" not in queries[0].json()
    assert all("start_cursor" in q.json() for q in queries[1:])


async def test_the_row_cap_stops_reading(fake_notion, monkeypatch):
    fake_notion.add_database(VALOR_DB, [{"title": f"T{i}"} for i in range(30)])
    fake_notion.page_size = 10
    use_notion(monkeypatch, fake_notion, VALOR_NOTION_MAX_ROWS="12")
    result = await call(mcp, "query_notion_projects", {"workspace": "Valor", "question": "list"})
    assert result.structured_content["total_rows"] == 12
    assert "VALOR_NOTION_MAX_ROWS" in result.structured_content["note"]
    assert len(fake_notion.requests_to(r"/query$")) == 2


async def test_429_is_retried_after_retry_after(notion, monkeypatch):
    use_notion(monkeypatch, notion, VALOR_NOTION_MAX_RETRIES="2")
    notion.fail_next("429", retry_after=1, path="/query$")
    started = time.monotonic()
    result = await call(mcp, "query_notion_projects", {"workspace": "Valor", "question": "billing"})
    elapsed = time.monotonic() - started
    assert not result.is_error
    assert len(notion.requests_to(r"/query$")) == 2
    assert elapsed >= 1.0  # waited as Notion asked


async def test_429_beyond_the_retries_is_a_rate_limit_error(notion, monkeypatch):
    use_notion(monkeypatch, notion, VALOR_NOTION_MAX_RETRIES="1")
    notion.fail_next("429", count=5, retry_after=0, path="/query$")
    result = await call(mcp, "query_notion_projects", {"workspace": "Valor", "question": "billing"})
    assert texts(result).startswith("[rate_limit] Notion is rate limiting")
    assert len(notion.requests_to(r"/query$")) == 2  # bounded: one try plus one retry


@pytest.mark.parametrize(
    ("failure", "category", "words"),
    [
        ("401", "config", "check NOTION_API_KEY"),
        ("404", "config", "share the database with the integration"),
        ("403", "config", "share the database"),
        ("500", "upstream_api", "Notion failed"),
        ("503", "upstream_api", "Notion failed"),
        ("malformed", "upstream_api", "malformed reply"),
        ("timeout", "timeout", "did not answer in time"),
        ("disconnect", "upstream_api", "could not be reached"),
    ],
)
async def test_notion_failures_are_categorized(notion, monkeypatch, failure, category, words):
    use_notion(monkeypatch, notion, VALOR_NOTION_TIMEOUT_SECONDS="0.5")
    notion.fail_next(failure, count=3)
    result = await call(mcp, "query_notion_projects", {"workspace": "Valor", "question": "billing"})
    assert result.is_error
    assert texts(result).startswith(f"[{category}]"), texts(result)
    assert words in texts(result)


async def test_an_unshared_database_is_a_config_error(notion):
    result = await call(mcp, "query_notion_projects", {"workspace": "Other", "question": "billing"})
    assert texts(result).startswith("[config]")
    assert "share the database" in texts(result)


async def test_unknown_workspaces_list_the_known_ones(notion):
    result = await call(mcp, "query_notion_projects", {"workspace": "Marketing", "question": "x"})
    assert texts(result) == "[input] Unknown workspace 'Marketing'. Known workspaces: Other, Valor."
    assert notion.requests == []


async def test_missing_configuration_says_what_to_set(monkeypatch, fake_notion):
    result = await call(mcp, "query_notion_projects", {"workspace": "Valor", "question": "x"})
    assert texts(result).startswith("[config] No Notion workspaces are configured")
    configure(monkeypatch, VALOR_NOTION_WORKSPACES=json.dumps({"Valor": VALOR_DB}))
    result = await call(mcp, "query_notion_projects", {"workspace": "Valor", "question": "x"})
    assert texts(result) == "[config] Notion is not configured: set NOTION_API_KEY."


async def test_a_configured_model_answers_from_the_rows(notion, monkeypatch, fake_openai):
    configure(
        monkeypatch,
        OPENAI_API_KEY="sk-test-model-key-0000",
        VALOR_OPENAI_BASE_URL=f"{fake_openai.url}/v1",
        VALOR_OPENAI_MAX_RETRIES="0",
    )
    fake_openai.chat_reply = "Billing rewrite is in progress and high priority."
    result = await call(
        mcp, "query_notion_projects", {"workspace": "Valor", "question": "billing?"}
    )
    data = result.structured_content
    assert data["answer"] == "Billing rewrite is in progress and high priority."
    assert data["answer_source"] == "model"
    prompt = fake_openai.chat_requests[0]["messages"][1]["content"]
    assert "Billing rewrite" in prompt and "Question: billing?" in prompt

    fake_openai.fail_next("500", count=2)
    fallback = await call(
        mcp, "query_notion_projects", {"workspace": "Valor", "question": "billing?"}
    )
    assert fallback.structured_content["answer_source"] == "listing"
    assert "[upstream_api]" in fallback.structured_content["note"]


def test_rows_are_parsed_by_property_type_whatever_the_names():
    page = {
        "url": "https://www.notion.so/x",
        "last_edited_time": "2026-01-01T00:00:00.000Z",
        "properties": {
            "Task": {"type": "title", "title": [{"plain_text": "Ship "}, {"plain_text": "it"}]},
            "Stage": {"type": "select", "select": None},
            "Project status": {"type": "select", "select": {"name": "Blocked"}},
            "Prioritet": {"type": "select", "select": {"name": "P1"}},
        },
    }
    row = notion_projects.parse_row(page)
    assert (row.title, row.status, row.priority) == ("Ship it", "Blocked", "P1")


async def test_stdio_entry_answers_the_official_client(notion, stdio_client_for):
    env = {
        "NOTION_API_KEY": NOTION_KEY,
        "VALOR_NOTION_BASE_URL": notion.url,
        "VALOR_NOTION_WORKSPACES": json.dumps({"Valor": VALOR_DB}),
    }
    async with stdio_client_for("notion-tools", env) as session:
        names = {tool.name for tool in (await session.list_tools()).tools}
        result = await session.call_tool(
            "query_notion_projects", {"workspace": "Valor", "question": "mobile"}
        )
    assert names == {"query_notion_projects", "list_notion_workspaces"}
    assert [row["title"] for row in result.structured_content["rows"]] == ["Mobile onboarding"]
