"""Analysis: each message's priority, its facts and its tool unit, found with whole-text scans.

Priorities (explicit rules; the strongest that applies wins):

- CRITICAL: system messages; messages that name an error or failure, a decision, or ask to
  remember something (``remember``, ``important``, ``don't forget``, ``decided``, ``agreed``,
  ``traceback``, ``error``, ``failed`` … and Russian equivalents).
- HIGH: user questions and requests (``?``, ``please``, ``can you``, an imperative first word);
  tool call + result units, unless a later identical call superseded them.
- MEDIUM: other messages that carry a fact (a number of two or more digits, a path, a URL, an
  @handle, `code`, a capitalized name inside a sentence), and every message in the recent window.
- LOW: greetings and acknowledgements; superseded tool output; featureless chatter older than
  the recent window.

Tool calls and their results form one unit (kept or left out whole). The scans run over the
conversation's joined UTF-8 bytes (Aho-Corasick for the markers, byte classes for facts), so their
cost does not grow with the number of rules; token costs are counted on demand and remembered.
"""

from __future__ import annotations

import re
import time
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from functools import lru_cache
from itertools import accumulate, compress, pairwise, repeat
from operator import add, not_

from servers.core import tokens
from servers.core.context_markup import one_line
from servers.core.context_opt.messages import (
    MESSAGE_OVERHEAD_TOKENS,
    VALID_ROLES,
    ContextInputError,
    _answers,
    _calls,
    message_text,
)

CRITICAL, HIGH, MEDIUM, LOW = 0, 1, 2, 3
PRIORITY_NAMES = ("critical", "high", "medium", "low")
RECENT_WINDOW = 50  # featureless chat older than this many messages counts as old chatter
_SCAN_BLOCK_BYTES = 512 * 1024  # the classification scan works on blocks of about this size
_ENCODE_CHUNK = 32  # messages encoded together when a block's text is built

# Markers are matched in lowercased text; a leading "\x00" means "at the start of a message".
_CRITICAL_MARKERS = (
    "remember", "important", "don't forget", "do not forget", "dont forget", "decided",
    "decision", "we'll go with", "let's go with", "agreed", "traceback", "exception", "error",
    "failed", "failure", "fatal", "запомни", "важно", "не забудь", "решили", "решение",
    "ошибка", "ошибку", "сбой",
)  # fmt: skip
_REQUEST_MARKERS = (
    "please", "can you", "could you", "would you", "i need", "i want", "how do", "how to",
    "пожалуйста", "можешь", "сделай", "нужно",
    *(
        f"\x00{verb} "
        for verb in (
            "add", "build", "change", "check", "create", "delete", "deploy", "explain", "find",
            "fix", "give", "list", "make", "move", "open", "remove", "rename", "run", "send",
            "set", "show", "start", "stop", "summarize", "tell", "test", "update", "write",
        )
    ),
)  # fmt: skip


def _byte_class(b: int) -> int:
    if 65 <= b <= 90:
        return ord("A")
    if 97 <= b <= 122:
        return ord("a")
    if 48 <= b <= 57:
        return ord("0")
    if b in b"/\\@`#":  # paths, URLs, handles, code, issue numbers
        return ord("/")
    if b in b".!?":  # sentence ends
        return ord(".")
    return b


# Byte classes for the fact scan: letters to a/A, digits to 0, path-like marks to "/".
_CLASS_TABLE = bytes(_byte_class(b) for b in range(256))
# Facts in byte classes: a number of two or more digits, a capitalized word mid-sentence, a
# path-like mark. (A lone digit — "3 coffees" — is too common in chatter to count.)
_FACT_NEEDLES = (b"00", b"a Aa", b"/")

_ACK = re.compile(
    r"(?:hi|hey|hello|yo|ok|okay|k|kk|sure|thanks|thank you|thx|ty|cool|nice|great|got it|"
    r"lol|haha|yes|yeah|yep|no|nope|np|good morning|good night|bye|see you|sounds good|"
    r"понял|ок|спасибо|привет|да|нет|ага|хорошо)[\s!.,)🙂👍🙏😄😊:]*",
    re.IGNORECASE,
)


class _Conversation:
    """Messages with their texts, priorities and tool units, found with whole-text scans."""

    def __init__(self, messages: list[dict]):
        if not isinstance(messages, list):
            raise ContextInputError("messages must be a list of message objects.")
        self.messages = messages
        self.n = len(messages)
        try:  # map() over dict.get keeps these per-message passes in C
            contents = list(map(dict.get, messages, repeat("content")))
            self.roles = list(map(dict.get, messages, repeat("role")))
        except TypeError:
            raise ContextInputError("Every message must be an object with a role.") from None
        if not VALID_ROLES.issuperset(self.roles):
            bad = sorted({str(r) for r in self.roles} - VALID_ROLES)
            raise ContextInputError(
                f"Unknown message role(s) {', '.join(bad)}: use system, user, assistant or tool."
            )
        found: set[int] = set()  # messages whose text must be rendered (blocks, tool calls)
        if set(map(type, contents)) != {str}:
            found.update(i for i, c in enumerate(contents) if type(c) is not str)
        if any(map(dict.__contains__, messages, repeat("tool_calls"))):
            found.update(i for i, m in enumerate(messages) if "tool_calls" in m)
        found.update(_positions(self.roles, "tool"))  # results with text content: orphans?
        structured = sorted(found)
        for i in structured:
            contents[i] = message_text(messages[i])
        self._analyse(contents, structured)

    @classmethod
    def of_texts(cls, texts: list[str], roles: list[str]) -> _Conversation:
        """Plain texts with their roles, without message objects: chat memory classifies every
        message recorded, and building a dict for each cost a fifth of that. (Stamps, speakers
        and token costs read the message objects: they are not for this form.)"""
        conv = cls.__new__(cls)
        conv.messages = []
        conv.n = len(texts)
        conv.roles = roles
        conv._analyse(list(texts), [])
        return conv

    def _analyse(self, contents: list[str], structured: list[int]) -> None:
        n = self.n
        self.texts: list[str] = contents
        # UTF-8 sizes: len() for ASCII texts (str.isascii is O(1)), an encode for the others
        sizes = self.sizes = list(map(len, contents))
        if not all(map(str.isascii, contents)):
            for i in compress(range(n), map(not_, map(str.isascii, contents))):
                sizes[i] = len(contents[i].encode("utf-8", "surrogatepass"))
        self.total_bytes = sum(sizes)
        self.units: dict[int, tuple[int, int]] = {}  # message index -> tool unit [start, end)
        self.orphans: set[int] = set()  # tool results whose call is not in the input
        self.system_indices = _positions(self.roles, "system")
        self.prio = bytearray([MEDIUM]) * n
        self.has_fact = bytearray(n)
        self._find_tool_units(structured)
        self._classify()
        self._costs: dict[int, int] = {}  # exact cost of each message counted so far
        self._known_text = self._known_bytes = 0  # their text tokens and UTF-8 bytes
        self._name_costs: dict[str, int] = {}
        self._speakers: dict[str, str] = {}
        self._stamps: dict[int, str] = {}
        self.lines_built: dict[int, str | None] = {}  # summary lines, by unit start
        self.condensed_mean: float | None = None  # tokens of a condensed line, when sampled
        self.condensed: dict[tuple[int, str, bool], str] = {}  # condensed lines, once each

    def _find_tool_units(self, structured: list[int]) -> None:
        messages, stale_keys = self.messages, {}
        self.stale: set[int] = set()
        i_pos = 0
        while i_pos < len(structured):
            i = structured[i_pos]
            calls = _calls(messages[i])
            if not calls:
                if _answers(messages[i]) and i not in self.units:
                    self.orphans.add(i)
                i_pos += 1
                continue
            pending, end = set(calls), i + 1
            while end < self.n and pending:
                answered = _answers(messages[end])
                if not answered or not answered <= set(calls):
                    break
                pending -= answered
                end += 1
            for k in range(i, end):
                self.units[k] = (i, end)
            identity = tuple(sorted(calls.values()))
            if identity in stale_keys:
                self.stale.add(stale_keys[identity])
            stale_keys[identity] = i
            while i_pos < len(structured) and structured[i_pos] < end:
                i_pos += 1

    def _classify(self) -> None:
        n, texts, roles, prio, has_fact = self.n, self.texts, self.roles, self.prio, self.has_fact
        if n == 0:
            return
        critical, requests = self._scan()
        for i in self.system_indices:
            prio[i] = CRITICAL
        for i in requests:
            if roles[i] == "user":
                prio[i] = HIGH
        for start, end in set(self.units.values()):
            level = LOW if start in self.stale else HIGH
            for k in range(start, end):
                prio[k] = level
                has_fact[k] = 1
        for i in critical:
            prio[i] = CRITICAL
        for start, end in set(self.units.values()):  # a unit is as important as its best part
            best = min(prio[start:end])
            prio[start:end] = bytes([best]) * (end - start)
        window = max(0, n - RECENT_WINDOW)
        if window:  # old MEDIUM without a fact is chatter: LOW (priority * 4 + has_fact, in C)
            # bytewise arithmetic on one big integer: each byte is at most 3 * 4 + 1, no carry
            combined = (int.from_bytes(prio[:window]) << 2) + int.from_bytes(has_fact[:window])
            prio[:window] = combined.to_bytes(window).translate(_OLD_CHATTER)
        for i in range(window, n):
            text = texts[i]
            if prio[i] == MEDIUM and not has_fact[i] and len(text) <= 60 and _ACK.fullmatch(text):
                prio[i] = LOW

    def _scan(self) -> tuple[set[int], set[int]]:
        """One pass over all text: messages with critical markers, with requests, with facts.

        Works on UTF-8 bytes with a NUL before every message, so message boundaries are plain
        offsets (``starts``), in blocks of whole messages of about ``_SCAN_BLOCK_BYTES``: each
        block is encoded, lowercased, scanned twice, translated to byte classes and scanned
        again while it is still in the CPU cache, instead of streaming the whole text through
        memory once per step (measured about 1.5x faster at 30 MB). has_fact is 1 for a
        message carrying a fact. The blocks, their byte classes and the critical-marker
        positions are kept for extracting summary sentences later.
        """
        has_fact, n, texts = self.has_fact, self.n, self.texts
        starts = self.starts = list(accumulate(map(add, self.sizes, repeat(1)), initial=0))
        firsts = self._firsts = [0]  # first message of each block, then n
        while firsts[-1] < n:
            first = firsts[-1]
            firsts.append(bisect_left(starts, starts[first] + _SCAN_BLOCK_BYTES, first + 1, n))
        critical_automaton = _automaton(CRITICAL)[0]
        request_automaton, anchored = _automaton(HIGH)
        fact_automaton = _fact_automaton()
        critical: set[int] = set()
        requests: set[int] = set()
        marks: dict[int, list[int]] = {}  # message -> positions of critical markers
        self.marks = marks
        raws: list[bytes] = []
        classes_of: list[bytes] = []
        self._raws, self._classes = raws, classes_of
        for first, end in pairwise(firsts):
            base = starts[first]
            # encoded 32 messages at a time: one encode of a whole block would widen all of
            # it to 4 bytes a character for a single emoji, one per message costs an
            # allocation each (both measured slower)
            chunks = [b""]
            chunks.extend(
                "\x00".join(texts[k : min(k + _ENCODE_CHUNK, end)]).encode("utf-8", "surrogatepass")
                for k in range(first, end, _ENCODE_CHUNK)
            )
            raw = b"\x00".join(chunks)
            del chunks
            raws.append(raw)
            lowered = raw.lower()
            for _pattern, start, _end in critical_automaton.find_matches_as_indexes(lowered):
                start += base
                i = bisect_right(starts, start, first, end) - 1
                critical.add(i)
                marks.setdefault(i, []).append(start)
            for pattern, start, _end in request_automaton.find_matches_as_indexes(lowered):
                start += base
                i = bisect_right(starts, start, first, end) - 1
                if not anchored[pattern] or start == starts[i]:  # an inner NUL starts nothing
                    requests.add(i)
            del lowered
            classes = raw.translate(_CLASS_TABLE)
            classes_of.append(classes)
            fact_until = -1  # end of the last message marked: one hit per message is enough
            for _pattern, start, _end in fact_automaton.find_matches_as_indexes(classes):
                start += base
                if start >= fact_until:
                    i = bisect_right(starts, start, first, end) - 1
                    has_fact[i] = 1
                    fact_until = starts[i + 1]
            position = raw.find(b"?")
            while position != -1:
                i = bisect_right(starts, position + base, first, end) - 1
                requests.add(i)
                position = raw.find(b"?", starts[i + 1] - base)
        return critical, requests

    def block_of(self, i: int) -> tuple[bytes, bytes, int]:
        """The scanned block holding message ``i``: its bytes, their classes, its offset."""
        b = bisect_right(self._firsts, i) - 1
        return self._raws[b], self._classes[b], self.starts[self._firsts[b]]

    @property
    def raw(self) -> bytes:
        """All the scanned text as one byte string (NUL before every message)."""
        return b"".join(self._raws)

    def stamp(self, i: int) -> str:
        timestamp = self.messages[i].get("timestamp")
        if not isinstance(timestamp, (int, float)) or not 0 < timestamp < 1e11:
            return ""
        seconds = int(timestamp)  # positive: int() floors, as gmtime does
        day = self._stamps.get(seconds // 86400)
        if day is None:  # one strftime per day; hours and minutes by arithmetic
            day = self._stamps[seconds // 86400] = time.strftime("%m-%d", time.gmtime(timestamp))
        seconds %= 86400
        return f" {day} {seconds // 3600:02d}:{seconds % 3600 // 60:02d}"

    def span(self, i: int) -> tuple[int, int]:
        """Byte range of message ``i`` in the joined text."""
        return self.starts[i] + 1, self.starts[i + 1]

    def unit(self, i: int) -> tuple[int, int]:
        return self.units.get(i, (i, i + 1))

    def cost(self, i: int) -> int:
        """Exact tokens of message ``i`` as shown verbatim (counted once per call)."""
        value = self._costs.get(i)
        if value is None:
            text = tokens.count(self.texts[i])
            self._known_text += text
            self._known_bytes += self.sizes[i]
            value = text + self.name_cost(self.messages[i].get("name")) + MESSAGE_OVERHEAD_TOKENS
            self._costs[i] = value
        return value

    def costs(self, indices: Iterable[int]) -> list[int]:
        """``cost`` of many messages; the ones not counted yet are tokenized in one batch."""
        known = self._costs
        indices = list(indices)
        missing = [i for i in indices if i not in known]
        if missing:
            texts, messages, name_cost = self.texts, self.messages, self.name_cost
            counted = tokens.counts([texts[i] for i in missing])
            self._known_text += sum(counted)
            self._known_bytes += sum(map(self.sizes.__getitem__, missing))
            for i, text in zip(missing, counted, strict=True):
                name = messages[i].get("name")
                known[i] = text + (name_cost(name) if name else 0) + MESSAGE_OVERHEAD_TOKENS
        return list(map(known.__getitem__, indices))

    def name_cost(self, name: object) -> int:
        if not name:
            return 0
        name = str(name)
        value = self._name_costs.get(name)
        if value is None:
            value = self._name_costs[name] = tokens.count(name)
        return value

    def unit_cost(self, start: int, end: int) -> int:
        if end - start == 1:
            return self.cost(start)
        return sum(self.costs(range(start, end)))

    def speaker(self, i: int) -> str:
        name = self.messages[i].get("name")
        if not name:
            return self.roles[i]
        shown = self._speakers.get(name) if isinstance(name, str) else None
        if shown is None:
            shown = one_line(str(name))[:40]
            if isinstance(name, str):
                self._speakers[name] = shown
        return shown


def _positions(items: list, value: object) -> list[int]:
    """Indices of ``value`` in ``items``, found with list.index (C) rather than a loop."""
    found: list[int] = []
    index, i = items.index, -1
    try:
        while True:
            i = index(value, i + 1)
            found.append(i)
    except ValueError:
        return found


_OLD_CHATTER = bytes(
    (LOW if value == MEDIUM * 4 else value // 4) if value < 16 else 0 for value in range(256)
)


@lru_cache(maxsize=1)
def _fact_automaton():
    import ahocorasick_rs

    matchkind = ahocorasick_rs.MatchKind.LeftmostFirst
    return ahocorasick_rs.BytesAhoCorasick(list(_FACT_NEEDLES), matchkind=matchkind)


def _variants(word: str) -> set[str]:
    """Matching runs on ASCII-lowercased bytes, so other scripts need their cases listed."""
    return {word} if word.isascii() else {word, word.capitalize(), word.upper()}


# Leftmost-first matching lets the aho-corasick crate use its SIMD prefilter (Teddy, for up to
# 64 patterns); standard matching cannot, and was measured about 6x slower on chat text. Which
# messages contain a marker is the same either way: a marker cannot span two messages.
@lru_cache(maxsize=2)
def _automaton(kind: int):
    """Critical markers or request markers, each under the prefilter's 64-pattern limit.

    For requests, ``anchored[k]`` says pattern k only counts at the start of a message."""
    import ahocorasick_rs

    words = _CRITICAL_MARKERS if kind == CRITICAL else _REQUEST_MARKERS
    patterns = [variant.encode() for word in words for variant in sorted(_variants(word))]
    anchored = [pattern.startswith(b"\x00") for pattern in patterns]
    matchkind = ahocorasick_rs.MatchKind.LeftmostFirst
    return ahocorasick_rs.BytesAhoCorasick(patterns, matchkind=matchkind), anchored
