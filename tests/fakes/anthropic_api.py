"""Fake Anthropic Messages API, good enough for the real Claude Code CLI in `-p` mode.

A responder turns a request into the assistant's content blocks:

    fake.responder = reply_with("Hello")
    fake.responder = call_tool("mcp__notion-tools__query_notion_projects", {}, "Found: {result}")
    fake.responder = Script([ToolUse("Bash", {"command": "echo hi"}), "done"])

Steps count per turn (from the latest human prompt), so `--resume` runs start the script over.
When Claude Code defers a tool behind ToolSearch (its default for MCP tools;
ENABLE_TOOL_SEARCH=false turns that off), scripts emit the ToolSearch lookup first and the
real call on the next request.
Requests without tools and without Claude Code's identity in the system prompt count as side
requests (titles, checks); `side_responder` answers those.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .base import FakeService, RecordedRequest, Reply, sse

TOOL_SEARCH = "ToolSearch"
FINISHED = "(fake script finished)"


@dataclass
class Text:
    text: str


@dataclass
class ToolUse:
    name: str
    input: dict[str, Any] = field(default_factory=dict)
    id: str | None = None  # None: a fresh id per reply (Claude Code breaks on reused ids)


Block = Text | ToolUse
Responder = Callable[[dict[str, Any]], "Sequence[Block] | Block | str"]


def mcp_tool(server: str, tool: str) -> str:
    """Claude Code's name for an MCP tool."""
    return f"mcp__{server}__{tool}"


# -- reading a request ---------------------------------------------------------------------------
def tool_names(request: dict[str, Any]) -> list[str]:
    return [tool.get("name", "") for tool in request.get("tools") or []]


def system_text(request: dict[str, Any]) -> str:
    system = request.get("system") or ""
    if isinstance(system, str):
        return system
    return "\n".join(block.get("text", "") for block in system)


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    return [{"type": "text", "text": content}] if isinstance(content, str) else content or []


AGENT_IDENTITY = ("Claude Agent SDK", "You are Claude Code")


def is_main_conversation(request: dict[str, Any]) -> bool:
    """The agent loop offers tools (or, with `--tools ""`, still states its identity)."""
    system = system_text(request)
    return bool(request.get("tools")) or any(marker in system for marker in AGENT_IDENTITY)


def _is_human_turn(message: dict[str, Any]) -> bool:
    blocks = _blocks(message)
    return message.get("role") == "user" and not any(b.get("type") == "tool_result" for b in blocks)


def _only_tool_search(message: dict[str, Any]) -> bool:
    uses = [b for b in _blocks(message) if b.get("type") == "tool_use"]
    return bool(uses) and all(b.get("name") == TOOL_SEARCH for b in uses)


def current_turn(request: dict[str, Any]) -> list[dict[str, Any]]:
    """Messages since the latest human prompt (that prompt included)."""
    messages = request.get("messages") or []
    starts = [i for i, m in enumerate(messages) if _is_human_turn(m)]
    return messages[starts[-1] :] if starts else messages


def turn_text(request: dict[str, Any]) -> str:
    """All text of the current turn: the prompt, Claude Code's reminders and the hook context
    (UserPromptSubmit `additionalContext` arrives in a role "system" message)."""
    blocks = [b for m in current_turn(request) for b in _blocks(m)]
    return "\n".join(b.get("text", "") for b in blocks if b.get("type") == "text")


def steps_taken(request: dict[str, Any]) -> int:
    """Assistant replies so far in this turn, not counting automatic ToolSearch lookups."""
    turn = current_turn(request)
    return sum(1 for m in turn if m.get("role") == "assistant" and not _only_tool_search(m))


def tool_result_text(result_block: dict[str, Any]) -> str:
    content = result_block.get("content")
    if isinstance(content, str):
        return content
    return "\n".join(b.get("text", "") for b in content or [] if b.get("type") == "text")


def last_tool_results(request: dict[str, Any]) -> dict[str, str]:
    """Tool name -> result text, for the results in the latest user message."""
    messages = [m for m in request.get("messages") or [] if m.get("role") != "system"]
    if not messages or messages[-1].get("role") != "user":
        return {}
    names = {
        block.get("id"): block.get("name")
        for message in messages
        for block in _blocks(message)
        if block.get("type") == "tool_use"
    }
    return {
        names.get(b.get("tool_use_id"), b.get("tool_use_id")): tool_result_text(b)
        for b in _blocks(messages[-1])
        if b.get("type") == "tool_result"
    }


def last_tool_result(request: dict[str, Any]) -> str:
    return "\n".join(last_tool_results(request).values())


# -- scripts ---------------------------------------------------------------------------------------
def _as_blocks(value: Sequence[Block] | Block | str) -> list[Block]:
    if isinstance(value, str):
        return [Text(value)]
    if isinstance(value, Text | ToolUse):
        return [value]
    return list(value)


def with_tool_search(request: dict[str, Any], blocks: list[Block]) -> list[Block]:
    """If a tool is deferred behind ToolSearch, look it up first (the call follows next request)."""
    offered = set(tool_names(request))
    if TOOL_SEARCH not in offered:
        return blocks
    missing = [b.name for b in blocks if isinstance(b, ToolUse) and b.name not in offered]
    if not missing:
        return blocks
    query = "select:" + ",".join(missing)
    searched = [
        b.get("input", {}).get("query")
        for m in current_turn(request)
        for b in _blocks(m)
        if b.get("type") == "tool_use" and b.get("name") == TOOL_SEARCH
    ]
    if query in searched:  # the lookup found nothing: call anyway, Claude Code reports the error
        return blocks
    return [ToolUse(TOOL_SEARCH, {"query": query, "max_results": len(missing)})]


def reply_with(text: str) -> Responder:
    return lambda request: [Text(text)]


class Script:
    """Step n answers the n-th model call of the current turn (the turn starts at the latest
    human prompt, so a resumed session starts over); past the last step it ends the turn.

    A step is a str, a block, a list of blocks, or `callable(request) -> any of those`.
    Tool calls to deferred (ToolSearch) tools get the lookup inserted automatically.
    """

    def __init__(self, steps: Sequence[Any]) -> None:
        self.steps = list(steps)

    def __call__(self, request: dict[str, Any]) -> list[Block]:
        taken = steps_taken(request)
        step = self.steps[taken] if taken < len(self.steps) else FINISHED
        if callable(step):
            step = step(request)
        return with_tool_search(request, _as_blocks(step))


def call_tool(
    name: str, tool_input: dict[str, Any] | None = None, answer: str = "{result}"
) -> Script:
    """Call one tool, then answer with `answer` formatted with the tool's result text."""
    return Script(
        [
            ToolUse(name, tool_input or {}),
            lambda request: Text(answer.format(result=last_tool_result(request))),
        ]
    )


# -- the fake --------------------------------------------------------------------------------------
class FakeAnthropic(FakeService):
    model = "claude-opus-5-5"

    def __init__(self, required_api_key: str | None = None) -> None:
        super().__init__(required_api_key)
        self.responder: Responder = reply_with("Hello from the fake model.")
        self.side_responder: Responder = reply_with("OK")
        self.route("POST", r"/v1/messages", self._messages)
        self.route("POST", r"/v1/messages/count_tokens", self._count_tokens)
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            self.route(method, r"/(?!v1/messages).*", lambda request: {})  # benign for the rest

    def error_body(self, status: int, message: str) -> Any:
        kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            429: "rate_limit_error",
            529: "overloaded_error",
        }.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}

    # -- recorded traffic, decoded -----------------------------------------------------------
    @property
    def message_requests(self) -> list[dict[str, Any]]:
        return [r.json() for r in self.requests_to(r"/v1/messages", "POST")]

    @property
    def main_requests(self) -> list[dict[str, Any]]:
        return [body for body in self.message_requests if is_main_conversation(body)]

    # -- handlers ----------------------------------------------------------------------------
    def _messages(self, request: RecordedRequest) -> Reply | dict[str, Any]:
        body = request.json() or {}
        responder = self.responder if is_main_conversation(body) else self.side_responder
        blocks = _fresh_ids(_as_blocks(responder(body)))
        message = {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model") or self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": _estimate_tokens(body),
                "output_tokens": 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
        stop_reason = "tool_use" if any(isinstance(b, ToolUse) for b in blocks) else "end_turn"
        output_tokens = sum(_estimate_tokens(_wire(b)) for b in blocks) or 1
        if not body.get("stream"):
            message["content"] = [_wire(b) for b in blocks]
            message["stop_reason"] = stop_reason
            message["usage"]["output_tokens"] = output_tokens
            return message
        return sse(_stream_events(message, blocks, stop_reason, output_tokens))

    def _count_tokens(self, request: RecordedRequest) -> dict[str, Any]:
        return {"input_tokens": _estimate_tokens(request.json() or {})}


def _wire(block: Block) -> dict[str, Any]:
    if isinstance(block, Text):
        return {"type": "text", "text": block.text}
    return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}


def _fresh_ids(blocks: list[Block]) -> list[Block]:
    return [
        replace(b, id=f"toolu_{uuid.uuid4().hex[:24]}")
        if isinstance(b, ToolUse) and not b.id
        else b
        for b in blocks
    ]


def _estimate_tokens(value: Any) -> int:
    return max(1, len(json.dumps(value)) // 4)


def _halves(text: str) -> list[str]:
    middle = len(text) // 2
    return [part for part in (text[:middle], text[middle:]) if part]


def _stream_events(message: dict[str, Any], blocks: list[Block], stop_reason: str, tokens: int):
    yield "message_start", {"type": "message_start", "message": message}
    yield "ping", {"type": "ping"}
    for index, block in enumerate(blocks):
        if isinstance(block, Text):
            start = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": part} for part in _halves(block.text)]
        else:
            start = {"type": "tool_use", "id": block.id, "name": block.name, "input": {}}
            payload = json.dumps(block.input)
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in _halves(payload)]
        yield (
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": start},
        )
        for delta in deltas:
            yield (
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            )
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": tokens},
        },
    )
    yield "message_stop", {"type": "message_stop"}
