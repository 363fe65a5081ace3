"""The plain logic behind social-tools and notion-tools, tested without MCP."""

from __future__ import annotations

import pytest

from servers.core import http_guard, links, media, notion_projects, openai_services
from servers.core.errors import ValorError
from servers.core.notion_projects import ProjectRow
from tests.fakes.openai_api import tiny_png


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (tiny_png()[:16], "image/png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "image/jpeg"),
        (b"GIF87a\x01\x00\x01\x00", "image/gif"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", None),
        (b"%PDF-1.7", None),
        (b"<svg xmlns=", None),
        (b"", None),
    ],
)
def test_image_types_come_from_magic_bytes(head, expected):
    assert media.sniff_image_type(head) == expected


def test_confinement_follows_symlinks_in_the_middle_of_a_path(tmp_path):
    base = tmp_path / "media"
    (base / "inside").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (base / "inside" / "hop").symlink_to(outside)
    (base / "ok-link.png").symlink_to(base / "inside")  # a symlink that stays inside is fine
    _, relative = media.confine("inside/a.png", base)
    assert relative == "inside/a.png"
    with pytest.raises(ValorError, match="through a symlink"):
        media.confine("inside/hop/a.png", base)
    assert media.confine("ok-link.png", base)[1] == "inside"
    for bad in ("", "   ", "a\x00.png"):
        with pytest.raises(ValorError):
            media.confine(bad, base)


def test_saved_images_are_new_private_files(tmp_path):
    first, kind = media.save_image(tiny_png(), tmp_path)
    second, _ = media.save_image(tiny_png(), tmp_path)
    assert kind == "image/png" and first != second
    assert first.parent == tmp_path / "generated"
    assert (first.stat().st_mode & 0o777) == 0o600
    with pytest.raises(ValorError, match="not an image"):
        media.save_image(b"<html>", tmp_path)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("  HTTPS://Example.COM/Path?q=1#frag ", "https://example.com/Path?q=1"),
        ("http://example.com", "http://example.com"),
    ],
)
def test_urls_are_normalized(url, expected):
    assert links.normalize_url(url) == expected


@pytest.mark.parametrize("url", ["", "mailto:a@b.c", "data:text/html,hi", "x" * 3000])
def test_unsaveable_urls(url):
    with pytest.raises(ValorError) as caught:
        links.normalize_url(url)
    assert caught.value.category == "input"


def test_extractive_summary_prefers_a_description_then_sentences():
    described = links.Article(
        "T", "Body text.", description="A description of at least forty characters."
    )
    assert links.extractive_summary(described) == "A description of at least forty characters."
    sentences = " ".join(f"Sentence number {i} is here." for i in range(100))
    summary = links.extractive_summary(links.Article("T", "T\n" + sentences), limit=120)
    assert summary.startswith("Sentence number 0 is here.")
    assert summary.endswith(".") and len(summary) <= 120
    one_long_word = links.extractive_summary(links.Article("T", "x" * 1000), limit=50)
    assert len(one_long_word) <= 50


def test_keyword_tags_use_declared_tags_then_frequent_words():
    article = links.Article(
        "Tracing databases",
        "Tracing shows slow database queries. Tracing spans join. The database is slow.",
        tags=["Observability"],
    )
    tags = links.keyword_tags(article, count=4)
    assert tags[:2] == ["observability", "tracing"]  # declared first, then the most frequent
    assert set(tags[2:]) == {"slow", "database"}
    assert "the" not in tags and "shows" not in tags


def test_extraction_handles_pages_without_an_article():
    empty = links.extract_article("<html><head><title>Just a title</title></head></html>", "u")
    assert empty.title == "Just a title" and empty.text == ""


def test_citations_fall_back_to_search_results():
    extra = {"search_results": [{"url": "https://a.example", "title": "A"}, {"bad": 1}]}
    assert openai_services._citations(extra) == [
        {"number": 1, "url": "https://a.example", "title": "A"}
    ]
    assert openai_services._citations({}) == []


def test_question_terms_and_row_filtering():
    rows = [
        ProjectRow("Billing rewrite", "In progress", "High", "u1", ""),
        ProjectRow("Mobile app", "Done", "High", "u2", ""),
        ProjectRow("Billing alerts in progress", "In progress", "Low", "u3", ""),
    ]
    assert notion_projects.question_terms("Which projects are about billing?") == ["billing"]
    matched, filtered = notion_projects.filter_rows(rows, "billing in progress")
    assert filtered and [row.url for row in matched] == ["u1", "u3"]
    everything, filtered = notion_projects.filter_rows(rows, "what is there?")
    assert not filtered and everything == rows


def test_the_resolver_turns_bad_names_into_input_errors():
    with pytest.raises(ValorError) as caught:
        http_guard.system_resolver("a" * 300 + ".example", 80)
    assert caught.value.category == "input"
