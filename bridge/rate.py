"""Send budgets for Telegram: per chat, per group, overall, and flood waits as Telethon keys them.

Telegram documents its limits loosely: about one message per second in a chat, 20 per minute in
a group, 30 per second overall; edits count like sends. Going over them earns a ``FloodWait``
(a 429 with ``retry_after``). The controller keeps every call inside sliding windows with a safety
margin, so steady streaming never floods. A flood wait is kept the way Telethon keeps it:
per Telegram method for the whole account (Telethon remembers the method and raises early for
every chat while more than 3 s remain), so a wait on one chat's sends holds every chat's sends
and nothing else; slow mode (and a wait that names no method) holds just that chat.
Draft updates (a bot's answer streamed as a draft in a private chat, ``messages.setTyping``)
count like edits, and a flood wait on ``SetTypingRequest`` holds drafts and typing alike.

Callers ask ``acquire(chat_id, ...)`` right before each call. Waiting callers are served by
priority (a final answer before a preview edit) and then in arrival order, which shares the
global budget fairly: a chat that just sent goes to the back of the line. Coalescing is the
caller's part (``bridge.live`` sends the newest text once its turn comes).

aiolimiter meters one rate well, but this needs priorities, several windows per chat and
per-chat blocks that others skip past, so the scheduling lives here (see docs/libraries.md).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

PRIORITY_FINAL = 0
PRIORITY_FILE = 1
PRIORITY_EDIT = 2
PRIORITY_CLEANUP = 3
GROUP_RESERVE = 2  # slots of a group's minute budget that previews leave for the final answer


@dataclass(frozen=True)
class Limits:
    """Telegram's documented limits; ``margin`` widens every window (0.1 = 10 % slower).
    ``time_scale`` shrinks every period alike (tests and the bench run faster than real time)."""

    per_chat_per_second: int = 1
    group_per_minute: int = 20
    global_per_second: int = 30
    margin: float = 0.1
    time_scale: float = 1.0


class SlidingWindow:
    """At most ``limit`` events in any ``period`` seconds.

    An event's time can be moved later after it is recorded (``Slot.done``): a call counts from
    when it finished, so a call delayed between its turn and its sending cannot crowd the next.
    """

    def __init__(self, limit: int, period: float):
        if limit < 1 or period <= 0:
            raise ValueError("a window needs limit >= 1 and period > 0")
        self.limit = limit
        self.period = period
        self._events: list[list[float]] = []  # one-element cells, so a Slot can move them

    def _expire(self, now: float) -> None:
        self._events = [cell for cell in self._events if cell[0] > now - self.period]

    def wait_time(self, now: float, headroom: int = 0) -> float:
        """Seconds until one more event fits (0 when it fits now), keeping ``headroom`` events
        of the window unused (never below a limit of one)."""
        self._expire(now)
        limit = max(1, self.limit - headroom)
        if len(self._events) < limit:
            return 0.0
        stamps = sorted(cell[0] for cell in self._events)
        return stamps[len(stamps) - limit] + self.period - now

    def record(self, now: float) -> list[float]:
        cell = [now]
        self._events.append(cell)
        return cell


class Slot:
    """One granted call. ``done()`` after the call returns moves its time to the finish."""

    def __init__(self, cells: list[list[float]], clock: Callable[[], float]):
        self._cells = cells
        self._clock = clock

    def done(self) -> None:
        now = self._clock()
        for cell in self._cells:
            cell[0] = max(cell[0], now)


@dataclass
class _ChatState:
    windows: list[SlidingWindow]
    blocked_until: float = 0.0
    flood_waits: int = 0
    # One call at a time per chat, highest priority first.
    waiters: list[tuple[int, int, asyncio.Future[None]]] = field(default_factory=list)
    busy: bool = False


class RateController:
    """Shared by every reply of one Telegram account (see module docstring)."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.limits = limits or Limits()
        self._clock = clock
        stretch = (1.0 + self.limits.margin) * self.limits.time_scale
        self._global = SlidingWindow(self.limits.global_per_second, 1.0 * stretch)
        self._stretch = stretch
        self._chats: dict[int, _ChatState] = {}
        self._queue: list[tuple[int, int, int, asyncio.Future[list[float]]]] = []  # global line
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._methods: dict[str, float] = {}  # Telegram method → blocked until (account-wide)

    # --- per chat -------------------------------------------------------------------------
    def _chat(self, chat_id: int, is_group: bool) -> _ChatState:
        state = self._chats.get(chat_id)
        if state is None:
            windows = [SlidingWindow(self.limits.per_chat_per_second, 1.0 * self._stretch)]
            if is_group:
                windows.append(SlidingWindow(self.limits.group_per_minute, 60.0 * self._stretch))
            state = self._chats[chat_id] = _ChatState(windows)
        return state

    def flood_wait(self, chat_id: int, seconds: float, *, method: str | None = None) -> None:
        """Telegram asked to wait: with ``method``, no call of that method goes to any chat
        before then (as Telethon enforces it); without, nothing goes to this chat."""
        state = self._chat(chat_id, is_group=False)
        state.flood_waits += 1
        until = self._clock() + max(0.0, seconds)
        if method is None:
            state.blocked_until = max(state.blocked_until, until)
        else:
            self._methods[method] = max(self._methods.get(method, 0.0), until)

    def blocked_for(self, chat_id: int, methods: tuple[str, ...] = ()) -> float:
        """Seconds before a call of one of ``methods`` may go to this chat (flood waits only)."""
        now = self._clock()
        state = self._chats.get(chat_id)
        chat = state.blocked_until - now if state else 0.0
        return max(0.0, chat, *(self._methods.get(m, 0.0) - now for m in methods))

    def flood_waits(self, chat_id: int) -> int:
        state = self._chats.get(chat_id)
        return state.flood_waits if state else 0

    # --- acquiring ------------------------------------------------------------------------
    async def acquire(
        self,
        chat_id: int,
        *,
        is_group: bool = False,
        priority: int = 2,
        methods: tuple[str, ...] = (),
    ) -> Slot:
        """Wait until one call to ``chat_id`` fits every budget and no flood wait holds it
        (this chat's, or one on the Telegram ``methods`` the call uses), then count it as
        sent. Call ``done()`` on the returned slot when the call has returned."""
        state = self._chat(chat_id, is_group)
        if is_group and len(state.windows) == 1:  # learnt late that it is a group
            state.windows.append(SlidingWindow(self.limits.group_per_minute, 60.0 * self._stretch))
        await self._enter_chat(state, priority)
        try:
            while True:
                now = self._clock()
                # Previews leave part of a group's minute to the final answer, so a long
                # stream cannot spend the budget the answer itself needs.
                headroom = GROUP_RESERVE if priority >= PRIORITY_EDIT else 0
                waits = [w.wait_time(now, headroom if w.limit > 2 else 0) for w in state.windows]
                held = [self._methods.get(m, 0.0) - now for m in methods]
                wait = max([state.blocked_until - now, *waits, *held])
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            global_cell = await self._enter_global(priority)
            now = self._clock()
            cells = [window.record(now) for window in state.windows]
            return Slot([*cells, global_cell], self._clock)
        finally:
            self._leave_chat(state)

    async def _enter_chat(self, state: _ChatState, priority: int) -> None:
        if not state.busy and not state.waiters:
            state.busy = True
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(state.waiters, (priority, next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._leave_chat(state)  # the turn was handed over just as we were cancelled
            raise

    def _leave_chat(self, state: _ChatState) -> None:
        while state.waiters:
            _, _, future = heapq.heappop(state.waiters)
            if not future.done():
                future.set_result(None)
                return
        state.busy = False

    async def _enter_global(self, priority: int) -> list[float]:
        future: asyncio.Future[list[float]] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, (priority, next(self._order), id(future), future))
        self._pump()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                pass  # the slot was already counted; giving it back could overshoot
            raise

    def _pump(self) -> None:
        """Admit queued callers while the global window has room; else wake up when it will."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue:
            if self._queue[0][3].done():  # cancelled while waiting
                heapq.heappop(self._queue)
                continue
            now = self._clock()
            wait = self._global.wait_time(now)
            if wait > 0:
                self._timer = asyncio.get_running_loop().call_later(wait, self._pump)
                return
            _, _, _, future = heapq.heappop(self._queue)
            future.set_result(self._global.record(now))
