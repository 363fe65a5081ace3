"""Progress of a long tool call, as MCP progress notifications want it.

A tool that can take more than a few seconds reports each step (``Steps.at``) and, while it
waits on something slow (a model, a web API), a heartbeat every few seconds
(``Steps.waiting``): Claude Code abandons an HTTP tool call after about five minutes with
neither a result nor a notification. Values only ever increase (the MCP rule); a report that
fails (the client went away) never ends the work. The server module turns a FastMCP ``Context``
into the ``report`` callable (``from_context``); plain functions take ``Steps | None``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

log = logging.getLogger("valor.progress")

Report = Callable[[float, float | None, str], Awaitable[None]]
HEARTBEAT_SECONDS = 10.0


class Steps:
    """Progress over ``total`` steps: ``at(n, message)`` when step n starts."""

    def __init__(self, report: Report | None, total: float, heartbeat: float = HEARTBEAT_SECONDS):
        self.report = report
        self.total = total
        self.heartbeat = heartbeat
        self.last = -1.0

    async def at(self, value: float, message: str) -> None:
        if self.report is None:
            return
        value = min(max(value, self.last + 0.001), self.total)
        if value <= self.last:
            return  # already at the end: nothing higher to say
        self.last = value
        try:
            await self.report(value, self.total, message)
        except Exception as exc:  # a client that went away must not end the work
            log.debug("progress report failed: %s", type(exc).__name__)

    async def done(self, message: str = "done") -> None:
        await self.at(self.total, message)

    @contextlib.asynccontextmanager
    async def waiting(self, message: str, *, within: float = 0.9) -> AsyncIterator[None]:
        """While the block runs, a notification every ``heartbeat`` seconds saying how long it
        has waited, creeping up to ``within`` of the way to the next whole step."""
        if self.report is None:
            yield
            return
        started = time.monotonic()
        base = max(self.last, 0.0)
        await self.at(base, message)

        async def beat() -> None:
            beats = 0
            while True:
                await asyncio.sleep(self.heartbeat)
                beats += 1
                elapsed = time.monotonic() - started
                share = within * (1 - 0.5**beats)  # approaches, never reaches, the next step
                await self.at(base + share, f"{message} ({elapsed:.0f} s)")

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def from_context(ctx: Any) -> Report | None:
    """A FastMCP ``Context``'s ``report_progress`` (a no-op without a client's progress token),
    or None when there is no context."""
    if ctx is None:
        return None

    async def report(progress: float, total: float | None, message: str) -> None:
        await ctx.report_progress(progress, total, message)

    return report
