"""Claude's Markdown as Telegram text + entities, split to Telegram's message limit.

telegramify-markdown turns Markdown into plain text plus ``MessageEntity`` ranges (UTF-16 offsets,
as Telegram counts them). The 4096 limit applies to that parsed text, so splitting happens after
conversion: at paragraph breaks outside code first, then line breaks, then spaces, and only as a
last resort in the middle of a line. An entity crossing a cut is clipped into both parts, so a
long code block continues as a code block in the next message.

A rendered part is a ``FormattedText``: a ``str`` (any transport can send it as plain text) that
also carries its entities, which the Telegram transport sends and drops again if Telegram rejects
them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

# Imported up front on purpose: the first conversion would otherwise pay the import (~30 ms)
# between a rate-limit slot being granted and the call it was granted for.
import telegramify_markdown

TELEGRAM_TEXT_LIMIT = 4096
# A split point earlier than this share of the limit wastes too much of a message; a lower-ranked
# boundary that keeps the message fuller is preferred then.
_MIN_FILL = 0.5


@dataclass(frozen=True, slots=True)
class Entity:
    """One Telegram message entity; offset and length in UTF-16 code units."""

    type: str
    offset: int
    length: int
    url: str | None = None
    language: str | None = None
    custom_emoji_id: str | None = None


class FormattedText(str):
    """Plain text that carries Telegram entities. ``str(x)`` is the plain-text fallback."""

    entities: tuple[Entity, ...]

    def __new__(cls, text: str, entities: tuple[Entity, ...] | list[Entity] = ()):
        obj = super().__new__(cls, text)
        obj.entities = tuple(entities)
        return obj

    def plain(self) -> str:
        return str.__str__(self)


def utf16_len(text: str) -> int:
    if text.isascii():
        return len(text)
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _utf16_offsets(text: str) -> list[int]:
    """offsets[i] is the UTF-16 offset of text[i]; offsets[len(text)] the total length."""
    offsets = [0] * (len(text) + 1)
    total = 0
    for i, ch in enumerate(text):
        offsets[i] = total
        total += 2 if ord(ch) > 0xFFFF else 1
    offsets[len(text)] = total
    return offsets


def markdown_to_entities(markdown: str) -> FormattedText:
    """Convert Markdown; if the converter fails on odd input, the Markdown itself is the text."""
    try:
        text, raw_entities = telegramify_markdown.convert(markdown)
    except Exception:  # a converter bug must never cost the user their answer
        return FormattedText(markdown)
    entities = [
        Entity(
            type=e.type,
            offset=e.offset,
            length=e.length,
            url=e.url,
            language=e.language,
            custom_emoji_id=e.custom_emoji_id,
        )
        for e in raw_entities
        if e.length > 0
    ]
    return FormattedText(text, entities)


def render(markdown: str, limit: int = TELEGRAM_TEXT_LIMIT) -> list[FormattedText]:
    """Markdown to one or more Telegram-sized messages (empty list for blank input)."""
    return split_formatted(markdown_to_entities(markdown), limit)


def split_formatted(
    formatted: FormattedText, limit: int = TELEGRAM_TEXT_LIMIT
) -> list[FormattedText]:
    """Split parsed text into parts of at most ``limit`` UTF-16 units, at the best boundaries."""
    if limit < 2:
        raise ValueError("limit must be at least 2 UTF-16 units")
    text = formatted.plain()
    offsets = _utf16_offsets(text)
    entities = formatted.entities
    code_ranges = sorted(
        (e.offset, e.offset + e.length) for e in entities if e.type in ("pre", "code")
    )
    parts: list[FormattedText] = []
    start = _skip_whitespace(text, 0)
    while start < len(text):
        end = _choose_cut(text, offsets, start, limit, code_ranges)
        part = _slice(text, offsets, entities, start, end)
        if part.strip():
            parts.append(part)
        start = _skip_whitespace(text, end)
    return parts


def _skip_whitespace(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \n\t\r":
        index += 1
    return index


def _inside_code(utf16_pos: int, code_ranges: list[tuple[int, int]]) -> bool:
    # Few code ranges per message: a linear scan is clearer than an interval tree.
    return any(start < utf16_pos < end for start, end in code_ranges)


def _choose_cut(
    text: str,
    offsets: list[int],
    start: int,
    limit: int,
    code_ranges: list[tuple[int, int]],
) -> int:
    """Index where the part starting at ``start`` should end (exclusive)."""
    budget = offsets[start] + limit
    if offsets[len(text)] <= budget:
        return len(text)
    # Last character index whose end still fits in the budget.
    hard_end = bisect.bisect_right(offsets, budget) - 1
    hard_end = max(hard_end, start + 1)
    window = text[start:hard_end]
    min_end = start + max(1, int((hard_end - start) * _MIN_FILL))

    def last_cut(separator: str, *, avoid_code: bool) -> int | None:
        search_to = len(window)
        while True:
            found = window.rfind(separator, 0, search_to)
            if found < 0:
                return None
            cut = start + found + len(separator)
            if cut < min_end:
                return None
            if not avoid_code or not _inside_code(offsets[cut], code_ranges):
                return cut
            search_to = found

    for separator, avoid_code in (("\n\n", True), ("\n", True), ("\n", False), (" ", True)):
        cut = last_cut(separator, avoid_code=avoid_code)
        if cut is not None:
            return cut
    return hard_end


def _slice(
    text: str, offsets: list[int], entities: tuple[Entity, ...], start: int, end: int
) -> FormattedText:
    chunk = text[start:end].rstrip()
    end = start + len(chunk)
    lo, hi = offsets[start], offsets[end]
    clipped = []
    for e in entities:
        e_start, e_end = max(e.offset, lo), min(e.offset + e.length, hi)
        if e_end > e_start:
            clipped.append(
                Entity(e.type, e_start - lo, e_end - e_start, e.url, e.language, e.custom_emoji_id)
            )
    return FormattedText(chunk, clipped)


def preview(markdown: str, limit: int = TELEGRAM_TEXT_LIMIT) -> FormattedText:
    """A live preview that always fits one message: the newest text wins when it is long."""
    formatted = markdown_to_entities(markdown)
    if utf16_len(formatted) <= limit:
        return formatted
    text = formatted.plain()
    offsets = _utf16_offsets(text)
    marker = "…\n"
    keep_from = bisect.bisect_left(offsets, offsets[len(text)] - (limit - len(marker)))
    tail = _slice(text, offsets, formatted.entities, keep_from, len(text))
    shifted = tuple(
        Entity(e.type, e.offset + len(marker), e.length, e.url, e.language, e.custom_emoji_id)
        for e in tail.entities
    )
    return FormattedText(marker + tail.plain(), shifted)
