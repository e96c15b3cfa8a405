"""OpenAI's wire format: request, response, stream-chunk and error models, and pure translations.

Requests become the internal `GenerateRequest`; engine events become responses or chunks. Nothing here
touches HTTP: the handlers in api/openai.py parse, call these, and frame the result.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator

from appliance.api.protocol.common import OmitNone, RequestModel, ResponseModel, StopList, StopString
from appliance.engine.types import (
    Error,
    Event,
    Finish,
    GenerateRequest,
    Message,
    OutputFormat,
    SamplingParams,
    Token,
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


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


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


class StreamOptions(RequestModel):
    include_usage: bool = False


Stop = StopString | StopList | None


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
    n: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only n=1 is supported")
        return v

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
        return p


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: bool = False

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def chat_request(body: ChatCompletionRequest, **caller: Any) -> GenerateRequest:
    """`caller`: principal, request_id, thread_id, from the HTTP layer."""
    return GenerateRequest(
        model=body.model,
        messages=[Message(m.role, m.text()) for m in body.messages],
        params=body.sampling(body.max_completion_tokens or body.max_tokens),
        user=body.user,
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


FinishReason = Literal["stop", "length"]


class AssistantMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
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


class ChunkChoice(ResponseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
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
    logprobs: None = None
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


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[Model]


# -- events -> responses and chunks ---------------------------------------------------------------

Chunk = BaseModel  # what a stream renderer yields: a chunk model or an ErrorResponse


class ChatRenderer:
    """Engine events of one chat completion -> `ChatCompletionChunk`s or the whole `ChatCompletion`."""

    def __init__(self, model: str, include_usage: bool = False):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.include_usage = include_usage

    def _chunk(self, delta: Delta, finish: FinishReason | None = None) -> ChatCompletionChunk:
        choice = ChunkChoice(delta=delta, finish_reason=finish)
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def start(self) -> list[Chunk]:
        return [self._chunk(Delta(role="assistant", content=""))]

    def event(self, ev: Event) -> list[Chunk]:
        if isinstance(ev, Token):
            return [self._chunk(Delta(content=ev.text))]
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

    def whole(self, text: str, finish: Finish) -> ChatCompletion:
        choice = ChatChoice(index=0, message=AssistantMessage(content=text), finish_reason=finish.reason)
        return ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=UsageOut.of(finish.usage)
        )


class CompletionRenderer:
    """Engine events of one text completion -> streamed `Completion` events or the whole `Completion`."""

    def __init__(self, model: str, echo: str = "", include_usage: bool = False):
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.echo, self.include_usage = echo, include_usage

    def _obj(self, text: str, finish: FinishReason | None) -> Completion:
        choice = CompletionChoice(text=text, finish_reason=finish)
        return Completion(id=self.id, created=self.created, model=self.model, choices=[choice])

    def start(self) -> list[Chunk]:
        return [self._obj(self.echo, None)] if self.echo else []

    def event(self, ev: Event) -> list[Chunk]:
        if isinstance(ev, Token):
            return [self._obj(ev.text, None)]
        if isinstance(ev, Finish):
            out: list[Chunk] = [self._obj("", ev.reason)]
            if self.include_usage:
                usage = UsageOut.of(ev.usage)
                out.append(Completion(id=self.id, created=self.created, model=self.model, choices=[], usage=usage))
            return out
        return [ErrorResponse.of(ev)]

    def whole(self, text: str, finish: Finish) -> Completion:
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[CompletionChoice(text=self.echo + text, finish_reason=finish.reason)],
            usage=UsageOut.of(finish.usage),
        )


# -- embeddings -----------------------------------------------------------------------------------


class EmbeddingRequest(RequestModel):
    model: str = Field(min_length=1, examples=["all-minilm-l6-v2"])
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string or a list of strings (token arrays are refused with a message saying so)"
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class Embedding(ResponseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32 bytes")


class EmbeddingUsage(ResponseModel):
    prompt_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class EmbeddingList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
