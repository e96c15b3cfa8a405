"""The Responses API's response object and stream events, and the renderer from engine events to them.

A stream is: `response.created`, `response.in_progress`, then per output item `response.output_item.added`,
its content (`response.content_part.added`, `response.output_text.delta`… / `response.function_call_arguments
.delta`…), its `….done` events and `response.output_item.done`, and last `response.completed` (or
`response.incomplete` when `max_output_tokens` cut it, `error` + `response.failed` on a failure). Every event
carries a `sequence_number`. Text and tool calls come from the same internal events as on every other API.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field, model_serializer

from appliance.api.protocol.common import ResponseModel
from appliance.api.protocol.responses import ResponseRequest
from appliance.engine.types import Error, Event, Finish, Message, Token, ToolCall, ToolCallDelta, Usage

ItemStatus = Literal["in_progress", "completed", "incomplete"]

# -- the response object ----------------------------------------------------------------------------


class OutputText(ResponseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(ResponseModel):
    id: str
    type: Literal["message"] = "message"
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCall(ResponseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    status: ItemStatus
    call_id: str
    name: str
    arguments: str


OutputItem = OutputMessage | FunctionCall


class InputTokensDetails(ResponseModel):
    cached_tokens: int = Field(ge=0)
    cache_write_tokens: int = 0


class OutputTokensDetails(ResponseModel):
    reasoning_tokens: int = 0


class ResponseUsage(ResponseModel):
    input_tokens: int = Field(ge=0)
    input_tokens_details: InputTokensDetails
    output_tokens: int = Field(ge=0)
    output_tokens_details: OutputTokensDetails
    total_tokens: int = Field(ge=0)

    @classmethod
    def of(cls, u: Usage) -> ResponseUsage:
        return cls(
            input_tokens=u.prompt_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=u.cached_tokens),
            output_tokens=u.completion_tokens,
            output_tokens_details=OutputTokensDetails(),
            total_tokens=u.total_tokens,
        )


class ResponseError(ResponseModel):
    code: str = Field(description="server_error or rate_limit_exceeded")
    message: str


class IncompleteDetails(ResponseModel):
    reason: Literal["max_output_tokens"]


class Reasoning(ResponseModel):
    effort: None = None
    summary: None = None


class FunctionToolOut(ResponseModel):
    type: Literal["function"] = "function"
    name: str
    description: str | None
    parameters: dict[str, Any] | None
    strict: bool | None


class ResponseObject(ResponseModel):
    """A response: answered by POST (non-stream), carried by lifecycle events, returned by GET."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "failed", "in_progress", "incomplete"]
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: Reasoning = Field(default_factory=Reasoning)
    store: bool
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[FunctionToolOut]
    top_p: float
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None
    metadata: dict[str, str]

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> dict[str, Any]:
        """OpenAI leaves out `user`, and `usage` until the end, rather than sending null."""
        d = handler(self)
        for k in ("user", "usage"):
            if d.get(k) is None:
                d.pop(k, None)
        return d


class ResponseDeleted(ResponseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


# -- stream events ----------------------------------------------------------------------------------


class LifecycleEvent(ResponseModel):
    type: Literal[
        "response.created", "response.in_progress", "response.completed", "response.incomplete", "response.failed"
    ]
    sequence_number: int
    response: ResponseObject


class OutputItemEvent(ResponseModel):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: OutputItem


class ContentPartEvent(ResponseModel):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDeltaEvent(ResponseModel):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class TextDoneEvent(ResponseModel):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class ArgumentsDeltaEvent(ResponseModel):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(ResponseModel):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    sequence_number: int
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(ResponseModel):
    type: Literal["error"] = "error"
    sequence_number: int
    code: str | None
    message: str
    param: str | None


def _hex() -> str:
    return uuid.uuid4().hex


class ResponseRenderer:
    """Engine events of one response -> stream events, and the final `ResponseObject` (`final`), or the
    failure (`error`). Items put into events are copies: later deltas must not change what was sent."""

    def __init__(self, body: ResponseRequest, model: str):
        self.body, self.model = body, model
        self.id, self.created_at = f"resp_{_hex()}", int(time.time())
        self.items: list[OutputItem] = []
        self.text_item: OutputMessage | None = None  # the message item being written
        self.calls: dict[int, FunctionCall] = {}  # open function-call items by the engine's call index
        self.seq = 0
        self.final: ResponseObject | None = None
        self.error: Error | None = None

    def _ev(self, cls: type[BaseModel], **kw: Any) -> BaseModel:
        ev = cls(sequence_number=self.seq, **kw)
        self.seq += 1
        return ev

    def snapshot(self, status: str, usage: Usage | None = None, **kw: Any) -> ResponseObject:
        b = self.body
        choice = b.tool_choice if isinstance(b.tool_choice, str) else b.tool_choice.model_dump()
        return ResponseObject(
            id=self.id,
            created_at=self.created_at,
            status=status,  # type: ignore[arg-type]
            instructions=b.instructions,
            max_output_tokens=b.max_output_tokens,
            model=self.model,
            output=[i.model_copy(deep=True) for i in self.items],
            parallel_tool_calls=b.parallel_tool_calls,
            previous_response_id=b.previous_response_id,
            store=b.store,
            temperature=1.0 if b.temperature is None else b.temperature,
            text=b.format_echo(),
            tool_choice=choice,
            tools=[
                FunctionToolOut(name=t.name, description=t.description, parameters=t.parameters, strict=t.strict)
                for t in b.tools
            ],
            top_p=1.0 if b.top_p is None else b.top_p,
            usage=ResponseUsage.of(usage) if usage is not None else None,
            user=b.user,
            metadata=dict(b.metadata or {}),
            **kw,
        )

    def start(self) -> list[BaseModel]:
        return [
            self._ev(LifecycleEvent, type="response.created", response=self.snapshot("in_progress")),
            self._ev(LifecycleEvent, type="response.in_progress", response=self.snapshot("in_progress")),
        ]

    def _item_event(self, kind: str, index: int, item: OutputItem) -> BaseModel:
        return self._ev(
            OutputItemEvent, type=f"response.output_item.{kind}", output_index=index, item=item.model_copy(deep=True)
        )

    def _close_text(self, status: ItemStatus) -> list[BaseModel]:
        item, self.text_item = self.text_item, None
        if item is None:
            return []
        index, part = self.items.index(item), item.content[0]
        item.status = status
        return [
            self._ev(TextDoneEvent, item_id=item.id, output_index=index, content_index=0, text=part.text),
            self._ev(
                ContentPartEvent,
                type="response.content_part.done",
                item_id=item.id,
                output_index=index,
                content_index=0,
                part=part.model_copy(deep=True),
            ),
            self._item_event("done", index, item),
        ]

    def _close_calls(self, status: ItemStatus) -> list[BaseModel]:
        out: list[BaseModel] = []
        for call in self.calls.values():
            index = self.items.index(call)
            call.status = status
            out.append(
                self._ev(
                    ArgumentsDoneEvent, item_id=call.id, output_index=index, name=call.name, arguments=call.arguments
                )
            )
            out.append(self._item_event("done", index, call))
        self.calls.clear()
        return out

    def event(self, ev: Event) -> list[BaseModel]:
        if isinstance(ev, Token):
            return self._text(ev.text)
        if isinstance(ev, ToolCallDelta):
            return self._call(ev)
        if isinstance(ev, Finish):
            status: ItemStatus = "incomplete" if ev.reason == "length" else "completed"
            out = self._close_text(status) + self._close_calls(status)
            incomplete = IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None
            self.final = self.snapshot(status, ev.usage, completed_at=int(time.time()), incomplete_details=incomplete)
            return [*out, self._ev(LifecycleEvent, type=f"response.{status}", response=self.final)]
        self.error = ev
        code = "rate_limit_exceeded" if ev.status == 429 else "server_error"
        failed = self.snapshot("failed", error=ResponseError(code=code, message=ev.message))
        return [
            self._ev(ErrorEvent, code=ev.code, message=ev.message, param=ev.param),
            self._ev(LifecycleEvent, type="response.failed", response=failed),
        ]

    def _text(self, text: str) -> list[BaseModel]:
        if not text:
            return []
        out: list[BaseModel] = []
        if self.text_item is None:
            out += self._close_calls("completed")
            item = OutputMessage(id=f"msg_{_hex()}", status="in_progress", content=[])
            self.items.append(item)
            index = len(self.items) - 1
            out.append(self._item_event("added", index, item))
            item.content.append(OutputText(text=""))
            out.append(
                self._ev(
                    ContentPartEvent,
                    type="response.content_part.added",
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    part=OutputText(text=""),
                )
            )
            self.text_item = item
        item = self.text_item
        item.content[0].text += text
        out.append(
            self._ev(TextDeltaEvent, item_id=item.id, output_index=self.items.index(item), content_index=0, delta=text)
        )
        return out

    def _call(self, ev: ToolCallDelta) -> list[BaseModel]:
        out = self._close_text("completed")
        call = self.calls.get(ev.index)
        if call is None:
            call = FunctionCall(
                id=f"fc_{_hex()}",
                status="in_progress",
                call_id=ev.id or f"call_{_hex()[:24]}",
                name=ev.name or "",
                arguments="",
            )
            self.calls[ev.index] = call
            self.items.append(call)
            out.append(self._item_event("added", len(self.items) - 1, call))
        if ev.arguments:
            call.arguments += ev.arguments
            out.append(
                self._ev(ArgumentsDeltaEvent, item_id=call.id, output_index=self.items.index(call), delta=ev.arguments)
            )
        return out


def output_messages(output: list[OutputItem]) -> list[Message]:
    """A response's output as conversation turns, for a later `previous_response_id`: text and the calls
    after it form one assistant turn."""
    out: list[Message] = []
    for item in output:
        if isinstance(item, OutputMessage):
            out.append(Message("assistant", "".join(p.text for p in item.content)))
            continue
        call = ToolCall(item.call_id, item.name, item.arguments)
        if out and out[-1].role == "assistant":
            out[-1].tool_calls = [*(out[-1].tool_calls or []), call]
        else:
            out.append(Message("assistant", "", tool_calls=[call]))
    return out
