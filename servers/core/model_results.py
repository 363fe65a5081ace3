"""How a tool's result reads to the model that receives it first.

Claude Code forwards a tool's structured content to the model as JSON, in place of the text, so
every Valor result follows the same rules (tests/test_model_results.py checks each tool):

- times are ISO 8601 strings with their offset (UTC), never Unix numbers (``iso_time``);
- a raw number a person would read keeps its field and gets a human reading beside it, described
  in the output schema as "<raw field>, readable" (or "... as a percentage"): mostly the raw
  name without its unit, ``rss_bytes`` -> ``rss`` "110 MB", ``age_seconds`` -> ``age`` "3 min
  20 s", a rate -> a percentage (``bytes_text``, ``duration_text``, ``percent_text``: pydantic
  computed fields, so they appear in the output schema and in every client's copy);
- a list cut at its limit says so: ``truncated`` true and ``how_to_see_more`` naming the
  arguments that narrow or widen the query (``more_note``).

The text content FastMCP sends beside it is the same JSON, so clients that show text read the
same fields.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import computed_field

_BYTE_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")


def iso_time(timestamp: float | None, *, minutes: bool = False) -> str | None:
    """Unix seconds as ISO 8601 in UTC with its offset, to the second (None stays None).

    ``minutes``: the compact form for lines of text a model reads, "2026-11-30 07:05 UTC"
    (the zone named once per stamp, no seconds)."""
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    if minutes:
        return moment.strftime("%Y-%m-%d %H:%M UTC")
    return moment.isoformat(timespec="seconds")


def human_bytes(count: float | None) -> str | None:
    """A size as a person reads it: decimal units (1 kB = 1,000 bytes), one decimal below 10."""
    if count is None:
        return None
    value = float(count)
    for unit in _BYTE_UNITS:
        if abs(value) < 1000 or unit == _BYTE_UNITS[-1]:
            break
        value /= 1000
    if unit == "B":
        return f"{int(value)} B"
    return f"{value:.1f} {unit}" if abs(value) < 10 else f"{value:.0f} {unit}"


def human_duration(seconds: float | None) -> str | None:
    """A duration as a person reads it: "850 ms", "4.2 s", "3 min 20 s", "2 h 5 min", "3 d 4 h"."""
    if seconds is None:
        return None
    seconds = max(0.0, float(seconds))
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    whole = round(seconds)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{minutes} min {secs} s" if secs else f"{minutes} min"


def human_percent(fraction: float | None) -> str | None:
    """A fraction (0.875) as a percentage ("87.5%"); 3.85 reads "385%"."""
    if fraction is None:
        return None
    percent = fraction * 100
    return (
        f"{percent:.0f}%" if percent == int(percent) or abs(percent) >= 100 else f"{percent:.1f}%"
    )


def _reading(field: str, convert: Any, scale: float, description: str) -> Any:
    def read(self: Any) -> str | None:
        value = getattr(self, field)
        return convert(None if value is None else value * scale)

    read.__name__ = f"read_{field}"
    return computed_field(property(read), return_type=str | None, description=description)


def bytes_text(field: str) -> Any:
    """A computed field reading ``field`` (bytes) as "1.2 MB"; assign it to ``<name>``."""
    return _reading(field, human_bytes, 1, f"{field}, readable")


def duration_text(field: str, unit: str = "seconds") -> Any:
    """A computed field reading ``field`` (in ``unit``: seconds, hours or ms) as "3 min 20 s"."""
    scale = {"seconds": 1, "hours": 3600, "ms": 0.001}[unit]
    return _reading(field, human_duration, scale, f"{field}, readable")


def percent_text(field: str) -> Any:
    """A computed field reading ``field`` (a fraction) as a percentage."""
    return _reading(field, human_percent, 1, f"{field} as a percentage")


def more_note(shown: int, more: bool, how: str) -> str | None:
    """What a list result says when it stopped before the end: how many it shows and how to get
    at the rest (``how``: the arguments that narrow or widen the query). None when all shown."""
    if not more:
        return None
    return f"Only the first {shown} are shown; more match. {how}"
