"""OpenAI's wire shapes for tool calling and structured outputs (shared by the chat API and, in Ollama's
dialect, /api/chat's `tools`): function definitions, `tool_choice`, calls in the history, calls in responses
and stream deltas, `response_format`; and their pure translations to and from the internal types.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from appliance.api.protocol.common import OmitNone, RequestModel, ResponseModel, client_error
from appliance.engine.types import Message, OutputFormat, Tool, ToolCall, ToolCallDelta, ToolChoice

MAX_TOOLS = 128  # OpenAI's own bound on tools per request
MAX_TOOL_SCHEMA_BYTES = 64 * 1024  # one function's parameters schema, as JSON
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionCall(RequestModel):
    name: FunctionName
    arguments: str = Field(max_length=MAX_TOOL_SCHEMA_BYTES, description="the arguments, as JSON text")


class MessageToolCall(RequestModel):
    """A call an earlier assistant turn made (in the history)."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: Annotated[list[MessageToolCall], Field(max_length=MAX_TOOLS)] | None = None  # assistant turns
    tool_call_id: str | None = Field(None, max_length=256, description="tool turns: the call answered")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


def messages_of(msgs: list[ChatMessage]) -> list[Message]:
    """Chat messages as internal ones; a tool turn gets its function's name from the call it answers."""
    out: list[Message] = []
    names: dict[str, str] = {}
    for m in msgs:
        calls = [ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or []] or None
        names.update({c.id: c.name for c in calls or []})
        name = names.get(m.tool_call_id or "", m.name) if m.role == "tool" else None
        out.append(Message(m.role, m.text(), tool_calls=calls, tool_call_id=m.tool_call_id, name=name))
    return out


class FunctionDef(RequestModel):
    name: FunctionName
    description: str = Field("", max_length=8192)
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema for the arguments (an object)")
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and len(json.dumps(v)) > MAX_TOOL_SCHEMA_BYTES:
            raise ValueError(f"the schema is larger than {MAX_TOOL_SCHEMA_BYTES} bytes")
        return v


class ToolDef(RequestModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(RequestModel):
    name: FunctionName


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


def tools_of(tools: list[ToolDef] | None) -> list[Tool]:
    out = [Tool(t.function.name, t.function.description, t.function.parameters or {}) for t in tools or []]
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise client_error(400, f"Invalid 'tools': the function name '{dup}' is used twice.", "invalid_value", "tools")
    return out


def tool_choice_of(choice: str | NamedToolChoice | None, tools: list[Tool]) -> ToolChoice:
    """`tool_choice` as the internal choice; a 400 (param tool_choice) for a function that is not in `tools`."""
    if choice is None:
        return ToolChoice("auto")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in {t.name for t in tools}:
            raise client_error(
                400,
                f"Invalid value for 'tool_choice': no function named '{choice.function.name}' in 'tools'.",
                "invalid_value",
                "tool_choice",
            )
        return ToolChoice("function", choice.function.name)
    if choice == "required" and not tools:
        raise client_error(
            400, "'tool_choice' is 'required' but no 'tools' were given.", "invalid_value", "tool_choice"
        )
    return ToolChoice(choice)  # type: ignore[arg-type]


class FunctionCallOut(ResponseModel):
    name: str
    arguments: str = Field(description="JSON text, as the model wrote it")


class ToolCallOut(ResponseModel):
    id: str = Field(description="call_…")
    type: Literal["function"] = "function"
    function: FunctionCallOut


class DeltaFunction(OmitNone):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(OmitNone):
    """A fragment of tool call `index`: the first has id, type and name (and empty arguments), later ones
    pieces of the arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


def calls_out(calls: list[ToolCall] | None) -> list[ToolCallOut]:
    return [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls or []]


def delta_out(ev: ToolCallDelta) -> DeltaToolCall:
    fn = DeltaFunction(name=ev.name, arguments=ev.arguments)
    return DeltaToolCall(index=ev.index, id=ev.id, type="function" if ev.id else None, function=fn)


# -- structured outputs ---------------------------------------------------------------------------


class ResponseFormatText(RequestModel):
    type: Literal["text"]


class ResponseFormatJSONObject(RequestModel):
    type: Literal["json_object"]


class JSONSchemaFormat(RequestModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="a JSON schema the output must match")
    strict: bool | None = None


class ResponseFormatJSONSchema(RequestModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema, Field(discriminator="type")
]


def output_format(rf: ResponseFormat | None) -> OutputFormat | None:
    """`response_format` as the internal output format: decoding is constrained by a grammar."""
    if rf is None or isinstance(rf, ResponseFormatText):
        return None
    if isinstance(rf, ResponseFormatJSONObject):
        return OutputFormat("json_object")
    spec = rf.json_schema
    return OutputFormat("json_schema", spec.schema_ or {"type": "object"}, spec.name)
