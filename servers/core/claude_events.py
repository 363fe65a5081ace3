"""Claude Code's stream-json output as typed events.

``claude -p --output-format stream-json --verbose`` prints one JSON object a line. Each line
becomes one or more events (an assistant message may hold several blocks). A line that is not
JSON, or has a shape this parser does not expect, becomes a ``MalformedLine``; valid JSON of an
unmodelled type becomes an ``UnknownEvent``: nothing is ever fatal, nothing is lost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class McpServerStatus:
    name: str
    status: str  # "connected", "failed", "needs-auth", "pending" …

    @property
    def connected(self) -> bool:
        return self.status == "connected"


@dataclass(frozen=True)
class InitEvent:
    session_id: str
    model: str
    tools: tuple[str, ...]
    mcp_servers: tuple[McpServerStatus, ...]

    @property
    def failed_servers(self) -> list[str]:
        return [server.name for server in self.mcp_servers if not server.connected]


@dataclass(frozen=True)
class TextEvent:
    """One block of assistant text (a whole block, not a token delta)."""

    text: str


@dataclass(frozen=True)
class ToolUseEvent:
    tool_use_id: str
    name: str
    input: dict[str, Any]


@dataclass(frozen=True)
class ToolResultEvent:
    tool_use_id: str
    content: str
    is_error: bool


@dataclass(frozen=True)
class PermissionDenialEvent:
    tool_name: str
    tool_use_id: str
    tool_input: dict[str, Any]


@dataclass(frozen=True)
class ApiRetryEvent:
    attempt: int
    max_retries: int
    retry_delay_ms: float
    error_status: int | None
    error: str


@dataclass(frozen=True)
class ResultEvent:
    subtype: str
    is_error: bool
    result: str
    session_id: str
    total_cost_usd: float
    num_turns: int
    duration_ms: float
    usage: dict[str, Any]
    api_error_status: int | None
    errors: tuple[str, ...]
    permission_denials: tuple[PermissionDenialEvent, ...]
    terminal_reason: str


@dataclass(frozen=True)
class UnknownEvent:
    """Valid JSON of a type this parser does not model; kept so nothing is lost."""

    data: dict[str, Any]


@dataclass(frozen=True)
class MalformedLine:
    line: str
    error: str


Event = (
    InitEvent
    | TextEvent
    | ToolUseEvent
    | ToolResultEvent
    | PermissionDenialEvent
    | ApiRetryEvent
    | ResultEvent
    | UnknownEvent
    | MalformedLine
)


def parse_stream_line(line: str) -> list[Event]:
    """Turn one stream-json line into events (an assistant message may hold several blocks)."""
    line = line.strip()
    if not line:
        return []
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        return [MalformedLine(line[:2_000], f"not JSON: {exc.msg}")]
    if not isinstance(data, dict):
        return [MalformedLine(line[:2_000], "not a JSON object")]
    try:
        return _parse_object(data)
    except (TypeError, ValueError, AttributeError) as exc:
        return [MalformedLine(line[:2_000], f"unexpected shape: {exc}")]


def _parse_object(data: dict[str, Any]) -> list[Event]:
    kind, subtype = data.get("type"), data.get("subtype")
    if kind == "system" and subtype == "init":
        servers = tuple(
            McpServerStatus(str(s.get("name", "")), str(s.get("status", "unknown")))
            for s in data.get("mcp_servers") or []
        )
        return [
            InitEvent(
                session_id=str(data.get("session_id", "")),
                model=str(data.get("model", "")),
                tools=tuple(str(t) for t in data.get("tools") or []),
                mcp_servers=servers,
            )
        ]
    if kind == "system" and subtype == "api_retry":
        return [
            ApiRetryEvent(
                attempt=int(data.get("attempt") or 0),
                max_retries=int(data.get("max_retries") or 0),
                retry_delay_ms=float(data.get("retry_delay_ms") or 0),
                error_status=_int_or_none(data.get("error_status")),
                error=str(data.get("error", "")),
            )
        ]
    if kind == "assistant":
        events: list[Event] = []
        for block in (data.get("message") or {}).get("content") or []:
            if block.get("type") == "text" and block.get("text"):
                events.append(TextEvent(str(block["text"])))
            elif block.get("type") == "tool_use":
                events.append(
                    ToolUseEvent(
                        str(block.get("id", "")),
                        str(block.get("name", "")),
                        dict(block.get("input") or {}),
                    )
                )
        return events or [UnknownEvent(data)]
    if kind == "user":
        content = (data.get("message") or {}).get("content")
        results: list[Event] = [
            ToolResultEvent(
                str(block.get("tool_use_id", "")),
                _block_text(block.get("content")),
                bool(block.get("is_error")),
            )
            for block in content or []
            if isinstance(block, dict) and block.get("type") == "tool_result"
        ]
        return results or [UnknownEvent(data)]
    if kind == "result":
        denials = tuple(
            PermissionDenialEvent(
                str(d.get("tool_name", "")),
                str(d.get("tool_use_id", "")),
                dict(d.get("tool_input") or {}),
            )
            for d in data.get("permission_denials") or []
        )
        result = ResultEvent(
            subtype=str(subtype or ""),
            is_error=bool(data.get("is_error")),
            result=str(data.get("result") or ""),
            session_id=str(data.get("session_id", "")),
            total_cost_usd=float(data.get("total_cost_usd") or 0.0),
            num_turns=int(data.get("num_turns") or 0),
            duration_ms=float(data.get("duration_ms") or 0.0),
            usage=dict(data.get("usage") or {}),
            api_error_status=_int_or_none(data.get("api_error_status")),
            errors=tuple(str(e) for e in data.get("errors") or []),
            permission_denials=denials,
            terminal_reason=str(data.get("terminal_reason") or ""),
        )
        return [*denials, result]
    return [UnknownEvent(data)]


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float | str) and str(value).isdigit() else None


def _block_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("text")
        )
    return ""
