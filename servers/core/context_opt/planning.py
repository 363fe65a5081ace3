"""Planning: fit a conversation to a token budget, spending it on what matters most.

How the budget is spent:

1. Always: system messages and the latest turn (the last user message and all after it). When
   they alone exceed the budget the longest are cut in the middle (head and tail kept, marked).
2. A summary line for every CRITICAL message not shown (condensed, then cut to equal shares
   when they do not all fit; refused with ``ContextBudgetError`` below 12 tokens each — never
   dropped).
3. Up to ``recent_turns`` earlier turns, verbatim, within half the budget and leaving the room
   the facts' condensed lines are expected to need.
4. Summary lines for HIGH, then MEDIUM messages with facts, newest first: the sentences that
   carry names, numbers, paths, URLs, decisions (and a user's questions). When they do not all
   fit, facts are condensed before any is dropped: in rank order each line (CRITICAL ones too)
   takes the longest of its forms — whole, its fact clauses, those clauses without filler words
   (``summaries.condense``) — that leaves room for the rest condensed.
5. Whole units upgraded to verbatim (CRITICAL, HIGH, MEDIUM; newest first) while they fit.
6. Then the newest remaining units (small talk too), verbatim, while they fit.
7. With what is left, one line per batch of 20+ messages neither shown nor summarized.

Shortcut for roomy budgets: when every unit steps 2-5 could show verbatim (CRITICAL, HIGH, MEDIUM
with a fact or in the recent window) fits after step 1 and the recent turns, by exact count, they
are all shown at once and steps 2-5 build no lines they would only replace (not with a
summarizer, nor when an orphaned tool result would need a line). Shortcut for tighter budgets:
when every CRITICAL and HIGH unit fits verbatim (exact count) together with a line for every
MEDIUM unit with a fact, that state is taken at once and step 5 goes on from it with the MEDIUM
units; step 5 would have replaced every CRITICAL and HIGH line anyway.

The lines form one summary message (name ``context-summary``) after the
leading system messages, as role ``user`` (it quotes chat text, which must not gain a system
prompt's weight); a summarizer (a model) may rewrite the lines within the same room.
Tool calls and their results form one unit that is kept or left out whole; messages keep their
order. Token counts: ``count_messages`` = for each message, tokens of its text + tokens of its
name + ``MESSAGE_OVERHEAD_TOKENS``. Only what is kept or summarized is tokenized; the output's
count is exact. ``tokens_before`` is exact for small inputs and otherwise estimated from exactly
counted messages plus a bytes-to-tokens ratio sampled from the rest (see ``_tokens_before``).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from itertools import pairwise, repeat

from servers.core import tokens
from servers.core.context_opt.conversation import (
    CRITICAL,
    HIGH,
    LOW,
    MEDIUM,
    PRIORITY_NAMES,
    RECENT_WINDOW,
    _Conversation,
)
from servers.core.context_opt.messages import (
    MESSAGE_OVERHEAD_TOKENS,
    ContextBudgetError,
    ContextInputError,
    message_text,
)
from servers.core.context_opt.summaries import (
    _MODEL_HEADER,
    _SUMMARY_HEADER,
    SUMMARY_NAME,
    _summary_line,
    condense,
)

SMALL_TALK_BATCH = 20  # small-talk runs at least this long get their own summary line
EXACT_BEFORE_BYTES = 64_000  # inputs up to this size have tokens_before counted exactly
SAMPLE_SIZE = 48
SAMPLE_BYTES = 4_000  # a sample stops at this many bytes, once it has SAMPLE_MIN messages
SAMPLE_MIN = 16
CALIBRATION_LINES = 16  # summary lines counted exactly before the rest are estimated
LINE_ESTIMATE_MARGIN = 1.06
MODEL_MARGIN_TOKENS = 8
_SHORT_LINE_TOKENS = 16  # a summary line is rarely shorter ("#12 05-12 10:02 alice: …")
_LONG_CONDENSED_TOKENS = 48  # a condensed line is rarely longer


@dataclass
class Optimized:
    messages: list[dict]
    tokens_before: int
    tokens_before_exact: bool
    tokens_after: int
    max_tokens: int
    kept: int  # shown verbatim (including cut ones)
    summarized: int  # represented by sentences in the summary
    dropped: int  # only counted in a small-talk line, or left out
    truncated: int  # shown verbatim but cut in the middle
    priority_counts: dict[str, int]
    elapsed_ms: float
    summary_method: str  # "none", "extractive" or "model"
    tokenizer: str = tokens.TOKENIZER_DESCRIPTION
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


Summarizer = Callable[[str, int], str]
"""Given the extractive summary and a token budget, return a model-written summary."""


def count_messages(messages: Iterable[dict]) -> int:
    """Exact tokens of a message list, as the budget counts them."""
    total = 0
    for message in messages:
        name = message.get("name")
        total += tokens.count(message_text(message)) + (tokens.count(str(name)) if name else 0)
        total += MESSAGE_OVERHEAD_TOKENS
    return total


def optimize_context(
    messages: list[dict],
    max_tokens: int,
    *,
    recent_turns: int = 3,
    summarizer: Summarizer | None = None,
    exact_tokens_before: bool = False,
) -> Optimized:
    """Fit ``messages`` (oldest first) into ``max_tokens``; see the module text for the rules."""
    started = time.perf_counter()
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ContextInputError("max_tokens must be a positive whole number of tokens.")
    # Large inputs allocate many small objects; the cyclic GC would rescan the caller's whole
    # message list each time (about a fifth of the run at 100,000 messages). Nothing here makes
    # reference cycles, so it waits until the end.
    pause = isinstance(messages, list) and len(messages) > 20_000 and gc.isenabled()
    if pause:
        gc.disable()
    try:
        return _optimize(
            messages, max_tokens, recent_turns, summarizer, exact_tokens_before, started
        )
    finally:
        if pause:
            gc.enable()


def _optimize(
    messages: list[dict],
    max_tokens: int,
    recent_turns: int,
    summarizer: Summarizer | None,
    exact_tokens_before: bool,
    started: float,
) -> Optimized:
    conv = _Conversation(messages)
    n = conv.n
    counts = {name: conv.prio.count(level) for level, name in enumerate(PRIORITY_NAMES)}
    if n == 0:
        return Optimized([], 0, True, 0, max_tokens, 0, 0, 0, 0, counts, _ms(started), "none")
    if conv.total_bytes <= 12 * max_tokens:  # it may all fit: count it, newest first, and see
        total, end = 0, n
        while end > 0 and total <= max_tokens:  # stop counting once it is over
            start = max(0, end - 256)
            total += sum(conv.costs(range(start, end)))
            end = start
        if total <= max_tokens:
            elapsed = _ms(started)
            return Optimized(
                list(messages),
                total,
                True,
                total,
                max_tokens,
                n,
                0,
                0,
                0,
                counts,
                elapsed,
                "none",
                tokenizer=tokens.backend(),
            )
    plan = None
    warnings: list[str] = []
    if summarizer is None:  # roomy budgets: when all that matters fits verbatim, show it all
        fast = _Plan(conv, max_tokens)
        fast.keep_mandatory()
        fast.keep_recent_turns(recent_turns)
        if fast.take_all_that_matters():  # steps 2-5 would find nothing left to do
            plan = fast
        elif fast.take_critical_and_high():  # step 5 would replace every line but MEDIUM's
            plan = fast
            plan.upgrade_to_verbatim()
    if plan is None:  # the usual path: critical lines first, then recent turns, then the others
        plan = _Plan(conv, max_tokens)
        plan.keep_mandatory()
        plan.add_critical_lines()
        plan.keep_recent_turns(recent_turns)
        plan.add_summary_lines()
        if summarizer is not None and plan.lines:
            warnings = plan.use_model_summary(summarizer)
        plan.upgrade_to_verbatim()
    plan.fill_with_recent()
    if plan.model_text is None:
        plan.add_small_talk_batches()
    output, summary_cost = plan.finish()
    tokens_after = sum(plan.costs_of_output()) + summary_cost
    before, exact = _tokens_before(conv, exact_tokens_before)
    shown = len(plan.verbatim)
    summarized = len(plan.summarized_messages())
    return Optimized(
        messages=output,
        tokens_before=before,
        tokens_before_exact=exact,
        tokens_after=tokens_after,
        max_tokens=max_tokens,
        kept=shown,
        summarized=summarized,
        dropped=n - shown - summarized,
        truncated=len(plan.cut),
        priority_counts=counts,
        elapsed_ms=_ms(started),
        summary_method="model"
        if plan.model_text is not None
        else "extractive"
        if plan.lines or plan.batches
        else "none",
        tokenizer=tokens.backend(),
        warnings=warnings,
    )


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


class _Plan:
    """The choice of what is shown verbatim, what is summarized, and the tokens it costs."""

    def __init__(self, conv: _Conversation, budget: int):
        self.conv, self.budget = conv, budget
        self.verbatim: set[int] = set()
        self.cut: dict[int, str] = {}  # message index -> cut text
        # unit start -> (line, tokens, priority of the unit)
        self.lines: dict[int, tuple[str, int, int]] = {}
        self.model_text: str | None = None
        self.model_covers: set[int] = set()
        self.batches: dict[int, tuple[str, int]] = {}  # run start -> (line, tokens)
        self._calibrated = self._sample_tokens = self._sample_bytes = 0
        self.model_cost = 0
        self.used = 0
        self.summary_base = tokens.count(_SUMMARY_HEADER) + conv.name_cost(SUMMARY_NAME) + 1
        self.summary_base += MESSAGE_OVERHEAD_TOKENS

    def line_cost(self, line: str) -> int:
        """Tokens a summary line adds. The first lines are counted exactly; later ones are
        estimated from their bytes at the ratio measured so far, plus a margin. The summary as
        a whole is counted exactly in ``finish``, which gives lines back if it is over."""
        size = (len(line) if line.isascii() else len(line.encode("utf-8", "surrogatepass"))) + 1
        self._calibrated += 1
        if self._calibrated <= CALIBRATION_LINES or self._calibrated % 16 == 0:
            cost = tokens.count(line) + 1
            self._sample_tokens += cost
            self._sample_bytes += size
            return cost
        return int(size * self._sample_tokens / self._sample_bytes * LINE_ESTIMATE_MARGIN) + 1

    @property
    def free(self) -> int:
        summary = self.summary_base if (self.lines or self.batches or self.model_text) else 0
        return self.budget - self.used - summary

    def _take(self, start: int, end: int) -> None:
        if start in self.lines:  # shown verbatim now: its summary line goes
            self.used -= self.lines.pop(start)[1]
        for k in range(start, end):
            if k not in self.verbatim:
                self.verbatim.add(k)
                self.used += self.conv.cost(k)

    def keep_mandatory(self) -> None:
        conv = self.conv
        last_turn = _turn_start(conv, conv.n)
        must = [*conv.system_indices, *range(last_turn, conv.n)]
        for i in must:
            self._take(*conv.unit(i))
        if self.used > self.budget:
            self._cut_to_fit()

    def _cut_to_fit(self) -> None:
        """The mandatory part alone is too big: cut its longest plain-text messages."""
        conv = self.conv
        cuttable = sorted(
            (i for i in self.verbatim if type(conv.messages[i].get("content")) is str),
            key=conv.cost,
            reverse=True,
        )
        for i in cuttable:
            overflow = self.used - self.budget
            if overflow <= 0:
                break
            fixed = conv.cost(i) - tokens.count(conv.texts[i])
            allowed = conv.cost(i) - fixed - overflow
            if allowed < 16:
                allowed = 16
            text = tokens.truncate_middle(conv.texts[i], allowed)
            new_cost = tokens.count(text) + fixed
            if new_cost < conv.cost(i):
                self.cut[i] = text
                self.used -= conv.cost(i) - new_cost
        if self.used > self.budget:
            raise ContextBudgetError(
                f"max_tokens={self.budget} cannot hold the system messages and the latest turn, "
                f"even cut: they need at least {self.used} tokens. Raise max_tokens."
            )

    def keep_recent_turns(self, turns: int) -> None:
        """Up to ``turns`` - 1 earlier turns verbatim, within half the budget, and leaving the
        room the facts' condensed lines are expected to need (``_fact_reserve``)."""
        conv, end = self.conv, _turn_start(self.conv, self.conv.n)
        limit = min(self.budget // 2, self.used + self.free - self._fact_reserve())
        for _ in range(max(0, turns - 1)):
            if end <= 0:
                return
            start = _turn_start(conv, end)
            cost = sum(conv.cost(k) for k in range(start, end) if k not in self.verbatim)
            if self.used + cost > limit:
                return
            self._take(start, end)
            end = start

    def _candidates(self, levels: tuple[int, ...]) -> Iterable[int]:
        """Unit starts that deserve a summary line, in the order lines are given room:
        CRITICAL, HIGH, then MEDIUM with a fact."""
        conv, prio = self.conv, self.conv.prio
        for level in (CRITICAL, HIGH, MEDIUM):
            if level not in levels:
                continue
            i = prio.rfind(level)
            while i != -1:
                start = conv.unit(i)[0]
                if start not in self.verbatim and (level < MEDIUM or conv.has_fact[start]):
                    yield start
                i = prio.rfind(level, 0, start)

    def take_all_that_matters(self) -> bool:
        """Fast path for roomy budgets: when every unit that steps 2-5 could show verbatim
        (CRITICAL, HIGH, MEDIUM with a fact or in the recent window) fits, show them all and
        skip building summary lines that step 5 would only replace. Decided on an exact
        count; a cheap byte estimate first rules out hopeless cases."""
        conv, verbatim, prio, orphans = self.conv, self.verbatim, self.conv.prio, self.conv.orphans
        recent, has_fact = conv.n - RECENT_WINDOW, conv.has_fact
        ratio = conv._known_text / conv._known_bytes if conv._known_bytes >= 1000 else 0.25
        # a cheap byte estimate rules out hopeless cases as soon as the units found exceed it
        hopeless, sizes, units_of = self.free / (min(ratio, 0.25) * 0.8), conv.sizes, conv.units
        indices: list[int] = []
        size = 0
        for level in (CRITICAL, HIGH, MEDIUM):
            i = prio.rfind(level)
            while i != -1:
                start, end = units_of.get(i, (i, i + 1))
                if level < MEDIUM or has_fact[start] or start >= recent:
                    if start in orphans:  # it can only have a line: leave it to the usual path
                        return False
                    for k in range(start, end):
                        if k not in verbatim:
                            indices.append(k)
                            size += sizes[k]
                    if size > hopeless:
                        return False  # clearly too big: not worth counting
                i = prio.rfind(level, 0, start)
        total = sum(conv.costs(indices))
        if total > self.free:
            return False
        self.verbatim.update(indices)  # whole units; no lines exist yet to give back
        self.used += total
        return True

    def take_critical_and_high(self) -> bool:
        """Second shortcut, for tighter budgets: when every CRITICAL and HIGH unit fits
        verbatim (exact count) together with a line for every MEDIUM unit with a fact, take
        that state at once. Step 5 would have replaced each of their lines by the unit itself,
        so their lines are not built only to be replaced. False (and this plan is dropped)
        when anything does not fit, or a CRITICAL or HIGH unit could only have a line."""
        conv, prio, verbatim, orphans = self.conv, self.conv.prio, self.verbatim, self.conv.orphans
        units_of, sizes, n = conv.units, conv.sizes, conv.n
        # Expected to fail (only a matter of speed: the usual path is always right) when the
        # units' bytes at the tokens-per-byte ratio counted so far, plus a short line for each
        # MEDIUM message with a fact (counted in C: priority * 4 + has_fact), exceed the room.
        ratio = conv._known_text / conv._known_bytes if conv._known_bytes >= 1000 else 0.25
        with_fact = (int.from_bytes(prio) << 2) + int.from_bytes(conv.has_fact)
        medium_facts = with_fact.to_bytes(n).count(MEDIUM * 4 + 1)
        room = self.free - self.summary_base - medium_facts * _SHORT_LINE_TOKENS
        hopeless = room / ratio if ratio > 0 else 0
        indices: list[int] = []
        size = 0
        for level in (CRITICAL, HIGH):
            i = prio.rfind(level)
            while i != -1:
                start, end = units_of.get(i, (i, i + 1))
                if start not in verbatim:
                    if start in orphans:  # it can only have a line: leave it to the usual path
                        return False
                    for k in range(start, end):
                        if k not in verbatim:
                            indices.append(k)
                            size += sizes[k]
                    if size > hopeless:
                        return False  # clearly too big: not worth counting
                i = prio.rfind(level, 0, start)
        total = sum(conv.costs(indices))
        if total > self.free - self.summary_base:
            return False
        self.verbatim.update(indices)
        self.used += total
        for i in self._candidates(levels=(MEDIUM,)):
            line = _summary_line(conv, i)
            if line is None:
                continue
            cost = self.line_cost(line)
            if cost > self.free - (0 if self.lines else self.summary_base):
                return False
            self.lines[i] = (line, cost, MEDIUM)
            self.used += cost
        return True

    def add_critical_lines(self) -> None:
        """A line for every CRITICAL message not shown; when they cannot all fit, each is cut
        to an equal share (never below 12 tokens); below that the budget is refused."""
        conv = self.conv
        found = []
        for i in self._candidates(levels=(CRITICAL,)):
            line = _summary_line(conv, i) or f"#{i} {conv.speaker(i)}: (critical)"
            found.append((i, line, self.line_cost(line)))
        if not found:
            return
        room = self.free - (0 if self.lines else self.summary_base)
        if sum(cost for _, _, cost in found) > room:  # condensed before anything is cut
            found = [(i, short, self.line_cost(short)) for i, line, _ in found
                     for short in [self._condensed(i, line)]]  # fmt: skip
        if sum(cost for _, _, cost in found) > room:
            share = room // len(found) - 1
            if share < 12:
                raise ContextBudgetError(
                    f"max_tokens={self.budget} cannot hold the conversation's "
                    f"{len(found)} critical messages even condensed to one short line each. "
                    "Raise max_tokens."
                )
            found = [
                (i, short, tokens.count(short) + 1)
                for i, line, _ in found
                for short in [tokens.truncate_middle(line, share, marker="[…]")]
            ]
        for i, line, cost in found:
            self.lines[i] = (line, cost, CRITICAL)
            self.used += cost

    def add_summary_lines(self) -> None:
        """Lines for HIGH, then MEDIUM messages with facts, newest first. When they do not all
        fit as they are, facts are condensed before any is dropped (``_fit_condensed``)."""
        conv = self.conv
        room = self.free - (0 if self.lines else self.summary_base)
        candidates: list[tuple[int, str, int]] = []
        full_total = 0
        for i in self._candidates(levels=(HIGH, MEDIUM)):
            line = _summary_line(conv, i)
            if line is None:
                continue
            cost = self.line_cost(line)
            candidates.append((i, line, cost))
            full_total += cost
            if full_total > room:  # not all fit as they are
                break
        if full_total <= room:
            for i, line, cost in candidates:
                self.lines[i] = (line, cost, conv.prio[i])
                self.used += cost
            return
        self._fit_condensed(candidates)

    def _fit_condensed(self, candidates: list[tuple[int, str, int]]) -> None:
        """The lines do not all fit as they are. In rank order (CRITICAL, HIGH, MEDIUM; newest
        first) each line takes the longest of its forms — whole, its fact clauses verbatim,
        those clauses without filler words (``condense``) — that leaves room for every line
        after it condensed (estimated from a sample), so facts are condensed before any is
        dropped, and the most important keep the most words. CRITICAL lines are never dropped:
        at worst they keep the form ``add_critical_lines`` gave them, which fitted alone."""
        conv = self.conv
        entries: list[tuple[int, str, int, int, str | None]] = []  # i, full, cost, level, kept
        for i, (line, cost, level) in sorted(self.lines.items(), key=lambda e: -e[0]):
            full = conv.lines_built.get(i) or line
            entries.append((i, full, cost if full == line else self.line_cost(full), level, line))
            self.used -= cost
        self.lines.clear()
        room = self.free - self.summary_base
        ratio = self._condensed_ratio(entries, candidates)
        estimate = sum(cost for *_, cost in candidates) * ratio
        misses = 0
        rest = self._candidates(levels=(HIGH, MEDIUM))
        seen = {i for i, _, _ in candidates}
        pending = list(candidates)
        for i in rest:  # past the first lines that overflowed: more, while they may fit condensed
            if i in seen:
                continue
            if estimate > room * 1.25 or misses >= 32:
                break
            line = _summary_line(conv, i)
            if line is None:
                misses += 1
                continue
            cost = self.line_cost(line)
            pending.append((i, line, cost))
            estimate += cost * ratio
        entries.extend((i, line, cost, conv.prio[i], None) for i, line, cost in pending)
        estimates = [cost * ratio for _, _, cost, _, _ in entries]
        reserve = sum(estimates)
        used = 0
        for (i, full, full_cost, level, kept), guess in zip(entries, estimates, strict=True):
            reserve -= guess
            chosen = None
            limit = room - max(reserve, 0) - used
            if full_cost <= limit:
                chosen = (full, full_cost)
            else:  # the shortest form first: when even it leaves no room, the clauses cannot
                line = self._condensed(i, full)
                cost = tokens.count(line) + 1
                if cost <= limit:
                    chosen = (line, cost)
                    clauses = self._condensed(i, full, drop_filler=False)
                    if clauses != line:
                        clauses_cost = tokens.count(clauses) + 1
                        if clauses_cost <= limit:
                            chosen = (clauses, clauses_cost)
                elif used + cost <= room:  # condensed, though the later ones may not fit
                    chosen = (line, cost)
            if chosen is None and kept is not None:  # a CRITICAL line stays, as it was given
                chosen = (kept, tokens.count(kept) + 1)
            if chosen is not None:
                self.lines[i] = (chosen[0], chosen[1], level)
                used += chosen[1]
        self.used += used

    def _condensed_ratio(self, *groups: list) -> float:
        """Tokens of a condensed line per token of the whole line, from up to 8 lines."""
        sample = [entry for group in groups for entry in group][:8]
        short = sum(tokens.count(self._condensed(i, line)) + 1 for i, line, *_ in sample)
        whole = sum(cost for _i, _line, cost, *_ in sample)
        return min(1.0, short / whole) if whole else 1.0

    def _condensed(self, i: int, line: str, drop_filler: bool = True) -> str:
        """The summary line of unit ``i`` condensed: no time stamp, the text ``condense``d."""
        conv = self.conv
        known = conv.condensed.get((i, line, drop_filler))
        if known is None:  # once per conversation: both plans may ask
            prefix = f"#{i}{conv.stamp(i)} {conv.speaker(i)}: "
            text = line[len(prefix) :] if line.startswith(prefix) else line
            known = f"#{i} {conv.speaker(i)}: {condense(text, drop_filler=drop_filler)}"
            conv.condensed[i, line, drop_filler] = known
        return known

    def _fact_reserve(self) -> int:
        """Tokens the condensed lines of the HIGH and MEDIUM units with a fact are expected to
        need: their number times the mean cost of up to 8 of the newest, condensed."""
        conv, prio, n = self.conv, self.conv.prio, self.conv.n
        with_fact = (int.from_bytes(prio) << 2) + int.from_bytes(conv.has_fact)
        count = prio.count(HIGH) + with_fact.to_bytes(n).count(MEDIUM * 4 + 1)
        if count == 0 or count * _LONG_CONDENSED_TOKENS <= self.free - self.budget // 2:
            return 0  # half the budget is left for them anyway: no need to look closer
        mean = conv.condensed_mean
        if mean is None:  # the same for every plan of this conversation: found once
            sample = []
            for i in self._candidates(levels=(HIGH, MEDIUM)):
                line = _summary_line(conv, i)
                if line is not None:
                    sample.append(tokens.count(self._condensed(i, line)) + 1)
                if len(sample) == 8:
                    break
            mean = conv.condensed_mean = sum(sample) / len(sample) if sample else _SHORT_LINE_TOKENS
        return int(count * mean) + (0 if self.lines else self.summary_base)

    def add_small_talk_batches(self) -> None:
        """With what is left: one line per long run of messages neither shown nor summarized."""
        conv, prio = self.conv, self.conv.prio
        shown = sorted(self.verbatim.union(*(range(*conv.unit(i)) for i in self.lines)))
        edges = [-1, *shown, conv.n]
        runs = [(a + 1, b) for a, b in pairwise(edges) if b - a - 1 >= SMALL_TALK_BATCH]
        for start, end in reversed(runs):  # newest first
            room = self.free - (0 if self.lines or self.batches else self.summary_base)
            if room < _SHORT_LINE_TOKENS:  # the shortest batch line takes 19 tokens
                break
            speakers = sorted({conv.speaker(k) for k in range(start, min(end, start + 200))})
            names = ", ".join(speakers[:4]) + (" …" if len(speakers) > 4 else "")
            small_talk = prio.count(LOW, start, end)
            line = (
                f"#{start}–#{end - 1}: {end - start} messages not shown, {small_talk} of them "
                f"small talk ({names})"
            )
            cost = self.line_cost(line)
            if cost > room:
                break
            self.batches[start] = (line, cost)
            self.used += cost

    def use_model_summary(self, summarizer: Summarizer) -> list[str]:
        """Let the model rewrite the lines within the same room; returns warnings."""
        extractive = "\n".join(self.lines[i][0] for i in sorted(self.lines))
        line_tokens = sum(cost for _, cost, _ in self.lines.values())
        room = line_tokens + self.free
        try:
            text = summarizer(extractive, room)
        except Exception as exc:  # any model failure leaves the extractive summary in place
            return [f"model summary failed, extractive kept: {exc}"]
        text = (text or "").strip()
        if not text:
            return ["model summary was empty, extractive kept"]
        cost = tokens.count(_MODEL_HEADER + "\n" + text) - tokens.count(_SUMMARY_HEADER)
        if cost + MODEL_MARGIN_TOKENS > room:  # a small margin: the final count is exact
            return [f"model summary too long ({cost} > {room} tokens)"]
        self.used += cost - line_tokens
        self.model_text, self.model_cost = text, cost
        self.model_covers = set(self.lines)
        self.lines = {}
        return []

    def _low_ratio(self) -> float:
        """A deliberately low tokens-per-byte ratio for guessing whether a unit can fit: 85 %
        of the ratio of the messages counted exactly so far. Guesses only save counting units
        that clearly cannot fit; what is taken is decided on exact counts."""
        conv = self.conv
        if conv._known_bytes >= 1000:
            return conv._known_text / conv._known_bytes * 0.85
        return 0.16

    def upgrade_to_verbatim(self) -> None:
        conv = self.conv
        misses = 0
        ratio = self._low_ratio()
        for level in (CRITICAL, HIGH, MEDIUM):
            i = conv.prio.rfind(level)
            while i != -1 and misses < 8:
                start, end = conv.unit(i)
                ok = start not in self.verbatim and start not in conv.orphans
                if ok and (
                    level < MEDIUM or conv.has_fact[start] or start >= conv.n - RECENT_WINDOW
                ):
                    line_cost = self.lines[start][1] if start in self.lines else 0
                    room = self.free + (self.summary_base if self._last_line(start) else 0)
                    guess = sum(conv.sizes[start:end]) * ratio
                    guess += MESSAGE_OVERHEAD_TOKENS * (end - start)
                    if guess - line_cost > room:
                        misses += 1  # clearly too big: not worth counting
                        i = conv.prio.rfind(level, 0, start)
                        continue
                    extra = conv.unit_cost(start, end) - line_cost
                    if extra <= room:
                        self.lines.pop(start, None)
                        self.used -= line_cost
                        self._take(start, end)
                        misses = 0
                    else:
                        misses += 1
                i = conv.prio.rfind(level, 0, start)
            misses = 0

    def fill_with_recent(self) -> None:
        """Room left after everything that matters: the newest remaining units, verbatim."""
        conv = self.conv
        ratio = self._low_ratio()
        misses, i = 0, conv.n - 1
        counted_from = conv.n  # units at or after this index were counted ahead, in a batch
        while i >= 0 and misses < 8 and self.free > MESSAGE_OVERHEAD_TOKENS:
            start, end = conv.unit(i)
            if start not in self.verbatim and start not in self.lines and start not in conv.orphans:
                guess = sum(conv.sizes[start:end]) * ratio + MESSAGE_OVERHEAD_TOKENS * (end - start)
                if guess <= self.free and start < counted_from:
                    counted_from = self._count_ahead(i)
                if guess <= self.free and conv.unit_cost(start, end) <= self.free:
                    self._take(start, end)
                    misses = 0
                else:
                    misses += 1
            i = start - 1

    def _count_ahead(self, i: int) -> int:
        """Count, in one batch, the units from ``i`` back that are expected to fit (bytes times
        the tokens-per-byte ratio of the messages counted so far); returns the first index.
        Only saves per-message calls: what is taken is still decided on exact counts."""
        conv = self.conv
        ratio = conv._known_text / conv._known_bytes if conv._known_bytes else 0.25
        room, expected, indices, sizes = self.free, 0.0, [], conv.sizes
        while i >= 0 and (expected <= room or not indices):
            start, end = conv.unit(i)
            if start not in self.verbatim and start not in self.lines and start not in conv.orphans:
                expected += sum(sizes[start:end]) * ratio + MESSAGE_OVERHEAD_TOKENS
                indices.extend(range(start, end))
            i = start - 1
        conv.costs(indices)
        return i + 1

    def _last_line(self, start: int) -> bool:
        """Whether the unit at ``start`` holds the summary's only line (its header goes too)."""
        return (
            self.model_text is None
            and not self.batches
            and len(self.lines) == 1
            and start in self.lines
        )

    def summarized_messages(self) -> set[int]:
        covered = set(self.lines) if self.model_text is None else self.model_covers
        result = set()
        for start in covered:
            result.update(k for k in range(*self.conv.unit(start)) if k not in self.verbatim)
        return result

    def summary_message(self) -> dict | None:
        if self.model_text is not None:
            text = f"{_MODEL_HEADER}\n{self.model_text}"
        elif self.lines or self.batches:
            entries = {start: line for start, (line, _, _) in self.lines.items()}
            entries.update((start, line) for start, (line, _) in self.batches.items())
            body = "\n".join(entries[i] for i in sorted(entries))
            text = f"{_SUMMARY_HEADER}\n{body}"
        else:
            return None
        # role "user": the lines quote chat text, which must not gain a system prompt's weight
        return {"role": "user", "name": SUMMARY_NAME, "content": text}

    def finish(self) -> tuple[list[dict], int]:
        """Assemble the output and make its exact count fit, giving back lines if needed."""
        conv = self.conv
        while True:
            summary = self.summary_message()
            summary_cost = count_messages([summary]) if summary else 0
            total = sum(self.costs_of_output()) + summary_cost
            if total <= self.budget:
                break
            if not self._give_back(int((total - self.budget) * LINE_ESTIMATE_MARGIN) + 1):
                raise ContextBudgetError(
                    f"max_tokens={self.budget} is too small for this conversation's critical "
                    "messages. Raise max_tokens."
                )
        output: list[dict] = []
        pending = summary
        for i in sorted(self.verbatim):
            if pending is not None and conv.roles[i] != "system":
                output.append(pending)  # after the leading system messages
                pending = None
            message = conv.messages[i]
            output.append({**message, "content": self.cut[i]} if i in self.cut else message)
        if pending is not None:
            output.append(pending)
        return output, summary_cost

    def _give_back(self, overflow: int) -> bool:
        """Drop the least important summary lines, then the last verbatim upgrades."""
        while self.batches:
            overflow -= self.batches.pop(max(self.batches))[1]
            if overflow <= 0:
                return True
        levels = (MEDIUM, HIGH) if self.model_text is None else ()  # CRITICAL lines stay
        for level in levels:
            for start in sorted(self.lines):  # oldest first
                _line, cost, line_level = self.lines[start]
                if line_level == level:
                    del self.lines[start]
                    overflow -= cost
                    if overflow <= 0:
                        return True
        optional = sorted(
            i for i in self.verbatim if not self._mandatory(i) and self.conv.prio[i] != CRITICAL
        )
        for i in optional:
            if i not in self.verbatim:
                continue
            start, end = self.conv.unit(i)
            for k in range(start, end):
                self.verbatim.discard(k)
            overflow -= self.conv.unit_cost(start, end)
            if overflow <= 0:
                return True
        return overflow <= 0

    def _mandatory(self, i: int) -> bool:
        return self.conv.roles[i] == "system" or i >= _turn_start(self.conv, self.conv.n)

    def costs_of_output(self) -> Iterable[int]:
        conv = self.conv
        for i in self.verbatim:
            if i in self.cut:
                fixed = conv.cost(i) - tokens.count(conv.texts[i])
                yield tokens.count(self.cut[i]) + fixed
            else:
                yield conv.cost(i)


def _turn_start(conv: _Conversation, end: int) -> int:
    """Start of the turn ending before ``end``: its user message (not a tool result carrier)."""
    i = end - 1
    while i >= 0:
        if conv.roles[i] == "user" and i not in conv.units and i not in conv.orphans:
            return i
        i -= 1
    return conv.unit(end - 1)[0] if end > 0 else 0


def _tokens_before(conv: _Conversation, exact: bool) -> tuple[int, bool]:
    """Exact for small inputs; otherwise exact counts where known plus a sampled estimate.

    The unknown part is estimated as its UTF-8 bytes times the tokens-per-byte ratio of
    well-spread messages counted exactly (``SAMPLE_MIN`` to ``SAMPLE_SIZE`` of them, stopping
    once they hold ``SAMPLE_BYTES``); names and per-message overhead are exact.
    bench/context.py prints the estimate's error against a full count.
    """
    n = conv.n
    if exact or conv.total_bytes <= EXACT_BEFORE_BYTES:
        return sum(conv.costs(range(n))), True
    from collections import Counter

    known, sizes, texts = conv._costs, conv.sizes, conv.texts
    sample: list[int] = []
    sample_bytes = 0
    for k in range(1, 8 * SAMPLE_SIZE):  # golden-ratio steps: spread out, never in step with
        i = int((k * 0.6180339887498949) % 1.0 * n)  # a periodic pattern in the conversation
        if i not in known and i not in sample and sizes[i]:
            sample.append(i)
            sample_bytes += sizes[i]
            if len(sample) == SAMPLE_SIZE or (
                sample_bytes >= SAMPLE_BYTES and len(sample) >= SAMPLE_MIN
            ):
                break
    sample_tokens = sum(tokens.counts([texts[i] for i in sample]))
    ratio = sample_tokens / sample_bytes if sample_bytes else 0.25
    known_bytes, known_text = conv._known_bytes, conv._known_text
    names = Counter(map(dict.get, conv.messages, repeat("name")))
    name_tokens = sum(conv.name_cost(name) * times for name, times in names.items())
    estimate = known_text + round((conv.total_bytes - known_bytes) * ratio)
    return estimate + name_tokens + MESSAGE_OVERHEAD_TOKENS * n, False
