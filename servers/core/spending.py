"""Spending caps for bridge runs: per run, per chat per day, and all chats per day.

- Per run: Claude Code's own ``--max-budget-usd`` (``VALOR_BUDGET_PER_RUN_USD``). It stops the
  run itself and reports a result with subtype ``error_max_budget_usd``; the bridge says so.
- Per day: every run's cost (the difference in Claude Code's ``total_cost_usd``) is a row with
  its time in ``spending``; a day is a UTC calendar day. A chat is warned once per day and cap
  when its spend passes ``VALOR_BUDGET_WARN_FRACTION`` of a cap; past a cap no new run starts.
- A message refused by a cap is not lost: its inbox row stays open and a hold row says why.
  The bridge releases it when the day resets or the operator raises the cap, and answers it.
- The daily caps can be changed while the bridge runs: ``valor budget set per-day 20`` writes
  a ``spending_caps`` row that overrides the setting (read on every check; the bridge releases
  held messages within a second); ``valor budget reset`` returns to the setting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from servers.core.store import Store, now

if TYPE_CHECKING:
    from servers.core.settings import Settings

CHAT_CAP = "chat"  # VALOR_BUDGET_PER_CHAT_DAY_USD
# The caps `valor budget set` may change live, and the setting each overrides.
LIVE_CAPS = {"per-chat-day": "budget_per_chat_day_usd", "per-day": "budget_per_day_usd"}
ALL_CAP = "all"  # VALOR_BUDGET_PER_DAY_USD
RUN_CAP_SUBTYPE = "error_max_budget_usd"  # Claude Code's result when --max-budget-usd is hit


@dataclass(frozen=True)
class Window:
    """One UTC day: its name and its bounds (epoch seconds)."""

    day: str
    start: float
    end: float

    @classmethod
    def containing(cls, moment: float | None = None) -> Window:
        at = datetime.fromtimestamp(time.time() if moment is None else moment, UTC)
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return cls(start.date().isoformat(), start.timestamp(), (start + timedelta(1)).timestamp())

    @property
    def resets_at(self) -> str:
        return datetime.fromtimestamp(self.end, UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class Standing:
    """A chat's spend and the overall spend in one day, against the configured caps."""

    chat_id: int
    window: Window
    chat_spent: float
    all_spent: float
    per_run_cap: float | None
    chat_cap: float | None
    all_cap: float | None
    warn_fraction: float

    def reached(self) -> str | None:
        """The cap reached (``CHAT_CAP`` or ``ALL_CAP``), else None."""
        if self.chat_cap is not None and self.chat_spent >= self.chat_cap:
            return CHAT_CAP
        if self.all_cap is not None and self.all_spent >= self.all_cap:
            return ALL_CAP
        return None

    def past_warning(self) -> list[str]:
        """Caps whose warning share has been spent."""
        return [
            cap
            for cap, spent, limit in (
                (CHAT_CAP, self.chat_spent, self.chat_cap),
                (ALL_CAP, self.all_spent, self.all_cap),
            )
            if limit is not None and spent >= limit * self.warn_fraction
        ]


def record_spend(
    store: Store,
    chat_id: int,
    cost_usd: float,
    *,
    session_id: str | None = None,
    inbox_id: int | None = None,
    at: float | None = None,
) -> None:
    """One run's cost, kept with its time (a run that cost nothing is not a row)."""
    if cost_usd <= 0:
        return
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO spending (chat_id, cost_usd, session_id, inbox_id, recorded_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (chat_id, cost_usd, session_id, inbox_id, now() if at is None else at),
        )


def spent(store: Store, window: Window, chat_id: int | None = None) -> float:
    """Spend in the window: one chat's, or every chat's for None."""
    where, params = ("AND chat_id = ?", (chat_id,)) if chat_id is not None else ("", ())
    rows = store.query(
        "SELECT COALESCE(SUM(cost_usd), 0) FROM spending "  # noqa: S608 - fixed fragments
        f"WHERE recorded_at >= ? AND recorded_at < ? {where}",
        (window.start, window.end, *params),
    )
    return float(rows[0][0])


def by_chat(store: Store, window: Window) -> list[tuple[int, float, int]]:
    """(chat, spend, runs) in the window, the biggest spender first."""
    rows = store.query(
        "SELECT chat_id, SUM(cost_usd), COUNT(*) FROM spending "
        "WHERE recorded_at >= ? AND recorded_at < ? GROUP BY chat_id ORDER BY 2 DESC",
        (window.start, window.end),
    )
    return [(int(r[0]), float(r[1]), int(r[2])) for r in rows]


def set_cap(store: Store, cap: str, usd: float | None) -> None:
    """Override a daily cap from now on (None: no cap), whatever the setting says."""
    if cap not in LIVE_CAPS:
        raise ValueError(f"not a cap that can be set: {cap!r} (one of {', '.join(LIVE_CAPS)})")
    if usd is not None and not usd >= 0:  # NaN too
        raise ValueError("a cap is a number of dollars, 0 or more")
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO spending_caps (cap, usd, set_at) VALUES (?, ?, ?) "
            "ON CONFLICT (cap) DO UPDATE SET usd = excluded.usd, set_at = excluded.set_at",
            (cap, usd, now()),
        )


def reset_cap(store: Store, cap: str) -> bool:
    """Drop an override: the setting holds again. False when there was none."""
    with store.transaction() as conn:
        return conn.execute("DELETE FROM spending_caps WHERE cap = ?", (cap,)).rowcount > 0


def cap_overrides(store: Store) -> dict[str, float | None]:
    return {row[0]: row[1] for row in store.query("SELECT cap, usd FROM spending_caps")}


def daily_caps(store: Store, settings: Settings) -> dict[str, float | None]:
    """The daily caps in force: an operator's override, else the setting."""
    overrides = cap_overrides(store)
    return {
        cap: overrides[cap] if cap in overrides else getattr(settings, setting)
        for cap, setting in LIVE_CAPS.items()
    }


def standing(
    store: Store, settings: Settings, chat_id: int, moment: float | None = None
) -> Standing:
    window = Window.containing(moment)
    caps = daily_caps(store, settings)
    return Standing(
        chat_id=chat_id,
        window=window,
        chat_spent=spent(store, window, chat_id),
        all_spent=spent(store, window),
        per_run_cap=settings.budget_per_run_usd,
        chat_cap=caps["per-chat-day"],
        all_cap=caps["per-day"],
        warn_fraction=settings.budget_warn_fraction,
    )


def refusal_text(state: Standing) -> str | None:
    """What the chat is told when a cap stops a new run; None when nothing is reached."""
    cap = state.reached()
    if cap is None:
        return None
    if cap == CHAT_CAP:
        what = (
            f"this chat has spent ${state.chat_spent:.2f} today, its daily cap is "
            f"${state.chat_cap:.2f}"
        )
    else:
        what = (
            f"all chats together have spent ${state.all_spent:.2f} today, the daily cap is "
            f"${state.all_cap:.2f}"
        )
    return (
        f"💸 Spending cap reached: {what}. Your message is kept and will be answered when the "
        f"day resets ({state.window.resets_at}) or the operator raises the cap."
    )


def due_warnings(store: Store, state: Standing) -> list[str]:
    """Warnings for caps past their warning share not yet sent to this chat today (each is
    marked sent here, so it goes out once per day and cap)."""
    messages = []
    for cap in state.past_warning():
        with store.transaction() as conn:
            fresh = conn.execute(
                "INSERT INTO spending_warnings (chat_id, cap, day, sent_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING RETURNING 1",
                (state.chat_id, cap, state.window.day, now()),
            ).fetchone()
        if not fresh:
            continue
        if cap == CHAT_CAP:
            spent_now, limit, whose = state.chat_spent, state.chat_cap, "this chat's daily cap"
        else:
            spent_now, limit, whose = state.all_spent, state.all_cap, "the daily cap for all chats"
        assert limit is not None
        messages.append(
            f"⚠️ ${spent_now:.2f} of {whose} (${limit:.2f}) spent today "
            f"({spent_now / limit:.0%}); new messages wait once it is reached."
        )
    return messages


def cost_text(state: Standing) -> str:
    """``/cost``: the chat's spend today and the caps."""

    def cap(value: float | None, spent_now: float | None = None) -> str:
        if value is None:
            return "no cap"
        share = f" ({spent_now / value:.0%} used)" if spent_now is not None else ""
        return f"cap ${value:.2f}{share}"

    return "\n".join(
        [
            f"Spent today ({state.window.day}, UTC): ${state.chat_spent:.4f} in this chat, "
            f"{cap(state.chat_cap, state.chat_spent)}.",
            f"All chats today: ${state.all_spent:.4f}, {cap(state.all_cap, state.all_spent)}.",
            f"Per reply: {cap(state.per_run_cap)}.",
            f"The day resets at {state.window.resets_at}.",
        ]
    )


# -- messages held back by a cap -----------------------------------------------------------------
def hold(store: Store, inbox_id: int, chat_id: int, reason: str) -> bool:
    """Keep the message for later; True when it was not held already (tell the chat then)."""
    with store.transaction() as conn:
        fresh = conn.execute(
            "INSERT INTO spending_holds (inbox_id, chat_id, reason, held_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING RETURNING 1",
            (inbox_id, chat_id, reason[:500], now()),
        ).fetchone()
    return bool(fresh)


def held(store: Store, chat_id: int | None = None) -> list[tuple[int, int]]:
    """(inbox row, chat) of held messages still open in the inbox, oldest first."""
    where, params = ("AND h.chat_id = ?", (chat_id,)) if chat_id is not None else ("", ())
    rows = store.query(
        "SELECT h.inbox_id, h.chat_id FROM spending_holds h JOIN bridge_inbox i "  # noqa: S608
        f"ON i.id = h.inbox_id WHERE i.status IN ('pending', 'running') {where} "
        "ORDER BY h.inbox_id",
        params,
    )
    return [(int(r[0]), int(r[1])) for r in rows]


def is_held(store: Store, inbox_id: int) -> bool:
    return bool(store.query("SELECT 1 FROM spending_holds WHERE inbox_id = ?", (inbox_id,)))


def release(store: Store, inbox_id: int) -> None:
    with store.transaction() as conn:
        conn.execute("DELETE FROM spending_holds WHERE inbox_id = ?", (inbox_id,))
