"""Wait on a condition with a generous deadline instead of sleeping a guessed time.

A test that sleeps "long enough" passes on the machine that wrote it and fails on a busy one;
these poll until the condition holds and fail only when the deadline passes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
_POLL_SECONDS = 0.01


def _timed_out(predicate: Callable[[], object], timeout: float, message: str) -> AssertionError:
    what = message or getattr(predicate, "__name__", "the condition")
    return AssertionError(f"{what} did not hold within {timeout:g} s")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = DEFAULT_TIMEOUT,
    message: str = "",
    interval: float = _POLL_SECONDS,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise _timed_out(predicate, timeout, message)
        time.sleep(interval)
    return value


async def wait_until_async(
    predicate: Callable[[], T],
    timeout: float = DEFAULT_TIMEOUT,
    message: str = "",
    interval: float = _POLL_SECONDS,
) -> T:
    """``wait_until`` for async tests: the event loop keeps running while it waits."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise _timed_out(predicate, timeout, message)
        await asyncio.sleep(interval)
    return value
