"""Summaries: the sentences of a message that carry facts, one line per unit left out.

A line reads ``#N MM-DD HH:MM speaker: sentences`` (times UTC): the sentences with names,
numbers, paths, links, decisions (and a user's questions), found with byte finds in the blocks
the analysis scanned. The lines form one message named ``SUMMARY_NAME``.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterable

from servers.core.context_markup import one_line
from servers.core.context_opt.conversation import (
    _CLASS_TABLE,
    _FACT_NEEDLES,
    CRITICAL,
    HIGH,
    _automaton,
    _Conversation,
)

SUMMARY_NAME = "context-summary"
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?…])\s+|\n+")
_MAX_LINE_CHARS = 400


_ENDS = (b". ", b"\n")  # in byte classes, where "!" and "?" are "." too


def _sentence_at(classes: bytes, position: int, low: int, high: int) -> tuple[int, int]:
    """Byte span of the sentence around ``position`` within [low, high)."""
    dot = classes.rfind(b". ", low, position)
    line = classes.rfind(b"\n", low, position)
    start = max(dot + 2 if dot != -1 else low, line + 1 if line != -1 else low)
    dot = classes.find(b". ", position, high)
    line = classes.find(b"\n", position, high)
    finish = min(dot + 1 if dot != -1 else high, line if line != -1 else high)
    return start, finish


def _fact_spans(
    raw: bytes,
    classes: bytes,
    low: int,
    high: int,
    *,
    marks: Iterable[int] = (),
    question: bool = False,
) -> list[tuple[int, int]]:
    """Spans of the sentences in raw[low:high] that carry a fact, found with byte finds."""
    spans: list[tuple[int, int]] = []
    for needle in _FACT_NEEDLES:
        position = classes.find(needle, low, high)
        while position != -1:
            for start, end in spans:  # in a sentence found already: the same span again
                if start <= position < end:
                    break
            else:
                start, end = _sentence_at(classes, position, low, high)
                spans.append((start, end))
            position = classes.find(needle, end, high)
    if question:
        position = raw.find(b"?", low, high)
        while position != -1:
            span = _sentence_at(classes, position, low, high)
            spans.append(span)
            position = raw.find(b"?", span[1], high)
    for position in marks:
        spans.append(_sentence_at(classes, position, low, high))
    if len(spans) <= 1:
        return spans
    ordered: list[tuple[int, int]] = []
    for start, end in sorted(spans):  # merge overlaps and repeats
        if ordered and (start < ordered[-1][1] or (start, end) == ordered[-1]):
            ordered[-1] = (ordered[-1][0], max(end, ordered[-1][1]))
        else:
            ordered.append((start, end))
    return ordered


def fact_sentences(text: str, *, question: bool = False) -> list[str]:
    """The sentences of ``text`` that carry a name, number, path, URL, decision (or question)."""
    raw = text.encode("utf-8", "surrogatepass")
    marks = [p for _, p, _ in _automaton(CRITICAL)[0].find_matches_as_indexes(raw.lower())]
    classes = raw.translate(_CLASS_TABLE)
    spans = _fact_spans(raw, classes, 0, len(raw), marks=marks, question=question)
    return _sentences(raw, spans)


def _sentences(raw: bytes, spans: list[tuple[int, int]]) -> list[str]:
    found = []
    for a, b in spans:
        sentence = " ".join(raw[a:b].decode("utf-8", "ignore").replace("\x00", " ").split())
        if sentence:
            found.append(sentence if len(sentence) <= _MAX_LINE_CHARS else _clip(sentence))
    return found


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_LINE_CHARS else text[: _MAX_LINE_CHARS - 1] + "…"


def _summary_line(conv: _Conversation, i: int) -> str | None:
    """One summary line for the unit starting at ``i``, or None when it carries nothing
    (built once per call: a plan that is dropped leaves its lines to the next)."""
    built = conv.lines_built
    if i in built:
        return built[i]
    line = built[i] = _build_summary_line(conv, i)
    return line


def _build_summary_line(conv: _Conversation, i: int) -> str | None:
    unit = conv.units.get(i)
    if unit is not None:  # a tool call and its results
        start, end = unit
        body = one_line(" → ".join(_clip(one_line(conv.texts[k])) for k in range(start, end)))
        text = _clip(body)
    else:
        start = i
        sentences = message_facts(conv, i)
        if not sentences:
            return None
        text = " ".join(sentences)
    return f"#{start}{conv.stamp(start)} {conv.speaker(start)}: {text}"


def message_facts(conv: _Conversation, i: int) -> list[str]:
    """The fact-carrying sentences of message ``i`` (for a CRITICAL or HIGH message without
    one, its first sentence), found in the block the analysis scanned. Chat memory stores
    these, so a summary line and a memory item say the same thing."""
    starts, firsts = conv.starts, conv._firsts
    block = bisect_right(firsts, i) - 1  # the scanned block holding the message
    raw, base = conv._raws[block], starts[firsts[block]]
    marks = conv.marks.get(i)
    spans = _fact_spans(
        raw,
        conv._classes[block],
        starts[i] + 1 - base,
        starts[i + 1] - base,
        marks=[position - base for position in marks] if marks else (),
        question=conv.roles[i] == "user",
    )
    sentences = _sentences(raw, spans)
    if not sentences and conv.prio[i] <= HIGH:
        first = _SENTENCE_SPLIT.split(conv.texts[i].strip(), maxsplit=1)[0]
        sentences = [_clip(one_line(first))] if first.strip() else []
    return sentences


_SUMMARY_HEADER = (
    "Earlier conversation, condensed (sentences with names, numbers, paths, links, decisions "
    "and questions; #N = message number; times UTC):"
)
_MODEL_HEADER = "Earlier conversation, summarized by a model:"


# Words that carry no fact: articles, discourse fillers, intensifiers, hedges. Prepositions and
# verbs stay (they carry the relation: "moved *to* Postgres"); entities always stay.
_FILLER = frozenset(
    (
        "a", "an", "the", "just", "really", "very", "quite", "pretty", "basically", "actually",
        "honestly", "literally", "like", "well", "so", "um", "uh", "oh", "hmm", "anyway",
        "anyways", "okay", "ok", "yeah", "yep", "lol", "haha", "maybe", "probably", "perhaps",
        "somehow", "kinda", "sorta", "also", "too", "now", "then", "again", "still", "already",
        "even", "simply", "totally",
    )
)  # fmt: skip
_FILLER_PHRASES = re.compile(
    r"\b(?:by the way|you know|i mean|i think|i guess|to be honest|as far as i know|"
    r"kind of|sort of|at the end of the day|for what it's worth)\b,?\s*",
    re.IGNORECASE,
)
_CLAUSE_SPLIT = re.compile(r"(?<=[,;:])\s+|\s+[—–-]\s+|(?<=[.!?…])\s+")
_ENTITY = re.compile(r"\d{2,}|[/\\@`#]|://|[A-Z][\w'-]*[A-Z0-9]|\w+\.\w+")
_CAPITALIZED = re.compile(r"(?<=\s)[A-Z][\w'-]+")


def condense(text: str, *, drop_filler: bool = True) -> str:
    """``text`` with its filler dropped and its entities kept: the clauses that carry a fact
    (a number, name, path, URL, handle, code, decision or question), each without filler words
    (``drop_filler``; without it the clauses stay verbatim). Used when a summary line or a
    memory item does not fit as it is."""
    clauses = [c for c in _CLAUSE_SPLIT.split(one_line(text)) if c]
    if not clauses:
        return ""
    marker = _automaton(CRITICAL)[0]
    kept = [
        c
        for c in clauses
        if _ENTITY.search(c)
        or _CAPITALIZED.search(" " + c[1:] if c else c)
        or "?" in c
        or any(True for _ in marker.find_matches_as_indexes(c.lower().encode()))
    ] or clauses[:1]
    if not drop_filler:
        return " ".join(kept)
    words = []
    for clause in kept:
        clause = _FILLER_PHRASES.sub("", clause)
        for word in clause.split():
            bare = word.strip(".,;:!?…\"'()").lower()
            if bare in _FILLER and word == word.lower():
                continue
            words.append(word)
    return " ".join(words).rstrip(",;:") or one_line(text)
