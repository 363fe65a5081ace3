"""The fakes behave like the real services for the real SDKs and the real Claude Code CLI."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from notion_client import APIErrorCode, APIResponseError, AsyncClient, Client
from notion_client.helpers import collect_paginated_api

from tests.fakes import (
    FakeAnthropic,
    FakeNotion,
    FakeOpenAI,
    FakeService,
    Script,
    Text,
    ToolUse,
    call_tool,
    last_tool_result,
    mcp_tool,
    reply_with,
    system_text,
    turn_text,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def openai_client(fake: FakeOpenAI, **options) -> openai.OpenAI:
    return openai.OpenAI(api_key="sk-test", base_url=fake.url + "/v1", **options)


# -- base behaviour --------------------------------------------------------------------------------
def test_records_requests_and_answers_unknown_routes_with_404():
    with FakeService() as fake:
        response = httpx.post(fake.url + "/nowhere?x=1", json={"a": 1}, headers={"X-Thing": "yes"})
        assert response.status_code == 404
        assert "nowhere" in response.json()["error"]["message"]
        [request] = fake.requests
        assert (request.method, request.path, request.query) == ("POST", "/nowhere", {"x": "1"})
        assert request.headers["x-thing"] == "yes"
        assert request.json() == {"a": 1}


def test_failures_are_consumed_in_order_and_can_target_a_path(fake_openai):
    fake_openai.fail_next("500", path=r"/v1/models")
    fake_openai.fail_next("429", count=2, retry_after=3)
    statuses = [httpx.get(fake_openai.url + "/v1/models").status_code for _ in range(4)]
    assert statuses == [500, 429, 429, 200]
    response = httpx.post(fake_openai.url + "/v1/chat/completions", json={})
    assert response.status_code == 200


def test_required_api_key_rejects_missing_or_wrong_keys():
    with FakeOpenAI(required_api_key="sk-right") as fake:
        with pytest.raises(openai.AuthenticationError):
            openai_client(fake, max_retries=0).models.list()
        ok = openai.OpenAI(api_key="sk-right", base_url=fake.url + "/v1", max_retries=0)
        assert ok.models.list().data
    with FakeAnthropic(required_api_key="k") as fake:
        response = httpx.post(fake.url + "/v1/messages", json={}, headers={"x-api-key": "k"})
        assert response.status_code == 200


def test_close_does_not_wait_for_a_hanging_request():
    fake = FakeOpenAI().start()
    fake.fail_next("timeout")  # hangs for the default 30 s
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(fake.url + "/v1/models", timeout=0.2)
    started = time.monotonic()
    fake.close()
    assert time.monotonic() - started < 20  # not the 30 s the request would hang


# -- OpenAI ----------------------------------------------------------------------------------------
def test_openai_chat_completion(fake_openai):
    fake_openai.chat_responder = lambda body: f"echo: {body['messages'][-1]['content']}"
    completion = openai_client(fake_openai).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "ping"}]
    )
    assert completion.choices[0].message.content == "echo: ping"
    assert completion.choices[0].finish_reason == "stop"
    assert fake_openai.chat_requests[0]["model"] == "gpt-4o-mini"
    assert fake_openai.requests[0].headers["authorization"] == "Bearer sk-test"


def test_openai_streaming_with_usage(fake_openai):
    fake_openai.chat_reply = "streamed answer"
    stream = openai_client(fake_openai).chat.completions.create(
        model="llama3.2",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "streamed answer"
    assert chunks[-1].usage.total_tokens > 0


def test_openai_tool_calls(fake_openai):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "lookup", "arguments": '{"q": "x"}'},
    }
    fake_openai.chat_responder = lambda body: {"content": None, "tool_calls": [call]}
    completion = openai_client(fake_openai).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.choices[0].message.tool_calls[0].function.name == "lookup"


def test_perplexity_citations(fake_openai):
    fake_openai.citations = ["https://example.com/a", "https://example.com/b"]
    completion = openai_client(fake_openai).chat.completions.create(
        model="sonar", messages=[{"role": "user", "content": "news?"}]
    )
    assert completion.citations == fake_openai.citations
    assert completion.search_results[1]["url"] == "https://example.com/b"


def test_openai_images_as_base64_and_url(fake_openai):
    client = openai_client(fake_openai)
    b64 = client.images.generate(model="gpt-image-1", prompt="a cat")
    assert base64.b64decode(b64.data[0].b64_json).startswith(PNG_SIGNATURE)
    by_url = client.images.generate(model="dall-e-3", prompt="a cat", response_format="url")
    assert httpx.get(by_url.data[0].url).content.startswith(PNG_SIGNATURE)


def test_openai_models_and_ollama_tags(fake_openai):
    assert "llama3.2" in [m.id for m in openai_client(fake_openai).models.list()]
    assert httpx.get(fake_openai.url + "/api/tags").json()["models"]


async def test_async_openai_client(fake_openai):
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=fake_openai.url + "/v1")
    completion = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content == fake_openai.chat_reply
    await client.close()


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("401", openai.AuthenticationError),
        ("403", openai.PermissionDeniedError),
        ("404", openai.NotFoundError),
        ("429", openai.RateLimitError),
        ("500", openai.InternalServerError),
        ("503", openai.InternalServerError),
        ("timeout", openai.APITimeoutError),
        ("disconnect", openai.APIConnectionError),
        ("malformed", json.JSONDecodeError),
    ],
)
def test_openai_failures_map_to_sdk_errors(fake_openai, kind, error):
    fake_openai.fail_next(kind, retry_after=7)
    client = openai_client(fake_openai, max_retries=0, timeout=0.5)
    with pytest.raises(error) as raised:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    if kind == "429":
        assert raised.value.response.headers["retry-after"] == "7"
        assert raised.value.code == "rate_limit_exceeded"


# -- Notion ----------------------------------------------------------------------------------------
PROJECTS = [
    {"title": "Valor", "status": "In progress", "priority": "High", "url": "https://valor.dev"},
    {"title": "Bridge", "status": "Not started", "priority": "Medium"},
    {"title": "Docs", "status": "Done", "priority": "Low"},
    {"title": "Scheduler", "status": "In progress", "priority": "Medium"},
    {"title": "Bench", "status": "Not started"},
]


def notion_client(fake: FakeNotion, **options) -> Client:
    return Client(auth="secret_test", base_url=fake.url, **options)


def titles(pages):
    return [page["properties"]["Name"]["title"][0]["plain_text"] for page in pages]


def test_notion_database_to_data_source_query_with_pagination(fake_notion):
    fake_notion.add_database("db-projects", PROJECTS)
    fake_notion.page_size = 2
    client = notion_client(fake_notion)
    database = client.databases.retrieve(database_id="db-projects")
    source_id = database["data_sources"][0]["id"]
    pages = collect_paginated_api(client.data_sources.query, data_source_id=source_id)
    assert titles(pages) == [row["title"] for row in PROJECTS]
    queries = fake_notion.requests_to(r"/query$")
    assert len(queries) == 3
    assert queries[1].json()["start_cursor"] == pages[2]["id"]
    assert queries[0].headers["notion-version"] == "2025-09-03"
    assert queries[0].headers["authorization"] == "Bearer secret_test"
    first = pages[0]["properties"]
    assert first["Status"]["status"]["name"] == "In progress"
    assert first["Priority"]["select"]["name"] == "High"
    assert first["URL"]["url"] == "https://valor.dev"


def test_notion_filters_and_sorts(fake_notion):
    source_id = fake_notion.add_database("db", PROJECTS)
    result = notion_client(fake_notion).data_sources.query(
        data_source_id=source_id,
        filter={"property": "Status", "status": {"equals": "In progress"}},
        sorts=[{"property": "Name", "direction": "descending"}],
    )
    assert titles(result["results"]) == ["Valor", "Scheduler"]
    assert result["has_more"] is False


def test_notion_legacy_database_query(fake_notion):
    fake_notion.add_database("db", PROJECTS)
    client = notion_client(fake_notion, notion_version="2022-06-28")
    assert "properties" in client.databases.retrieve(database_id="db")
    result = client.request(path="databases/db/query", method="POST", body={"page_size": 1})
    assert titles(result["results"]) == ["Valor"]
    assert result["has_more"] is True


def test_notion_errors_use_notion_shape(fake_notion):
    client = notion_client(fake_notion, retry=False)
    with pytest.raises(APIResponseError) as raised:
        client.databases.retrieve(database_id="missing")
    assert raised.value.code == APIErrorCode.ObjectNotFound
    fake_notion.fail_next("429", retry_after=1)
    with pytest.raises(APIResponseError) as raised:
        client.users.me()
    assert raised.value.code == APIErrorCode.RateLimited
    assert raised.value.headers["retry-after"] == "1"


def test_notion_client_retries_after_429(fake_notion):
    fake_notion.fail_next("429", retry_after=0)
    assert notion_client(fake_notion).users.me()["type"] == "bot"
    assert len(fake_notion.requests) == 2


async def test_notion_async_client(fake_notion):
    source_id = fake_notion.add_database("db", PROJECTS[:1])
    async with AsyncClient(auth="secret_test", base_url=fake_notion.url) as client:
        result = await client.data_sources.query(data_source_id=source_id)
    assert titles(result["results"]) == ["Valor"]


# -- Anthropic through its SDK ---------------------------------------------------------------------
def test_anthropic_sdk_streams_text_and_tool_use(fake_anthropic):
    fake_anthropic.responder = lambda body: [Text("Let me check."), ToolUse("lookup", {"q": "x"})]
    client = anthropic.Anthropic(api_key="k", base_url=fake_anthropic.url, max_retries=0)
    tools = [{"name": "lookup", "description": "d", "input_schema": {"type": "object"}}]
    request = {
        "model": "claude-opus-5-5",
        "max_tokens": 100,
        "tools": tools,
        "messages": [{"role": "user", "content": "hi"}],
    }
    with client.messages.stream(**request) as stream:
        message = stream.get_final_message()
    assert message.stop_reason == "tool_use"
    assert message.content[0].text == "Let me check."
    assert (message.content[1].name, message.content[1].input) == ("lookup", {"q": "x"})
    plain = client.messages.create(**request)
    assert plain.content[1].input == {"q": "x"}
    del request["max_tokens"]
    assert client.messages.count_tokens(**request).input_tokens > 0


def test_anthropic_side_requests_get_the_side_answer(fake_anthropic):
    fake_anthropic.responder = reply_with("main")
    client = anthropic.Anthropic(api_key="k", base_url=fake_anthropic.url, max_retries=0)
    side = client.messages.create(
        model="claude-opus-5-5",
        max_tokens=20,
        system="Write a 3-word title.",
        messages=[{"role": "user", "content": "hi"}],
    )
    assert side.content[0].text == "OK"


def test_anthropic_failures_use_anthropic_shape(fake_anthropic):
    fake_anthropic.fail_next("429", retry_after=2)
    client = anthropic.Anthropic(api_key="k", base_url=fake_anthropic.url, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as raised:
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert raised.value.body["error"]["type"] == "rate_limit_error"


# -- the real Claude Code CLI ----------------------------------------------------------------------
def run_claude(claude_bin: Path, env: dict[str, str], *args: str, timeout: float = 60):
    """Runs `claude -p`; returns its final `result` event and the seconds it took."""
    started = time.monotonic()
    completed = subprocess.run(
        [str(claude_bin), "-p", *args, "--output-format", "stream-json", "--verbose"],
        env=env,
        cwd=env["HOME"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    elapsed = time.monotonic() - started
    events = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    assert events, completed.stderr
    return events[-1], elapsed


@pytest.mark.e2e
def test_claude_answers_with_scripted_text(claude_bin, claude_env, fake_anthropic, record_property):
    fake_anthropic.responder = reply_with("Scripted hello from the fake.")
    result, elapsed = run_claude(claude_bin, claude_env, "hello")
    record_property("claude_seconds", round(elapsed, 2))
    assert result["type"] == "result"
    assert result["is_error"] is False
    assert result["result"] == "Scripted hello from the fake."
    [main] = fake_anthropic.main_requests
    assert main["stream"] is True
    assert "hello" in turn_text(main)
    assert "Claude" in system_text(main)
    assert fake_anthropic.requests[0].query == {"beta": "true"}
    assert fake_anthropic.requests[0].headers["x-api-key"] == "test-key"


@pytest.mark.e2e
def test_claude_runs_a_builtin_tool_and_sees_its_result(claude_bin, claude_env, fake_anthropic):
    fake_anthropic.responder = call_tool("Bash", {"command": "echo hi"}, "Bash said: {result}")
    result, _ = run_claude(claude_bin, claude_env, "say hi", "--allowedTools", "Bash")
    assert result["result"] == "Bash said: hi"
    second = fake_anthropic.main_requests[1]
    assert last_tool_result(second) == "hi"


@pytest.mark.e2e
def test_claude_resumed_session_restarts_the_script(claude_bin, claude_env, fake_anthropic):
    fake_anthropic.responder = Script(
        [ToolUse("Bash", {"command": "echo again"}), lambda r: f"got {last_tool_result(r)}"]
    )
    first, _ = run_claude(claude_bin, claude_env, "one", "--allowedTools", "Bash")
    second, _ = run_claude(
        claude_bin, claude_env, "two", "--allowedTools", "Bash", "--resume", first["session_id"]
    )
    assert first["result"] == second["result"] == "got again"
    assert len(fake_anthropic.main_requests) == 4


@pytest.mark.e2e
def test_claude_reports_model_failures_instead_of_hanging(claude_bin, claude_env, fake_anthropic):
    fake_anthropic.fail_next("500", count=10)
    result, elapsed = run_claude(claude_bin, claude_env, "hello", timeout=30)
    assert result["is_error"] is True
    assert result["api_error_status"] == 500
    assert elapsed < 30


MCP_SERVER = """
from fastmcp import FastMCP

mcp = FastMCP("demo")


@mcp.tool
def shout(text: str) -> str:
    "Upper-case the text."
    return text.upper() + "!"


mcp.run(show_banner=False)
"""


@pytest.mark.e2e
@pytest.mark.parametrize("tool_search", ["default", "false"])
def test_claude_calls_an_mcp_tool_with_or_without_tool_search(
    claude_bin, claude_env, fake_anthropic, tmp_path, tool_search
):
    server = tmp_path / "demo_server.py"
    server.write_text(MCP_SERVER)
    config = {"mcpServers": {"demo": {"command": sys.executable, "args": [str(server)]}}}
    (tmp_path / "mcp.json").write_text(json.dumps(config))
    if tool_search == "false":
        claude_env["ENABLE_TOOL_SEARCH"] = "false"
    tool = mcp_tool("demo", "shout")
    fake_anthropic.responder = call_tool(tool, {"text": "hey"}, "MCP said: {result}")
    result, _ = run_claude(
        claude_bin,
        claude_env,
        "shout hey",
        "--mcp-config",
        str(tmp_path / "mcp.json"),
        "--allowedTools",
        "mcp__demo",
    )
    assert "HEY!" in result["result"]
    called = [
        block["name"]
        for body in fake_anthropic.main_requests
        for message in body["messages"]
        if message["role"] == "assistant"
        for block in message["content"]
        if block["type"] == "tool_use"
    ]
    assert called[-1] == tool
    assert ("ToolSearch" in called) == (tool_search == "default")


def test_a_crashing_responder_is_kept_for_the_test():
    with FakeAnthropic() as fake:
        fake.responder = lambda body: body["no such key"]
        response = httpx.post(fake.url + "/v1/messages", json={"tools": [{"name": "t"}]})
        assert response.status_code == 500
        assert isinstance(fake.errors[0], KeyError)
