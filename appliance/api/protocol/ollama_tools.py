"""Ollama's tool-calling shapes for /api/chat: calls with object arguments, `tool_name` turns, and the
appliance's `options.tool_choice` extension; pure translations to and from the internal types."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from pydantic import Field

from appliance.api.protocol.common import RequestModel, client_error
from appliance.api.protocol.openai_tools import FunctionName
from appliance.engine import types as core


class FunctionCall(RequestModel):
    name: FunctionName
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(RequestModel):
    """Ollama's shape of a call: arguments are an object, not JSON text."""

    function: FunctionCall


class _Turn(Protocol):  # ollama.ChatMessage
    role: Any
    content: str
    tool_calls: Sequence[ToolCall] | None
    tool_name: str | None


def messages_of(msgs: Sequence[_Turn]) -> list[core.Message]:
    """Ollama has no call ids: each call gets one, and a tool turn answers the oldest open call of its
    function (or the oldest open call)."""
    out: list[core.Message] = []
    open_calls: list[core.ToolCall] = []
    for i, m in enumerate(msgs):
        calls = [
            core.ToolCall(f"call_{i}_{j}", c.function.name, json.dumps(c.function.arguments))
            for j, c in enumerate(m.tool_calls or [])
        ]
        open_calls += calls
        call_id = None
        if m.role == "tool" and open_calls:
            match = next((c for c in open_calls if c.name == m.tool_name), open_calls[0])
            open_calls.remove(match)
            call_id = match.id
        out.append(core.Message(m.role, m.content, calls or None, call_id, m.tool_name))
    return out


def tool_choice(requested: str | None, tools: list[core.Tool]) -> core.ToolChoice:
    """Ollama has no tool_choice: the model decides (`auto`), unless `options.tool_choice` (an appliance
    extension the `ollama` client passes through) asks for `required`, `none` or a tool by name."""
    choice = requested or "auto"
    if choice in ("auto", "required", "none"):
        if choice == "required" and not tools:
            raise client_error(400, "options.tool_choice is 'required' but no tools were given", param="options")
        return core.ToolChoice(choice)  # type: ignore[arg-type]
    if choice not in {t.name for t in tools}:
        raise client_error(400, f"options.tool_choice names no tool in 'tools': {choice!r}", param="options")
    return core.ToolChoice("function", choice)


def calls_out(calls: list[core.ToolCall]) -> list[ToolCall]:
    """Calls in Ollama's shape (arguments that are not a JSON object become {})."""
    out = []
    for c in calls:
        try:
            args = json.loads(c.arguments or "{}")
        except ValueError:
            args = {}
        out.append(ToolCall(function=FunctionCall(name=c.name, arguments=args if isinstance(args, dict) else {})))
    return out
