"""The Telegram send budgets (bridge/rate.py), at a shrunken time scale."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from bridge.rate import (
    PRIORITY_EDIT,
    PRIORITY_FINAL,
    Limits,
    RateController,
    SlidingWindow,
)


def test_sliding_window_counts_events_in_the_period():
    window = SlidingWindow(limit=2, period=1.0)
    assert window.wait_time(0.0) == 0
    window.record(0.0)
    window.record(0.2)
    assert window.wait_time(0.5) == pytest.approx(0.5)  # the event at 0.0 leaves at 1.0
    assert window.wait_time(1.0) == 0
    window.record(1.0)
    assert window.wait_time(1.1) == pytest.approx(0.1)


def test_window_rejects_nonsense():
    with pytest.raises(ValueError):
        SlidingWindow(0, 1.0)


def _max_in_any_window(times: list[float], period: float) -> int:
    times = sorted(times)
    return max(sum(1 for t in times if start <= t < start + period) for start in times)


async def _granted_at_once(rate: RateController, chat_id: int, **options) -> bool:
    """Whether ``acquire`` returns without waiting: it needs one turn of the event loop then,
    however slow the machine is."""
    attempt = asyncio.create_task(rate.acquire(chat_id, **options))
    await asyncio.sleep(0)
    granted = attempt.done()
    await attempt
    return granted


class PausedClock:
    """Monotonic time that stands still until ``resume()``: no window can free up meanwhile,
    so the order of waiters cannot depend on how fast the test reaches its next line."""

    def __init__(self) -> None:
        self._paused_at: float | None = time.monotonic()

    def __call__(self) -> float:
        return self._paused_at if self._paused_at is not None else time.monotonic()

    def resume(self) -> None:
        self._paused_at = None


async def test_one_chat_is_spaced_by_its_window():
    limits = Limits(time_scale=0.02, margin=0.1)  # one call per 22 ms in a chat
    rate = RateController(limits)
    stamps = []
    for _ in range(5):
        await rate.acquire(1)
        stamps.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert min(gaps) >= 0.02 * 1.1 * 0.95


async def test_global_budget_holds_across_many_chats():
    limits = Limits(global_per_second=5, time_scale=0.05, margin=0.1)
    rate = RateController(limits)
    stamps: list[float] = []

    async def one(chat: int) -> None:
        await rate.acquire(chat)
        stamps.append(time.monotonic())

    await asyncio.gather(*(one(chat) for chat in range(1, 21)))
    assert len(stamps) == 20
    # Never more than 5 in any global window of 1 s (scaled: 50 ms).
    assert _max_in_any_window(stamps, 0.05) <= 5
    assert max(stamps) - min(stamps) >= 3 * 0.05  # 20 calls at 5 per window take 4 windows


async def test_group_minute_budget_binds_after_the_burst():
    limits = Limits(group_per_minute=3, time_scale=0.005, margin=0.0)  # 3 per 0.3 s
    rate = RateController(limits)
    start = time.monotonic()
    for _ in range(4):
        await rate.acquire(-100, is_group=True)
    assert time.monotonic() - start >= 0.3 * 0.95


async def test_flood_wait_blocks_only_that_chat():
    rate = RateController(Limits(time_scale=0.01))
    start = time.monotonic()
    rate.flood_wait(7, 0.3)
    assert rate.blocked_for(7) > 0 and rate.blocked_for(8) == 0
    assert await _granted_at_once(rate, 8)  # another chat goes straight through
    await rate.acquire(7)
    assert time.monotonic() - start >= 0.3 * 0.99
    assert rate.flood_waits(7) == 1 and rate.flood_waits(8) == 0


async def test_final_answers_go_before_waiting_edits():
    clock = PausedClock()
    rate = RateController(Limits(global_per_second=1, time_scale=0.05, margin=0.0), clock=clock)
    await rate.acquire(1)  # the global window (1 per 50 ms) is full until the clock resumes
    order: list[str] = []

    async def one(chat: int, priority: int, name: str) -> None:
        await rate.acquire(chat, priority=priority)
        order.append(name)

    edits = [asyncio.create_task(one(10 + i, PRIORITY_EDIT, f"edit{i}")) for i in range(3)]
    await asyncio.sleep(0)  # the edits start waiting
    final = asyncio.create_task(one(20, PRIORITY_FINAL, "final"))
    await asyncio.sleep(0)  # and so does the final
    clock.resume()
    await asyncio.gather(*edits, final)
    assert order[0] == "final"


async def test_cancelled_waiter_does_not_stall_the_line():
    rate = RateController(Limits(global_per_second=1, time_scale=0.05, margin=0.0))
    await rate.acquire(1)
    doomed = asyncio.create_task(rate.acquire(2))
    await asyncio.sleep(0)  # it starts waiting
    doomed.cancel()
    await asyncio.wait_for(rate.acquire(3), 30)  # a stalled line would never admit it


def test_a_slot_counts_from_when_its_call_finished():
    clock = [0.0]
    window = SlidingWindow(limit=1, period=1.0)
    from bridge.rate import Slot

    slot = Slot([window.record(0.0)], lambda: clock[0])
    clock[0] = 0.4  # the call was late to go out and returned at 0.4
    slot.done()
    assert window.wait_time(1.0) == pytest.approx(0.4)  # not free at 1.0, but at 1.4


async def test_previews_leave_a_groups_last_slots_to_the_final():
    from bridge.rate import PRIORITY_FINAL as FINAL

    limits = Limits(per_chat_per_second=10, group_per_minute=4, time_scale=0.005, margin=0.0)
    rate = RateController(limits)  # group: 4 per 0.3 s, so previews may use 2 of them
    start = time.monotonic()
    for _ in range(2):
        await rate.acquire(-1, is_group=True, priority=PRIORITY_EDIT)
    assert await _granted_at_once(rate, -1, is_group=True, priority=FINAL)  # the reserve
    await rate.acquire(-1, is_group=True, priority=PRIORITY_EDIT)  # a third preview waits
    assert time.monotonic() - start >= 0.3 * 0.99  # for the second preview to leave the window
