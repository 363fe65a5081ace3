"""Streaming answers to Telegram under its limits: Valor's LiveReply against a fixed interval.

A simulated Telegram enforces the documented limits on arrival (after a random network delay):
1 message or edit per second in a chat, 20 per minute in a group, 30 per second overall. Going
over answers a flood wait (429 with retry_after) and the call is refused. One private chat is
also given a long flood wait (retry_after = --long-flood seconds) on its third call, the way
Telegram sometimes penalises an account.

Each chat streams an answer word by word for --stream seconds (with two tool-progress events),
then finishes. Staleness of a text version = time from when it was produced until a message
showing it (or a later version) arrived at Telegram. Two policies run side by side in one event
loop, each against its own simulated Telegram:

* live   — bridge.live.LiveReply with bridge.rate.RateController (Valor's policy);
* drafts — the same LiveReply where the transport streams drafts (a Telegram bot: private chats
           stream a draft, sendMessageDraft / sendMessageTextDraftAction, and the final answer
           is sent; groups keep editing). Telegram documents no separate draft limit, so the
           simulation counts a draft update like an edit (the rate controller does the same);
* fixed  — the original fixed-interval policy: an edit every 2 s for text, 2.5 s while a tool
           runs, 3 s while a code block is open; no shared budget, retry_after not honoured
           (a refused edit is dropped); the final answer replaces the live text by an edit,
           retried at the next interval until it lands.

Run:  .venv/bin/python bench/streaming.py            (real time, ~1 minute)
      .venv/bin/python bench/streaming.py --time-scale 0.25 --chats 10   (quick look)
Times printed are in real-time seconds whatever the scale.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bridge.live import DRAFT_REFRESH_SECONDS, LiveReply
from bridge.rate import Limits, RateController
from bridge.transport import SentMessage
from servers.core.errors import Category, ValorError

TOKEN = re.compile(r"w(\d+)")


@dataclass
class ChatLog:
    chat_id: int
    is_group: bool
    produced: list[tuple[float, int]] = field(default_factory=list)  # (time, version)
    visible: list[tuple[float, int]] = field(default_factory=list)  # (arrival, max version)
    flood_errors: int = 0
    injected_floods: int = 0
    edits: int = 0
    sends: int = 0
    drafts: int = 0
    deletes: int = 0  # a live message removed after the final answer went out
    final_at: float | None = None
    finish_called_at: float | None = None


class SimulatedTelegram:
    """A Transport that enforces Telegram's limits on arrival and records what became visible."""

    def __init__(self, scale: float, long_flood_chat: int | None, long_flood: float, seed: int):
        self.scale = scale
        self.rng = random.Random(seed)
        self.logs: dict[int, ChatLog] = {}
        self.accepted_global: list[float] = []
        self.accepted_chat: dict[int, list[float]] = {}
        self.blocked_until: dict[int, float] = {}
        self.calls_per_chat: dict[int, int] = {}
        self.long_flood_chat = long_flood_chat
        self.long_flood = long_flood
        self.final_ids: set[tuple[int, int]] = set()
        self._next_id = 1000

    def _now(self) -> float:
        return time.monotonic()

    @staticmethod
    def _count_since(stamps: list[float], since: float) -> int:
        return sum(1 for t in stamps if t > since)

    async def _arrive(self, chat_id: int) -> float:
        """Network delay, then Telegram's checks; returns the arrival time or raises a flood."""
        await asyncio.sleep(self.rng.uniform(0.02, 0.08) * self.scale)
        now = self._now()
        log = self.logs[chat_id]
        self.calls_per_chat[chat_id] = self.calls_per_chat.get(chat_id, 0) + 1
        if chat_id == self.long_flood_chat and self.calls_per_chat[chat_id] == 3:
            self.blocked_until[chat_id] = now + self.long_flood * self.scale
            log.injected_floods += 1
            raise ValorError(
                Category.RATE_LIMIT, "FLOOD_WAIT", retry_after=self.long_flood * self.scale
            )
        retry = self.blocked_until.get(chat_id, 0.0) - now
        chat_stamps = self.accepted_chat.setdefault(chat_id, [])
        s = self.scale
        if retry <= 0 and self._count_since(chat_stamps, now - 1.0 * s) >= 1:
            retry = 1.0 * s
        if retry <= 0 and log.is_group and self._count_since(chat_stamps, now - 60.0 * s) >= 20:
            retry = 60.0 * s - (now - sorted(chat_stamps)[-20])
        if retry <= 0 and self._count_since(self.accepted_global, now - 1.0 * s) >= 30:
            retry = 1.0 * s
        if retry > 0:
            log.flood_errors += 1
            raise ValorError(Category.RATE_LIMIT, "FLOOD_WAIT", retry_after=retry)
        chat_stamps.append(now)
        self.accepted_global.append(now)
        if len(self.accepted_global) > 4000:
            del self.accepted_global[:2000]
        return now

    def _seen(self, chat_id: int, at: float, text: str) -> None:
        versions = [int(v) for v in TOKEN.findall(text)]
        if versions:
            self.logs[chat_id].visible.append((at, max(versions)))
        if "(end)" in text and self.logs[chat_id].final_at is None:
            self.logs[chat_id].final_at = at

    async def send_text(self, chat_id, text, *, reply_to=None):
        at = await self._arrive(chat_id)
        self.logs[chat_id].sends += 1
        self._seen(chat_id, at, str(text))
        self._next_id += 1
        return SentMessage(chat_id, self._next_id)

    async def edit_text(self, message, text):
        at = await self._arrive(message.chat_id)
        self.logs[message.chat_id].edits += 1
        self._seen(message.chat_id, at, str(text))

    async def delete_message(self, message):
        await self._arrive(message.chat_id)
        self.logs[message.chat_id].deletes += 1

    async def send_file(self, chat_id, path, *, caption="", reply_to=None):
        await self._arrive(chat_id)
        self._next_id += 1
        return SentMessage(chat_id, self._next_id)

    async def signal(self, chat_id, kind, *, message_id=None):
        return None


class DraftingTelegram(SimulatedTelegram):
    """The simulated Telegram of a bot: drafts in private chats, under the same limits."""

    def drafts_enabled(self, chat_id: int) -> bool:
        return chat_id > 0

    async def send_draft(self, chat_id, draft_id, text, *, topic_id=None):
        at = await self._arrive(chat_id)
        self.logs[chat_id].drafts += 1
        self._seen(chat_id, at, str(text))


class FixedIntervalReply:
    """The original policy (see module docstring)."""

    TEXT, TOOL, CODE = 2.0, 2.5, 3.0

    def __init__(self, transport: SimulatedTelegram, chat_id: int, scale: float):
        self.transport = transport
        self.chat_id = chat_id
        self.scale = scale
        self.answer = ""
        self.tool = ""
        self.live: SentMessage | None = None
        self.shown = ""
        self.task: asyncio.Task | None = None

    def _interval(self) -> float:
        if self.answer.count("```") % 2 == 1:
            return self.CODE
        return self.TOOL if self.tool else self.TEXT

    def _body(self) -> str:
        return self.answer + (f"\n\n⏳ {self.tool}" if self.tool else "")

    async def _push(self, body: str) -> bool:
        try:
            if self.live is None:
                self.live = await self.transport.send_text(self.chat_id, body)
            else:
                await self.transport.edit_text(self.live, body)
        except ValorError:
            return False  # dropped; the next tick tries again with newer text
        self.shown = body
        return True

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval() * self.scale)
            body = self._body()
            if body.strip() and body != self.shown:
                await self._push(body)

    async def text(self, text: str) -> None:
        self.answer = text
        if self.task is None:
            self.task = asyncio.create_task(self._loop())

    async def tool_progress(self, tool_name: str, detail: str = "") -> None:
        self.tool = tool_name
        if self.task is None:
            self.task = asyncio.create_task(self._loop())

    async def finish(self, final_text: str, files=None) -> None:
        if self.task:
            self.task.cancel()
        self.tool = ""
        while not await self._push(final_text):
            await asyncio.sleep(self.TEXT * self.scale)


async def stream_one(sink, log: ChatLog, rng: random.Random, duration: float, scale: float):
    """Produce an answer word by word; every produced version is recorded with its time."""
    await asyncio.sleep(rng.uniform(0, 1.0) * scale)  # chats do not start in lockstep
    words: list[str] = []
    start = time.monotonic()
    version = 0
    tool_marks = {duration * 0.3, duration * 0.6}
    while time.monotonic() - start < duration * scale:
        elapsed = (time.monotonic() - start) / scale
        for mark in sorted(tool_marks):
            if elapsed >= mark:
                tool_marks.discard(mark)
                await sink.tool_progress("mcp__social-tools__search_current_info", "news")
        version += 1
        words.append(f"w{version}")
        log.produced.append((time.monotonic(), version))
        await sink.text(" ".join(words))
        await asyncio.sleep(rng.uniform(0.05, 0.15) * scale)
    log.finish_called_at = time.monotonic()
    await sink.finish(" ".join(words) + " (end)")


def staleness(log: ChatLog) -> list[float]:
    """Per produced version: seconds until that version (or a newer one) was visible."""
    out = []
    visible = sorted(log.visible)
    for produced_at, version in log.produced:
        seen = [t for t, v in visible if v >= version and t >= produced_at]
        if seen:
            out.append(min(seen) - produced_at)
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def run_policy(policy: str, chat_ids: list[int], args, seed: int) -> SimulatedTelegram:
    scale = args.time_scale
    flooded = chat_ids[2]
    kind = DraftingTelegram if policy == "drafts" else SimulatedTelegram
    telegram = kind(scale, flooded, args.long_flood, seed)
    rate = RateController(Limits(time_scale=scale))
    rng = random.Random(seed + 1)
    tasks = []
    for chat_id in chat_ids:
        log = telegram.logs[chat_id] = ChatLog(chat_id, chat_id < 0)
        if policy in ("live", "drafts"):
            sink = LiveReply(
                telegram,
                chat_id,
                1,
                rate=rate,
                retry_backoff=0.5 * scale,
                draft_refresh_seconds=DRAFT_REFRESH_SECONDS * scale,
            )
        else:
            sink = FixedIntervalReply(telegram, chat_id, scale)
        tasks.append(stream_one(sink, log, random.Random(rng.random()), args.stream, scale))
    await asyncio.gather(*tasks)
    return telegram


def summarize(name: str, telegram: SimulatedTelegram, scale: float) -> dict:
    flooded = telegram.long_flood_chat
    private = [lg for cid, lg in telegram.logs.items() if cid > 0 and cid != flooded]
    groups = [lg for cid, lg in telegram.logs.items() if cid < 0]
    p_st = [s / scale for lg in private for s in staleness(lg)]
    g_st = [s / scale for lg in groups for s in staleness(lg)]
    finals = sum(1 for lg in telegram.logs.values() if lg.final_at is not None)
    flood_log = telegram.logs[flooded]
    return {
        "name": name,
        "steady_floods": sum(lg.flood_errors for cid, lg in telegram.logs.items()),
        "p50_private": pct(p_st, 0.5),
        "p95_private": pct(p_st, 0.95),
        "p50_group": pct(g_st, 0.5),
        "p95_group": pct(g_st, 0.95),
        "edits": sum(lg.edits + lg.sends + lg.drafts + lg.deletes for lg in telegram.logs.values()),
        "finals": finals,
        "chats": len(telegram.logs),
        "flooded_final_after": (
            (flood_log.final_at - flood_log.finish_called_at) / scale
            if flood_log.final_at and flood_log.finish_called_at
            else float("nan")
        ),
    }


def print_chats(live: SimulatedTelegram, fixed: SimulatedTelegram, scale: float) -> None:
    cols = f"{'floods':>6} {'p50 s':>6} {'p95 s':>6} {'calls':>5} {'final':>5}"
    head = f"{'chat':>6} {'kind':7} | {cols}"
    print(f"{'':15}| {'live (Valor)':^33}| {'fixed interval (original)':^33}")
    print(head + " | " + head.split("| ", 1)[1])
    for chat_id in live.logs:
        row = []
        for telegram in (live, fixed):
            lg = telegram.logs[chat_id]
            st = [s / scale for s in staleness(lg)]
            floods = f"{lg.flood_errors}" + (
                f"+{lg.injected_floods}!" if lg.injected_floods else ""
            )
            row.append(
                f"{floods:>6} {pct(st, 0.5):6.2f} {pct(st, 0.95):6.2f} {lg.edits + lg.sends:5d} "
                f"{'yes' if lg.final_at else 'NO':>5}"
            )
        kind = "group" if chat_id < 0 else "private"
        if chat_id == live.long_flood_chat:
            kind = "flooded"
        print(f"{chat_id:>6} {kind:7} | {row[0]} | {row[1]}")


async def scenario(n_chats: int, args) -> None:
    n_groups = max(1, n_chats // 5)
    chat_ids = [i + 1 for i in range(n_chats - n_groups)] + [-(i + 1) for i in range(n_groups)]
    print(
        f"\n=== {n_chats} chats streaming at once ({n_chats - n_groups} private, {n_groups} "
        f"groups), {args.stream:.0f} s each; chat {chat_ids[2]} gets a {args.long_flood:.0f} s "
        "flood wait on its 3rd call ==="
    )
    started = time.monotonic()
    live, fixed, drafted = await asyncio.gather(
        run_policy("live", chat_ids, args, seed=n_chats),
        run_policy("fixed", chat_ids, args, seed=n_chats),
        run_policy("drafts", chat_ids, args, seed=n_chats),
    )
    print(f"(wall time {time.monotonic() - started:.1f} s at time scale {args.time_scale})")
    if not args.quiet:
        print_chats(live, fixed, args.time_scale)
    print(
        "\nsummary (floods: refused calls beyond the injected one; staleness in seconds;"
        " private excludes the flooded chat; drafts: private chats stream a draft)"
    )
    print(
        f"{'policy':16} {'floods':>6} {'p50 priv':>8} {'p95 priv':>8} {'p50 grp':>8} "
        f"{'p95 grp':>8} {'calls':>6} {'finals':>7} {'flooded final after':>20}"
    )
    policies = (("live (Valor)", live), ("drafts (bot)", drafted), ("fixed 2-3 s", fixed))
    for name, telegram in policies:
        s = summarize(name, telegram, args.time_scale)
        print(
            f"{name:16} {s['steady_floods']:6d} {s['p50_private']:8.2f} {s['p95_private']:8.2f} "
            f"{s['p50_group']:8.2f} {s['p95_group']:8.2f} {s['edits']:6d} "
            f"{s['finals']:>3}/{s['chats']:<3} {s['flooded_final_after']:19.1f}s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, nargs="*", default=[10, 50])
    parser.add_argument("--stream", type=float, default=20.0, help="seconds each answer streams")
    parser.add_argument("--long-flood", type=float, default=30.0, help="injected retry_after")
    parser.add_argument("--time-scale", type=float, default=1.0, help="<1 runs faster")
    parser.add_argument("--quiet", action="store_true", help="summaries only")
    args = parser.parse_args()
    for n in args.chats:
        asyncio.run(scenario(n, args))


if __name__ == "__main__":
    main()
