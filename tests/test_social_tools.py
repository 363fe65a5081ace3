# ruff: noqa: F811 - pytest fixtures imported from tests.social_fakes are parameters here
"""social-tools through real MCP clients against loopback fakes speaking the real wire formats."""

from __future__ import annotations

import base64
import json
import os

import pytest
from fastmcp import Client

from servers.core import http_guard, openai_services
from servers.social import mcp
from tests.fakes.base import Reply
from tests.fakes.openai_api import FakeOpenAI, tiny_png
from tests.social_fakes import article, only_loopback_connections, pages  # noqa: F401
from tests.support import call, configure, texts

CHAT_A, CHAT_B = 4242, -100777
SEARCH_TOOLS = {"search_current_info", "create_image", "analyze_shared_image"}
ALL_TOOLS = SEARCH_TOOLS | {"save_link", "search_links"}


def use_openai(monkeypatch, fake: FakeOpenAI, **extra: str) -> None:
    env = {
        "OPENAI_API_KEY": "sk-test-openai-key-000",
        "VALOR_OPENAI_BASE_URL": f"{fake.url}/v1",
        "VALOR_OPENAI_MAX_RETRIES": "0",
    }
    configure(monkeypatch, **(env | extra))


def use_perplexity(monkeypatch, fake: FakeOpenAI, **extra: str) -> None:
    env = {
        "PERPLEXITY_API_KEY": "pplx-test-key-000000",
        "VALOR_PERPLEXITY_BASE_URL": f"{fake.url}/v1",
        "VALOR_PERPLEXITY_MAX_RETRIES": "0",
    }
    configure(monkeypatch, **(env | extra))


def media_dir(valor_env):
    path = valor_env / "media"
    path.mkdir(parents=True, exist_ok=True)
    return path


async def test_the_server_lists_its_tools_with_annotations():
    async with Client(mcp) as client:
        tools = {tool.name: tool for tool in await client.list_tools()}
    assert set(tools) == ALL_TOOLS
    assert tools["search_links"].annotations.read_only_hint is True
    assert tools["save_link"].annotations.open_world_hint is True
    assert tools["create_image"].annotations.destructive_hint is False
    assert (
        "media folder"
        in tools["analyze_shared_image"].input_schema["properties"]["image_path"]["description"]
    )
    assert tools["search_current_info"].output_schema is not None


# -- search_current_info ----------------------------------------------------------------------
async def test_search_returns_the_answer_with_numbered_citations(monkeypatch, fake_openai):
    fake_openai.chat_reply = "Python 3.14 was released in October 2025 [1][2]."
    fake_openai.citations = ["https://python.org/news", "https://lwn.net/a", "https://c.example"]
    use_perplexity(monkeypatch, fake_openai, VALOR_PERPLEXITY_MODEL="sonar-pro")
    result = await call(mcp, "search_current_info", {"query": "latest python", "max_results": 2})
    data = result.structured_content
    assert data["answer"].startswith("Python 3.14")
    assert data["citations"] == [
        {"number": 1, "url": "https://python.org/news", "title": "Source 1"},
        {"number": 2, "url": "https://lwn.net/a", "title": "Source 2"},
    ]
    sent = fake_openai.chat_requests[0]
    assert sent["model"] == "sonar-pro"
    assert sent["messages"][-1] == {"role": "user", "content": "latest python"}
    auth = fake_openai.requests[0].headers["authorization"]
    assert auth == "Bearer pplx-test-key-000000"


async def test_search_retries_a_429_after_retry_after_then_answers(monkeypatch, fake_openai):
    fake_openai.citations = ["https://a.example"]
    use_perplexity(monkeypatch, fake_openai, VALOR_PERPLEXITY_MAX_RETRIES="2")
    fake_openai.fail_next("429", retry_after=0.3)
    result = await call(mcp, "search_current_info", {"query": "weather"})
    assert not result.is_error
    assert len(fake_openai.chat_requests) == 2


@pytest.mark.parametrize(
    ("failure", "category", "words"),
    [
        ("429", "rate_limit", "Retry after 7 s"),
        ("500", "upstream_api", "HTTP 500"),
        ("503", "upstream_api", "HTTP 503"),
        ("malformed", "upstream_api", "malformed reply"),
        ("disconnect", "upstream_api", "could not be reached"),
        ("404", "config", "does not know the configured model"),
        ("403", "config", "denied access"),
        ("timeout", "timeout", "did not answer in time"),
    ],
)
async def test_search_failures_are_categorized(monkeypatch, fake_openai, failure, category, words):
    use_perplexity(monkeypatch, fake_openai, VALOR_PERPLEXITY_TIMEOUT_SECONDS="0.5")
    fake_openai.fail_next(failure, count=5, retry_after=7 if failure == "429" else None)
    result = await call(mcp, "search_current_info", {"query": "anything"})
    assert result.is_error
    assert texts(result).startswith(f"[{category}]")
    assert words in texts(result)


async def test_search_needs_a_key_and_says_which(monkeypatch):
    result = await call(mcp, "search_current_info", {"query": "anything"})
    assert result.is_error
    assert texts(result) == "[config] Perplexity is not configured: set PERPLEXITY_API_KEY."


async def test_a_rejected_key_is_a_config_error():
    with FakeOpenAI(required_api_key="pplx-the-right-one-1234") as fake:
        mp = pytest.MonkeyPatch()
        try:
            use_perplexity(mp, fake)
            result = await call(mcp, "search_current_info", {"query": "x"})
        finally:
            mp.undo()
    assert texts(result) == "[config] Perplexity rejected the API key: check PERPLEXITY_API_KEY."


async def test_search_rejects_empty_queries(monkeypatch, fake_openai):
    use_perplexity(monkeypatch, fake_openai)
    result = await call(mcp, "search_current_info", {"query": ""})
    assert result.is_error and fake_openai.requests == []


# -- create_image -----------------------------------------------------------------------------
async def test_create_image_writes_a_png_into_the_media_directory(
    monkeypatch, fake_openai, valor_env
):
    fake_openai.image = tiny_png(8, 6)
    use_openai(monkeypatch, fake_openai)
    result = await call(
        mcp,
        "create_image",
        {"prompt": "a lighthouse at dusk", "quality": "high", "style": "natural"},
    )
    data = result.structured_content
    path = os.path.realpath(data["path"])
    # The operator's own images go to its folder; a chat's to that chat's (test_chat_isolation).
    assert path.startswith(os.path.realpath(valor_env / "media" / "chats" / "operator"))
    assert data["relative_path"] == os.path.relpath(path, os.path.realpath(valor_env / "media"))
    with open(path, "rb") as handle:
        assert handle.read() == fake_openai.image
    assert (data["mime_type"], data["width"], data["height"]) == ("image/png", 8, 6)
    assert data["revised_prompt"] == "a lighthouse at dusk"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    sent = fake_openai.requests_to("/v1/images/generations")[0].json()
    assert sent == {
        "model": "dall-e-3",
        "prompt": "a lighthouse at dusk",
        "size": "1024x1024",
        "n": 1,
        "quality": "hd",
        "style": "natural",
        "response_format": "b64_json",
    }


async def test_create_image_with_gpt_image_sends_no_response_format(monkeypatch, fake_openai):
    use_openai(monkeypatch, fake_openai, VALOR_OPENAI_IMAGE_MODEL="gpt-image-1")
    result = await call(mcp, "create_image", {"prompt": "a cat", "quality": "high"})
    assert not result.is_error
    sent = fake_openai.requests_to("/v1/images/generations")[0].json()
    assert "response_format" not in sent and "style" not in sent
    assert sent["quality"] == "high"


async def test_an_image_url_reply_is_downloaded_through_the_guard(monkeypatch, fake_openai):
    """Services that answer with a URL: the download is SSRF-checked like any link."""
    fake_openai.route(
        "POST",
        r"/v1/images/generations",
        lambda request: {"created": 1, "data": [{"url": f"{fake_openai.url}/files/x.png"}]},
    )
    use_openai(monkeypatch, fake_openai)
    refused = await call(mcp, "create_image", {"prompt": "a cat"})
    assert refused.is_error and "[input]" in texts(refused) and "loopback" in texts(refused)
    assert fake_openai.requests_to("/files/") == []
    port = int(fake_openai.url.rsplit(":", 1)[1])
    with http_guard.allow_loopback_ports_for_tests(port):
        allowed = await call(mcp, "create_image", {"prompt": "a cat"})
    assert not allowed.is_error
    assert allowed.structured_content["size_bytes"] == len(fake_openai.image)


async def test_create_image_refuses_a_non_image_reply(monkeypatch, fake_openai):
    fake_openai.image = b"<html>not an image</html>"
    use_openai(monkeypatch, fake_openai)
    result = await call(mcp, "create_image", {"prompt": "a cat"})
    assert texts(result) == "[upstream_api] The image service returned data that is not an image."


async def test_create_image_errors(monkeypatch, fake_openai):
    no_key = await call(mcp, "create_image", {"prompt": "a cat"})
    assert texts(no_key) == "[config] OpenAI is not configured: set OPENAI_API_KEY."
    use_openai(monkeypatch, fake_openai)
    fake_openai.fail_next("429", retry_after=30)
    limited = await call(mcp, "create_image", {"prompt": "a cat"})
    assert texts(limited).startswith("[rate_limit]") and "Retry after 30 s" in texts(limited)
    bad_size = await call(mcp, "create_image", {"prompt": "a cat", "size": "7x7"})
    assert (
        bad_size.is_error
        and fake_openai.requests_to("/v1/images")
        and len(fake_openai.requests_to("/v1/images")) == 1
    )


@pytest.mark.parametrize(
    ("failure", "category"),
    [
        ("401", "config"),
        ("403", "config"),
        ("404", "config"),
        ("timeout", "timeout"),
        ("malformed", "upstream_api"),
        ("500", "upstream_api"),
        ("disconnect", "upstream_api"),
    ],
)
async def test_image_generation_failures_are_categorized(
    monkeypatch, fake_openai, valor_env, failure, category
):
    use_openai(monkeypatch, fake_openai, VALOR_OPENAI_TIMEOUT_SECONDS="0.5")
    fake_openai.fail_next(failure, count=3)
    result = await call(mcp, "create_image", {"prompt": "a cat"})
    assert texts(result).startswith(f"[{category}]"), texts(result)
    generated = valor_env / "media" / "chats" / "operator" / "generated"
    assert not generated.exists() or not any(generated.iterdir())  # nothing half-written


async def test_a_refused_prompt_is_an_input_error_with_the_reason(monkeypatch, fake_openai):
    fake_openai.route(
        "POST",
        r"/v1/images/generations",
        lambda request: fake_openai.error(400, "Your request was rejected by the safety system."),
    )
    use_openai(monkeypatch, fake_openai)
    result = await call(mcp, "create_image", {"prompt": "something refused"})
    assert texts(result) == (
        "[input] OpenAI refused the request: Your request was rejected by the safety system."
    )


async def test_create_image_respects_the_fixed_chat(monkeypatch, fake_openai):
    use_openai(monkeypatch, fake_openai, VALOR_CHAT_ID=str(CHAT_A))
    other = await call(mcp, "create_image", {"prompt": "a cat", "chat_id": CHAT_B})
    assert other.is_error and "outside it" in texts(other)
    own = await call(mcp, "create_image", {"prompt": "a cat"})
    assert own.structured_content["chat_id"] == CHAT_A
    assert fake_openai.requests_to("/v1/images") and len(fake_openai.requests_to("/v1/images")) == 1


# -- analyze_shared_image ---------------------------------------------------------------------
async def test_a_question_and_a_description_get_different_prompts(
    monkeypatch, fake_openai, valor_env
):
    image = tiny_png()
    (media_dir(valor_env) / "photo.png").write_bytes(image)
    use_openai(monkeypatch, fake_openai, VALOR_OPENAI_VISION_MODEL="gpt-4o-vision-test")
    fake_openai.chat_reply = "The lighthouse is red."
    asked = await call(
        mcp, "analyze_shared_image", {"image_path": "photo.png", "question": "What colour is it?"}
    )
    described = await call(
        mcp, "analyze_shared_image", {"image_path": str(valor_env / "media" / "photo.png")}
    )
    assert asked.structured_content["mode"] == "question"
    assert asked.structured_content["analysis"] == "The lighthouse is red."
    assert described.structured_content["mode"] == "description"
    assert described.structured_content["image_path"] == "photo.png"
    first, second = fake_openai.chat_requests
    assert first["model"] == "gpt-4o-vision-test"
    assert first["messages"][0]["content"] == openai_services.QUESTION_PROMPT
    assert second["messages"][0]["content"] == openai_services.DESCRIBE_PROMPT
    text_part, image_part = first["messages"][1]["content"]
    assert text_part["text"] == "Question: What colour is it?"
    encoded = base64.b64encode(image).decode()
    assert image_part["image_url"]["url"] == f"data:image/png;base64,{encoded}"


async def test_the_type_comes_from_the_bytes_not_the_name(monkeypatch, fake_openai, valor_env):
    (media_dir(valor_env) / "really-a-gif.png").write_bytes(b"GIF89a" + b"\x01\x00\x01\x00" * 4)
    use_openai(monkeypatch, fake_openai)
    result = await call(mcp, "analyze_shared_image", {"image_path": "really-a-gif.png"})
    assert result.structured_content["mime_type"] == "image/gif"
    url = fake_openai.chat_requests[0]["messages"][1]["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/gif;base64,")


@pytest.fixture
def hostile_media(valor_env, tmp_path):
    """A media directory with traps, and a secret outside it."""
    media = media_dir(valor_env)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(tiny_png())
    (media / "escape.png").symlink_to(outside / "secret.png")
    (media / "escape-dir").symlink_to(outside, target_is_directory=True)
    (media / "notes.txt").write_text("hello")
    (media / "renamed.png").write_text("#!/bin/sh\necho this is a script, not an image\n")
    (media / "empty.png").write_bytes(b"")
    (media / "huge.png").write_bytes(tiny_png() + b"\x00" * 5000)
    (media / "folder.png").mkdir()
    return media, outside


@pytest.mark.parametrize(
    ("image_path", "category", "words"),
    [
        ("../outside/secret.png", "input", "may not contain '..'"),
        ("sub/../../outside/secret.png", "input", "may not contain '..'"),
        ("OUTSIDE_ABSOLUTE", "input", "outside the media folder"),
        ("/etc/passwd", "input", "outside the media folder"),
        ("escape.png", "input", "through a symlink"),
        ("escape-dir/secret.png", "input", "through a symlink"),
        ("notes.txt", "input", "not a supported image type"),
        ("renamed.png", "encoding", "its content is not JPEG, PNG, GIF or WebP"),
        ("empty.png", "encoding", "is empty"),
        ("huge.png", "file", "the limit is 4,096"),
        ("missing.png", "file", "No image at missing.png"),
        ("folder.png", "file", "not a regular file"),
    ],
)
async def test_bad_image_paths_and_files_are_refused_before_any_upload(
    monkeypatch, fake_openai, hostile_media, image_path, category, words
):
    _, outside = hostile_media
    use_openai(monkeypatch, fake_openai, VALOR_IMAGE_MAX_BYTES="4096")
    if image_path == "OUTSIDE_ABSOLUTE":
        image_path = str(outside / "secret.png")
    result = await call(mcp, "analyze_shared_image", {"image_path": image_path, "question": "?"})
    assert result.is_error
    assert texts(result).startswith(f"[{category}]"), texts(result)
    assert words in texts(result)
    assert fake_openai.requests == []  # nothing was sent anywhere
    assert str(outside) not in texts(result)


async def test_analysis_without_a_key_says_what_to_set(valor_env):
    (media_dir(valor_env) / "photo.png").write_bytes(tiny_png())
    result = await call(mcp, "analyze_shared_image", {"image_path": "photo.png"})
    assert texts(result) == "[config] OpenAI is not configured: set OPENAI_API_KEY."


@pytest.mark.parametrize(
    ("failure", "category"),
    [
        ("401", "config"),
        ("429", "rate_limit"),
        ("timeout", "timeout"),
        ("malformed", "upstream_api"),
        ("500", "upstream_api"),
    ],
)
async def test_vision_failures_are_categorized(
    monkeypatch, fake_openai, valor_env, failure, category
):
    (media_dir(valor_env) / "photo.png").write_bytes(tiny_png())
    use_openai(monkeypatch, fake_openai, VALOR_OPENAI_TIMEOUT_SECONDS="0.5")
    fake_openai.fail_next(failure, count=3)
    result = await call(mcp, "analyze_shared_image", {"image_path": "photo.png"})
    assert texts(result).startswith(f"[{category}]"), texts(result)


# -- save_link / search_links -----------------------------------------------------------------
@pytest.fixture
def reachable(pages):
    """The page server, reachable through the test-only loopback allowance."""
    port = int(pages.url.rsplit(":", 1)[1])
    with http_guard.allow_loopback_ports_for_tests(port):
        yield pages


async def test_save_link_extracts_summarizes_and_searches(reachable, store):
    url = reachable.html(
        "posts/tracing",
        article(
            "Tracing in practice",
            description="How one team found slow database calls with distributed tracing.",
        ),
    )
    saved = await call(mcp, "save_link", {"url": url + "#comments", "chat_id": CHAT_A})
    data = saved.structured_content
    assert data["url"] == url  # the fragment is not part of the saved link
    assert data["title"] == "Tracing in practice"
    assert data["summary"].startswith("How one team found slow database calls")
    assert data["summary_source"] == "extractive"
    assert {"observability", "tracing"} <= set(data["tags"])
    assert data["created"] is True
    assert "Cookie settings" not in data["summary"]

    found = await call(mcp, "search_links", {"query": "database", "chat_id": CHAT_A})
    hits = found.structured_content["hits"]
    assert [hit["url"] for hit in hits] == [url]
    assert "[database]" in hits[0]["snippet"]
    nothing = await call(mcp, "search_links", {"query": "kubernetes", "chat_id": CHAT_A})
    assert nothing.structured_content["hits"] == []


async def test_saving_the_same_url_again_updates_it(reachable, store):
    url = reachable.html("post", article("First title", description="The first version " * 4))
    first = await call(mcp, "save_link", {"url": url, "chat_id": CHAT_A})
    reachable.html("post", article("Second title", description="The revised version " * 4))
    second = await call(
        mcp, "save_link", {"url": url.replace("http://", "HTTP://"), "chat_id": CHAT_A}
    )
    assert first.structured_content["created"] is True
    assert second.structured_content["created"] is False
    assert second.structured_content["saved_at"] == first.structured_content["saved_at"]
    rows = store.query("SELECT title FROM links")
    assert [row["title"] for row in rows] == ["Second title"]
    found = await call(mcp, "search_links", {"query": "first", "chat_id": CHAT_A})
    assert found.structured_content["hits"] == []  # the index was updated too
    found = await call(mcp, "search_links", {"query": "revised", "chat_id": CHAT_A})
    assert len(found.structured_content["hits"]) == 1


async def test_a_configured_model_writes_the_summary(reachable, store, monkeypatch, fake_openai):
    use_openai(monkeypatch, fake_openai, VALOR_OPENAI_CHAT_MODEL="gpt-summary-test")
    fake_openai.chat_reply = json.dumps(
        {"summary": "A field report on tracing slow queries.", "tags": ["tracing", "sql, db"]}
    )
    url = reachable.html("post", article("Tracing"))
    result = await call(mcp, "save_link", {"url": url, "chat_id": CHAT_A})
    data = result.structured_content
    assert (data["summary"], data["summary_source"]) == (
        "A field report on tracing slow queries.",
        "model",
    )
    assert data["tags"] == ["tracing", "sql  db"]
    sent = fake_openai.chat_requests[0]
    assert sent["model"] == "gpt-summary-test"
    assert "Distributed tracing follows a single request" in sent["messages"][1]["content"]


@pytest.mark.parametrize("failure", ["500", "malformed", "429"])
async def test_a_failing_model_still_saves_the_link(
    reachable, store, monkeypatch, fake_openai, failure
):
    use_openai(monkeypatch, fake_openai)
    fake_openai.fail_next(failure, count=3)
    url = reachable.html(
        "post", article("Tracing", description="A page summary that is long enough to use.")
    )
    result = await call(mcp, "save_link", {"url": url})
    data = result.structured_content
    assert data["summary_source"] == "extractive"
    assert data["summary"] == "A page summary that is long enough to use."
    assert "Model summary failed" in data["note"]
    assert store.query("SELECT count(*) AS n FROM links")[0]["n"] == 1


async def test_unusable_pages_are_not_saved(reachable, store):
    empty = reachable.html("empty", "<html><head></head><body><script>app()</script></body></html>")
    result = await call(mcp, "save_link", {"url": empty})
    assert texts(result).startswith("[encoding]") and "no readable article text" in texts(result)
    reachable.pages["pdf"] = Reply(body=b"%PDF-1.7", headers={"Content-Type": "application/pdf"})
    pdf = await call(mcp, "save_link", {"url": f"{reachable.url}/pdf"})
    assert texts(pdf).startswith("[input]") and "application/pdf" in texts(pdf)
    missing = await call(mcp, "save_link", {"url": f"{reachable.url}/gone"})
    assert texts(missing).startswith("[input]") and "HTTP 404" in texts(missing)
    assert store.query("SELECT count(*) AS n FROM links")[0]["n"] == 0


async def test_site_failures_while_saving_are_categorized(reachable, store, monkeypatch):
    configure(monkeypatch, VALOR_LINK_FETCH_TIMEOUT_SECONDS="0.5")
    url = reachable.html("post", article("Slow"))
    reachable.fail_next("timeout", path="/post")
    slow = await call(mcp, "save_link", {"url": url})
    reachable.fail_next("429", path="/post", retry_after=60)
    limited = await call(mcp, "save_link", {"url": url})
    reachable.fail_next("503", path="/post")
    down = await call(mcp, "save_link", {"url": url})
    reachable.fail_next("disconnect", path="/post")
    dropped = await call(mcp, "save_link", {"url": url})
    reachable.pages["garbage"] = Reply(
        body=bytes(range(256)) * 20, headers={"Content-Type": "text/html; charset=utf-8"}
    )
    garbage = await call(mcp, "save_link", {"url": f"{reachable.url}/garbage"})
    assert texts(slow).startswith("[timeout]")
    assert texts(limited).startswith("[rate_limit]")
    assert texts(down).startswith("[upstream_api]") and "HTTP 503" in texts(down)
    assert texts(dropped).startswith("[upstream_api]")
    assert texts(garbage).startswith("[encoding]")
    assert store.query("SELECT count(*) AS n FROM links")[0]["n"] == 0
    saved = await call(mcp, "save_link", {"url": url})  # the site recovered: nothing was lost
    assert saved.structured_content["title"] == "Slow"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("file:///etc/passwd", "not file"),
        ("ftp://ftp.example.com/pub/file.txt", "not ftp"),
        ("LOOPBACK_PAGE_SERVER", "a loopback address"),
        ("http://127.0.0.1/", "a loopback address"),
        ("http://[::1]:8080/", "a loopback address"),
        ("http://10.1.2.3/admin", "a private-network address"),
        ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", "metadata"),
        ("http://[::ffff:a9fe:a9fe]/", "metadata"),
        ("not a url at all", "Only http and https"),
    ],
)
async def test_dangerous_links_are_refused_before_any_connection(
    pages, store, only_loopback_connections, url, words
):
    if url == "LOOPBACK_PAGE_SERVER":  # a real page on 127.0.0.1, but no allowance: refused
        url = pages.html("post", article("Internal"))
    result = await call(mcp, "save_link", {"url": url})
    assert result.is_error and texts(result).startswith("[input]"), texts(result)
    assert words in texts(result)
    assert only_loopback_connections.attempts == []
    assert pages.requests == []
    assert store.query("SELECT count(*) AS n FROM links")[0]["n"] == 0


async def test_a_public_looking_link_that_redirects_inside_is_refused(
    reachable, store, monkeypatch, only_loopback_connections
):
    """public.example resolves (stub) to the page server, which redirects to the metadata IP."""
    port = int(reachable.url.rsplit(":", 1)[1])
    monkeypatch.setattr(
        http_guard,
        "system_resolver",
        lambda host, p: {"public.example": ["127.0.0.1"]}[host],
    )
    reachable.redirect("innocent", "http://169.254.169.254/latest/meta-data/")
    result = await call(mcp, "save_link", {"url": f"http://public.example:{port}/innocent"})
    assert texts(result).startswith("[input]") and "metadata" in texts(result)
    assert len(reachable.requests) == 1
    assert {address[0] for address in only_loopback_connections.attempts} == {"127.0.0.1"}
    assert store.query("SELECT count(*) AS n FROM links")[0]["n"] == 0


async def test_links_are_scoped_to_the_chat(reachable, store, monkeypatch):
    url_a = reachable.html("a", article("Alpha tracing notes", description="Alpha " * 10))
    url_b = reachable.html("b", article("Beta tracing notes", description="Beta " * 10))
    await call(mcp, "save_link", {"url": url_a, "chat_id": CHAT_A})
    await call(mcp, "save_link", {"url": url_b, "chat_id": CHAT_B})
    everywhere = await call(mcp, "search_links", {"query": "tracing"})
    assert {hit["chat_id"] for hit in everywhere.structured_content["hits"]} == {CHAT_A, CHAT_B}

    configure(monkeypatch, VALOR_CHAT_ID=str(CHAT_A))
    own = await call(mcp, "search_links", {"query": "tracing"})
    assert [hit["url"] for hit in own.structured_content["hits"]] == [url_a]
    widened = await call(mcp, "search_links", {"query": "tracing", "chat_id": CHAT_B})
    assert widened.is_error and "outside it" in texts(widened)
    saved_elsewhere = await call(mcp, "save_link", {"url": url_b, "chat_id": CHAT_B})
    assert saved_elsewhere.is_error and "outside it" in texts(saved_elsewhere)


@pytest.mark.parametrize("query", ['"unclosed', "(tracing", "AND OR"])
async def test_malformed_link_searches_are_input_errors(store, query):
    result = await call(mcp, "search_links", {"query": query})
    assert texts(result).startswith("[input]")


# -- stdio, exactly as .mcp.json starts it --------------------------------------------------------
async def test_stdio_entry_saves_and_searches_links(pages, store, stdio_client_for, valor_env):
    """The subprocess allowance: the variable and the marker file in the data directory."""
    url = pages.html("post", article("Stdio tracing", description="Saved over stdio " * 3))
    port = url.split(":")[2].split("/")[0]
    valor_env.mkdir(parents=True, exist_ok=True)
    (valor_env / http_guard.LOOPBACK_TEST_MARKER).write_text(port)
    env = {http_guard.LOOPBACK_TEST_ENV: port}
    async with stdio_client_for("social-tools", env) as session:
        names = {tool.name for tool in (await session.list_tools()).tools}
        saved = await session.call_tool("save_link", {"url": url, "chat_id": CHAT_A})
        found = await session.call_tool("search_links", {"query": "stdio", "chat_id": CHAT_A})
        refused = await session.call_tool("save_link", {"url": "http://10.0.0.1/"})
    assert names == ALL_TOOLS
    assert saved.structured_content["title"] == "Stdio tracing"
    assert [hit["url"] for hit in found.structured_content["hits"]] == [url]
    assert refused.is_error


async def test_stdio_without_the_marker_refuses_loopback(pages, store, stdio_client_for):
    url = pages.html("post", article("No marker"))
    port = url.split(":")[2].split("/")[0]
    async with stdio_client_for("social-tools", {http_guard.LOOPBACK_TEST_ENV: port}) as session:
        refused = await session.call_tool("save_link", {"url": url})
    assert refused.is_error and "loopback" in refused.content[0].text
    assert pages.requests == []


async def test_hosted_http_fixes_the_chat_from_the_token(reachable, store):
    from fastmcp.client.transports import StreamableHttpTransport

    from servers.core.mcp_config import endpoint
    from servers.core.trust import mint_scope_token, new_secret
    from servers.hosting import hosted

    url_a = reachable.html("a", article("Alpha hosted", description="Alpha hosted page " * 3))
    url_b = reachable.html("b", article("Beta hosted", description="Beta hosted page " * 3))
    secret = new_secret()
    async with hosted(secret) as base_url:
        url = endpoint(base_url, "social-tools")
        for chat, page in ((CHAT_A, url_a), (CHAT_B, url_b)):
            headers = {"Authorization": f"Bearer {mint_scope_token(secret, chat)}"}
            async with Client(StreamableHttpTransport(url, headers=headers)) as client:
                saved = await client.call_tool("save_link", {"url": page})
                assert saved.structured_content["chat_id"] == chat
        headers = {"Authorization": f"Bearer {mint_scope_token(secret, CHAT_A)}"}
        async with Client(StreamableHttpTransport(url, headers=headers)) as client:
            own = await client.call_tool("search_links", {"query": "hosted"})
            other = await client.call_tool(
                "search_links", {"query": "hosted", "chat_id": CHAT_B}, raise_on_error=False
            )
    assert [hit["url"] for hit in own.structured_content["hits"]] == [url_a]
    assert other.is_error and "outside it" in texts(other)
