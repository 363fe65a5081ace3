"""Loopback fakes of the external HTTP services Valor talks to (see README.md here)."""

from .anthropic_api import (
    FakeAnthropic,
    Script,
    Text,
    ToolUse,
    call_tool,
    is_main_conversation,
    last_tool_result,
    last_tool_results,
    mcp_tool,
    reply_with,
    system_text,
    tool_names,
    turn_text,
)
from .base import FakeService, RecordedRequest, Reply, sse
from .notion_api import FakeNotion
from .openai_api import FakeOpenAI, tiny_png

__all__ = [
    "FakeAnthropic",
    "FakeNotion",
    "FakeOpenAI",
    "FakeService",
    "RecordedRequest",
    "Reply",
    "Script",
    "Text",
    "ToolUse",
    "call_tool",
    "is_main_conversation",
    "last_tool_result",
    "last_tool_results",
    "mcp_tool",
    "reply_with",
    "sse",
    "system_text",
    "tiny_png",
    "tool_names",
    "turn_text",
]
