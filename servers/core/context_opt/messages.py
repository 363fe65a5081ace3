"""Reading messages: the text a model sees for a message, and the tool calls it makes or answers.

Messages are chat messages ({role, content, name, timestamp}); content is text or a list of
content blocks (text, tool_use, tool_result), and OpenAI-style ``tool_calls`` are read too. Also
the errors every part of the package raises for input it cannot use.
"""

from __future__ import annotations

import json

MESSAGE_OVERHEAD_TOKENS = 4  # role and delimiters around every message
VALID_ROLES = frozenset({"system", "user", "assistant", "tool"})


class ContextInputError(ValueError):
    """The messages or the budget cannot be used; the text says what to change."""


class ContextBudgetError(ContextInputError):
    """The budget cannot hold what must never be dropped."""


def message_text(message: dict) -> str:
    """The text a model sees for a message, with tool calls and results rendered inline."""
    content = message.get("content")
    if type(content) is str and "tool_calls" not in message:
        return content
    parts: list[str] = []
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, list):
        parts.extend(_block_text(block) for block in content)
    elif content is not None:
        raise ContextInputError("A message's content must be text or a list of content blocks.")
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        parts.append(f"[tool call {function.get('name')}({function.get('arguments', '')})]")
    return "\n".join(part for part in parts if part)


def _block_text(block: object) -> str:
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        raise ContextInputError("Content blocks must be objects with a 'type'.")
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text", ""))
    if kind == "tool_use":
        arguments = json.dumps(block.get("input"), ensure_ascii=False, sort_keys=True)
        return f"[tool call {block.get('name')}({arguments})]"
    if kind == "tool_result":
        inner = block.get("content")
        text = inner if isinstance(inner, str) else "\n".join(map(_block_text, inner or ()))
        return f"[tool result{' (error)' if block.get('is_error') else ''}] {text}"
    return f"[{kind}]"


def _calls(message: dict) -> dict[str, str]:
    """Tool call id -> identity (name and arguments) for the calls a message makes."""
    found = {}
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        found[str(call.get("id"))] = f"{function.get('name')}|{function.get('arguments')}"
    content = message.get("content")
    if isinstance(content, list):
        for block in content:
            if isinstance(block, dict) and block.get("type") == "tool_use":
                identity = json.dumps(block.get("input"), sort_keys=True, ensure_ascii=False)
                found[str(block.get("id"))] = f"{block.get('name')}|{identity}"
    return found


def _answers(message: dict) -> set[str]:
    """Ids of the tool calls a message carries results for."""
    if message.get("role") == "tool":
        return {str(message.get("tool_call_id"))}
    content = message.get("content")
    if isinstance(content, list):
        return {
            str(block.get("tool_use_id"))
            for block in content
            if isinstance(block, dict) and block.get("type") == "tool_result"
        }
    return set()
