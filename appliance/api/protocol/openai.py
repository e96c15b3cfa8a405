"""OpenAI's wire format: request, response, stream-chunk and error models, and pure translations.

Requests become the internal `GenerateRequest`; engine events become responses or chunks. Nothing here
touches HTTP: the handlers in api/openai.py parse, call these, and frame the result.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_serializer

from appliance.api.protocol.common import OmitNone, RequestModel, ResponseModel, Stops, client_error
from appliance.api.protocol.openai_embeddings import (  # noqa: F401 (re-exported: wire.Embedding*)
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
)
from appliance.api.protocol.openai_logprobs import (
    ChatLogprobs,
    CompletionLogprobs,
    CompletionOffsets,
    chat_logprobs,
    logit_bias_of,
    valid_logit_bias,
)
from appliance.api.protocol.openai_tools import (  # noqa: F401 (re-exported: wire.ResponseFormat*, ...)
    MAX_TOOLS,
    ChatMessage,
    DeltaToolCall,
    JSONSchemaFormat,
    NamedToolChoice,
    ResponseFormat,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    ResponseFormatText,
    TextPart,
    ToolCallOut,
    ToolDef,
    calls_out,
    delta_out,
    messages_of,
    output_format,
    tool_choice_of,
    tools_of,
)
from appliance.engine.types import (
    Error,
    Event,
    Finish,
    GenerateRequest,
    SamplingParams,
    Token,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    Usage,
)

# -- errors ---------------------------------------------------------------------------------------


class ErrorDetail(ResponseModel):
    message: str
    type: str = Field(description="invalid_request_error, server_error, or for 429: requests, tokens, streams")
    param: str | None
    code: str | None = Field(description="e.g. invalid_api_key, rate_limit_exceeded, model_not_found, queue_full")


class ErrorResponse(ResponseModel):
    """Every error the appliance answers on its OpenAI routes (and mid-stream, as an SSE event)."""

    error: ErrorDetail

    @classmethod
    def of(cls, err: Error) -> ErrorResponse:
        return cls(error=ErrorDetail(message=err.message, type=err.type, param=err.param, code=err.code))


# -- requests -------------------------------------------------------------------------------------


class StreamOptions(RequestModel):
    include_usage: bool = False


Stop = Stops


class SamplingFields(RequestModel):
    """The fields chat and text completions share."""

    model: str = Field(min_length=1, examples=["default"])
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Stop = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    n: int | None = Field(None, ge=1, le=64, description="choices, generated at once: at most the model's slots")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (a string) -> bias in -100..100 added to its logit; at most 300 entries"
    )

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias(cls, v: Any) -> Any:
        return valid_logit_bias(v)

    def logprobs_k(self) -> int | None:
        """How many alternatives to report per token (None: no logprobs)."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        p = SamplingParams(max_tokens=max_tokens, stop=stop, seed=self.seed, output=output_format(self.response_format))
        if self.temperature is not None:
            p.temperature = self.temperature
        if self.top_p is not None:
            p.top_p = self.top_p
        p.presence_penalty = self.presence_penalty or 0.0
        p.frequency_penalty = self.frequency_penalty or 0.0
        p.logit_bias = logit_bias_of(self.logit_bias)
        p.logprobs = self.logprobs_k()
        return p


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: Annotated[list[ToolDef], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = Field(None, description="return each output token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="alternatives per token; needs logprobs")

    def logprobs_k(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise client_error(400, "'top_logprobs' needs 'logprobs' set to true.", "invalid_value", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5, description="log-probabilities of each token and its top N")

    def logprobs_k(self) -> int | None:
        return self.logprobs

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def chat_request(body: ChatCompletionRequest, **caller: Any) -> GenerateRequest:
    """`caller`: principal, request_id, thread_id, from the HTTP layer."""
    tools = tools_of(body.tools)
    return GenerateRequest(
        model=body.model,
        messages=messages_of(body.messages),
        params=body.sampling(body.max_completion_tokens or body.max_tokens),
        user=body.user,
        tools=tools,
        tool_choice=tool_choice_of(body.tool_choice, tools),
        parallel_tool_calls=body.parallel_tool_calls is not False,
        **caller,
    )


def completion_request(body: CompletionRequest, **caller: Any) -> GenerateRequest:
    return GenerateRequest(
        model=body.model, prompt=body.text, params=body.sampling(body.max_tokens), user=body.user, **caller
    )


# -- responses ------------------------------------------------------------------------------------


class PromptTokensDetails(ResponseModel):
    cached_tokens: int = Field(ge=0)


class UsageOut(ResponseModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, u: Usage) -> UsageOut:
        return cls(
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            total_tokens=u.total_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens),
        )


FinishReason = Literal["stop", "length", "tool_calls"]


class AssistantMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = Field(None, description="present when the model called tools")

    @model_serializer(mode="wrap")
    def _drop_no_calls(self, handler: Any) -> dict[str, Any]:
        d = handler(self)
        if d.get("tool_calls") is None:
            d.pop("tool_calls", None)
        return d


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageOut


class Delta(OmitNone):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(ResponseModel):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(OmitNone):
    """A `text/event-stream` event of a streamed chat completion (`usage` only on the last, when asked)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageOut | None = None


class CompletionChoice(ResponseModel):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(OmitNone):
    """A text completion, and each event of a streamed one (`usage` on the whole one, or last, when asked)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageOut | None = None


class Model(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "appliance"
    aliases: list[str] = Field(default_factory=list)
    tool_format: str | None = Field(
        None, description="how tools are called: generic, native-hermes, native-llama3, upstream (null: not loaded)"
    )


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[Model]


# -- events -> responses and chunks ---------------------------------------------------------------

Chunk = BaseModel  # what a stream renderer yields: a chunk model or an ErrorResponse


class ChatRenderer:
    """Engine events of one chat completion -> `ChatCompletionChunk`s or the whole `ChatCompletion`."""

    def __init__(self, model: str, include_usage: bool = False, logprobs: bool = False):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.include_usage, self.logprobs = include_usage, logprobs

    def _chunk(
        self, delta: Delta, finish: FinishReason | None = None, logprobs: ChatLogprobs | None = None
    ) -> ChatCompletionChunk:
        choice = ChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def start(self) -> list[Chunk]:
        return [self._chunk(Delta(role="assistant", content=""))]

    def event(self, ev: Event) -> list[Chunk]:
        if isinstance(ev, Token):
            return [self._chunk(Delta(content=ev.text), None, chat_logprobs(ev.logprobs) if self.logprobs else None)]
        if isinstance(ev, ToolCallDelta):
            return [self._chunk(Delta(tool_calls=[delta_out(ev)]))]
        if isinstance(ev, Finish):
            out: list[Chunk] = [self._chunk(Delta(), ev.reason)]
            if self.include_usage:
                out.append(
                    ChatCompletionChunk(
                        id=self.id, created=self.created, model=self.model, choices=[], usage=UsageOut.of(ev.usage)
                    )
                )
            return out
        return [ErrorResponse.of(ev)]

    def whole(
        self,
        text: str,
        finish: Finish,
        calls: list[ToolCall] | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> ChatCompletion:
        out = calls_out(calls)
        message = AssistantMessage(content=text or (None if out else ""), tool_calls=out or None)
        lps = chat_logprobs(logprobs) if self.logprobs else None
        choice = ChatChoice(index=0, message=message, finish_reason=finish.reason, logprobs=lps)
        return ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=UsageOut.of(finish.usage)
        )


class CompletionRenderer:
    """Engine events of one text completion -> streamed `Completion` events or the whole `Completion`."""

    def __init__(self, model: str, echo: str = "", include_usage: bool = False, logprobs: bool = False):
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.echo, self.include_usage = echo, include_usage
        self.offsets = CompletionOffsets(len(echo)) if logprobs else None  # text_offset runs across chunks

    def _obj(self, text: str, finish: FinishReason | None, lps: CompletionLogprobs | None = None) -> Completion:
        choice = CompletionChoice(text=text, finish_reason=finish, logprobs=lps)
        return Completion(id=self.id, created=self.created, model=self.model, choices=[choice])

    def start(self) -> list[Chunk]:
        return [self._obj(self.echo, None)] if self.echo else []

    def event(self, ev: Event) -> list[Chunk]:
        if isinstance(ev, Token):
            return [self._obj(ev.text, None, self.offsets(ev.logprobs) if self.offsets else None)]
        if isinstance(ev, Finish):
            out: list[Chunk] = [self._obj("", ev.reason)]
            if self.include_usage:
                usage = UsageOut.of(ev.usage)
                out.append(Completion(id=self.id, created=self.created, model=self.model, choices=[], usage=usage))
            return out
        return [ErrorResponse.of(ev)]

    def whole(self, text: str, finish: Finish, logprobs: list[TokenLogprob] | None = None) -> Completion:
        lps = self.offsets(logprobs) if self.offsets else None
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[CompletionChoice(text=self.echo + text, finish_reason=finish.reason, logprobs=lps)],
            usage=UsageOut.of(finish.usage),
        )
