"""OpenAI's Responses API (`POST /v1/responses`): request models and their translation to the internal request.

`input` is a string or a list of items: messages (with or without `"type": "message"`), `function_call` items
(the model's earlier calls) and `function_call_output` items (their results). With `previous_response_id`
the stored conversation of that response comes first (api/response_store.py). The response and stream-event
models and the renderer are in api/protocol/responses_out.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from appliance.api.protocol.common import RequestModel, client_error
from appliance.engine.types import GenerateRequest, Message, OutputFormat, SamplingParams, Tool, ToolCall, ToolChoice

MAX_ITEMS = 4096  # input items per request (the body limit bounds their text)
MAX_TOOLS = 128  # OpenAI's own bound on tools per request
MAX_METADATA = 16  # OpenAI: at most 16 metadata pairs
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"

# -- input items ------------------------------------------------------------------------------------


class TextPart(RequestModel):
    """Text in an input message; `output_text` is what earlier assistant output items carry."""

    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(RequestModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_ITEMS)]
    id: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(RequestModel):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    arguments: str
    id: str | None = None


class FunctionCallOutputItem(RequestModel):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | Annotated[list[TextPart], Field(max_length=MAX_ITEMS)]
    id: str | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


def _item_kind(v: Any) -> str | None:
    """Items without `type` are messages (OpenAI's "easy input message")."""
    if isinstance(v, dict):
        return v.get("type", "message")
    return getattr(v, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_kind),
]

# -- tools and formats ------------------------------------------------------------------------------


class FunctionTool(RequestModel):
    """The only tool type served here (web search, file search and the like are OpenAI's hosted tools)."""

    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(RequestModel):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)


ToolChoiceParam = Literal["none", "auto", "required"] | NamedFunction


class FormatText(RequestModel):
    type: Literal["text"]


class FormatJSONObject(RequestModel):
    type: Literal["json_object"]


class FormatJSONSchema(RequestModel):
    """Flat in the Responses API (chat nests these under `json_schema`)."""

    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    schema_: dict[str, Any] = Field(alias="schema", description="a JSON schema the output must match")
    description: str | None = None
    strict: bool | None = None


class TextConfig(RequestModel):
    format: Annotated[FormatText | FormatJSONObject | FormatJSONSchema, Field(discriminator="type")] | None = None


# -- the request ------------------------------------------------------------------------------------


class ResponseRequest(RequestModel):
    model: str = Field("default", min_length=1, examples=["default"])
    input: str | Annotated[list[InputItem], Field(max_length=MAX_ITEMS)] | None = None
    instructions: str | None = None
    previous_response_id: str | None = Field(None, max_length=128)
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] = Field(default_factory=list)
    tool_choice: ToolChoiceParam = "auto"
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    stream: bool = False
    store: bool = Field(True, description="keep the response for GET and previous_response_id (per API key)")
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=MAX_METADATA)] | None = None
    user: str | None = None

    def format_echo(self) -> dict[str, Any]:
        """`text` as the response echoes it."""
        fmt = self.text.format if self.text is not None else None
        if fmt is None:
            return {"format": {"type": "text"}}
        return {"format": fmt.model_dump(by_alias=True, exclude_none=True)}


def output_format(body: ResponseRequest) -> OutputFormat | None:
    fmt = body.text.format if body.text is not None else None
    if fmt is None or isinstance(fmt, FormatText):
        return None
    if isinstance(fmt, FormatJSONObject):
        return OutputFormat("json_object")
    return OutputFormat("json_schema", fmt.schema_ or {"type": "object"}, fmt.name)


def _tool_choice(body: ResponseRequest) -> ToolChoice:
    choice = body.tool_choice
    if isinstance(choice, NamedFunction):
        if choice.name not in {t.name for t in body.tools}:
            raise client_error(
                400, f"tool_choice names '{choice.name}', which is not in 'tools'.", "invalid_value", "tool_choice"
            )
        return ToolChoice("function", choice.name)
    if choice == "required" and not body.tools:
        raise client_error(400, "tool_choice 'required' needs at least one tool.", "invalid_value", "tool_choice")
    return ToolChoice(choice)


def input_messages(body: ResponseRequest, context: list[Message]) -> list[Message]:
    """The request's `input` as internal messages; a function call joins the assistant turn before it."""
    if body.input is None:
        return []
    if isinstance(body.input, str):
        return [Message("user", body.input)]
    names = {c.id: c.name for m in context for c in m.tool_calls or []}
    out: list[Message] = []
    for item in body.input:
        if isinstance(item, MessageItem):
            out.append(Message(item.role, item.text()))
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(item.call_id, item.name, item.arguments)
            names[item.call_id] = item.name
            last = out[-1] if out else None
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                out.append(Message("assistant", "", tool_calls=[call]))
        else:
            out.append(Message("tool", item.text(), tool_call_id=item.call_id, name=names.get(item.call_id)))
    return out


def generate_request(
    body: ResponseRequest, context: list[Message], **caller: Any
) -> tuple[GenerateRequest, list[Message]]:
    """The internal request, and the conversation so far (context + this input, without `instructions`,
    which OpenAI does not carry over to a chained response)."""
    convo = context + input_messages(body, context)
    if not convo:
        raise client_error(400, "Missing required parameter: 'input'.", None, "input")
    messages = ([Message("system", body.instructions)] if body.instructions else []) + convo
    params = SamplingParams(max_tokens=body.max_output_tokens, output=output_format(body))
    if body.temperature is not None:
        params.temperature = body.temperature
    if body.top_p is not None:
        params.top_p = body.top_p
    tools = [
        Tool(t.name, t.description or "", t.parameters or {"type": "object", "properties": {}}) for t in body.tools
    ]
    req = GenerateRequest(
        model=body.model,
        messages=messages,
        params=params,
        user=body.user,
        tools=tools,
        tool_choice=_tool_choice(body),
        parallel_tool_calls=body.parallel_tool_calls,
        **caller,
    )
    return req, convo
