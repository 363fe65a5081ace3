"""Markdown → Telegram entities, and splitting measured after parsing (bridge/formatting.py)."""

from __future__ import annotations

from bridge.formatting import (
    TELEGRAM_TEXT_LIMIT,
    FormattedText,
    markdown_to_entities,
    preview,
    render,
    split_formatted,
    utf16_len,
)


def _types(formatted: FormattedText) -> set[str]:
    return {e.type for e in formatted.entities}


def test_markdown_becomes_plain_text_with_entities():
    out = markdown_to_entities("Hello **bold**, `code` and [a link](https://example.org)")
    assert "**" not in out and "`" not in out and "](" not in out
    assert _types(out) >= {"bold", "code", "text_link"}
    bold = next(e for e in out.entities if e.type == "bold")
    assert out[bold.offset : bold.offset + bold.length] == "bold"
    link = next(e for e in out.entities if e.type == "text_link")
    assert link.url == "https://example.org"


def test_code_block_keeps_its_language():
    out = markdown_to_entities("```python\nprint(1)\n```")
    pre = next(e for e in out.entities if e.type == "pre")
    assert pre.language == "python"
    assert out[pre.offset : pre.offset + pre.length].startswith("print(1)")


def test_entity_offsets_count_utf16_units_after_emoji():
    out = markdown_to_entities("😀 **x**")
    bold = next(e for e in out.entities if e.type == "bold")
    assert bold.offset == 3  # the emoji is two UTF-16 units, then a space


def test_short_answer_is_one_message():
    assert [p.plain() for p in render("just *one* line")] == ["just one line"]


def test_blank_answer_renders_nothing():
    assert render("   \n\n ") == []


def test_markup_does_not_count_towards_the_limit():
    # 4000 visible characters wrapped in bold markers: 4004 source characters, but one message.
    parts = render("**" + "a" * 4000 + "**")
    assert len(parts) == 1 and utf16_len(parts[0]) == 4000


def test_long_answer_splits_on_paragraphs_within_the_limit():
    paragraphs = [f"Paragraph {i}: " + "lorem ipsum " * 60 for i in range(20)]
    parts = render("\n\n".join(paragraphs))
    assert len(parts) > 1
    assert all(utf16_len(p) <= TELEGRAM_TEXT_LIMIT for p in parts)
    for part in parts:  # every part starts at a paragraph and ends with a whole one
        assert part.startswith("Paragraph ")
        assert part.rstrip().endswith("lorem ipsum")
    joined = " ".join(p.plain() for p in parts)
    assert all(f"Paragraph {i}:" in joined for i in range(20))


def test_split_prefers_a_boundary_outside_code():
    code = "```\n" + "line of code\n" * 100 + "```"
    prose = "words " * 500
    parts = render(prose + "\n\n" + code + "\n\n" + prose)
    assert all(utf16_len(p) <= TELEGRAM_TEXT_LIMIT for p in parts)
    code_part = next(p for p in parts if "line of code" in p)
    pre = next(e for e in code_part.entities if e.type == "pre")
    # The code block is whole in one part, not cut in two.
    assert code_part[pre.offset : pre.offset + pre.length].count("line of code") == 100


def test_huge_code_block_is_split_and_stays_code_in_every_part():
    parts = render("```python\n" + "value = compute(1)\n" * 600 + "```")
    assert len(parts) >= 3
    for part in parts:
        assert utf16_len(part) <= TELEGRAM_TEXT_LIMIT
        pre = [e for e in part.entities if e.type == "pre"]
        assert pre and pre[0].offset == 0 and pre[0].length == utf16_len(part)
        assert pre[0].language == "python"
        assert part.plain().endswith("value = compute(1)")  # cut at a line end


def test_split_with_astral_characters_respects_utf16_limit():
    text = FormattedText("😀" * 5000)  # 10000 UTF-16 units, no spaces or newlines at all
    parts = split_formatted(text, 4096)
    assert all(utf16_len(p) <= 4096 for p in parts)
    assert "".join(parts) == "😀" * 5000


def test_entities_are_clipped_at_the_cut():
    text = FormattedText("a" * 10 + " " + "b" * 10, [])
    from bridge.formatting import Entity

    text = FormattedText(text, [Entity("bold", 5, 16)])
    first, second = split_formatted(text, 12)
    assert first.plain() == "a" * 10 and first.entities[0].offset == 5
    assert first.entities[0].length == 5
    assert second.plain() == "b" * 10
    assert (second.entities[0].offset, second.entities[0].length) == (0, 10)


def test_preview_of_a_long_answer_shows_the_newest_text():
    formatted = preview("start " + "middle " * 1000 + "NEWEST")
    assert utf16_len(formatted) <= TELEGRAM_TEXT_LIMIT
    assert formatted.endswith("NEWEST") and formatted.startswith("…")


def test_formatted_text_is_a_plain_str_for_other_transports():
    out = markdown_to_entities("**hi**")
    assert isinstance(out, str) and out == "hi" and type(out.plain()) is str
