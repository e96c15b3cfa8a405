"""OpenAI-compatible wire format: /v1/chat/completions, /v1/completions, /v1/models.

Only translation lives here: JSON in -> GenerateRequest, engine events -> JSON or SSE chunks.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from appliance.api.errors import client_error, error_body, error_response, from_validation, parse_json
from appliance.api.streaming import SSE_HEADERS, collect, until_disconnect
from appliance.engine.router import Engine, Stream
from appliance.engine.types import Error, Finish, GenerateRequest, Message, SamplingParams, Token, Usage

# -- request schemas ----------------------------------------------------------------------------


class RequestModel(BaseModel):
    # Unknown fields are ignored (clients send many optional OpenAI fields); known ones are checked
    # strictly, as the OpenAPI document types them: "2" is not an integer, 0 is not a boolean.
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessageIn(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(RequestModel):
    include_usage: bool = False


Stop = str | Annotated[list[str], Field(max_length=4)] | None


class _SamplingIn(RequestModel):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Stop = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("only n=1 is supported")
        return v

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        p = SamplingParams(max_tokens=max_tokens, stop=stop, seed=self.seed)
        if self.temperature is not None:
            p.temperature = self.temperature
        if self.top_p is not None:
            p.top_p = self.top_p
        p.presence_penalty = self.presence_penalty or 0.0
        p.frequency_penalty = self.frequency_penalty or 0.0
        return p


class ChatCompletionIn(_SamplingIn):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionIn(_SamplingIn):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: bool = False


def parse_request(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise client_error(400, "The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation(e) from None


# -- handlers -----------------------------------------------------------------------------------


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _usage(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def _headers(stream: Stream, req: GenerateRequest) -> dict[str, str]:
    h = {"X-Appliance-Backend": stream.backend}
    if req.thread_id:
        h["X-Thread-Id"] = req.thread_id
    return h


def record(request: Request, stream: Stream) -> None:
    """Leave what the access log and metrics want on request.state (model, backend, tokens, TTFT)."""
    st = request.state
    st.model, st.backend, st.ttft = stream.model.id, stream.backend, stream.ttft
    if stream.finish is not None:
        st.prompt_tokens = stream.finish.usage.prompt_tokens
        st.completion_tokens = stream.finish.usage.completion_tokens


def _generate_request(request: Request, body: _SamplingIn, **kw: Any) -> GenerateRequest:
    return GenerateRequest(
        model=body.model,
        user=body.user,
        principal=getattr(request.state, "principal", None),
        thread_id=request.headers.get("x-thread-id"),
        request_id=request.state.request_id,
        **kw,
    )


async def chat_completions(request: Request) -> Response:
    body = parse_request(ChatCompletionIn, await parse_json(request))
    req = _generate_request(
        request,
        body,
        messages=[Message(m.role, m.text()) for m in body.messages],
        params=body.sampling(body.max_completion_tokens or body.max_tokens),
    )
    stream = await until_disconnect(request, _engine(request).open(req))
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), stream.model.id
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _chat_sse(request, stream, cid, created, model, include_usage),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **_headers(stream, req)},
        )
    text, finish, err = await until_disconnect(request, collect(stream))
    record(request, stream)
    if err is not None:
        return error_response(err, _headers(stream, req))
    assert finish is not None
    return JSONResponse(
        {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish.reason,
                }
            ],
            "usage": _usage(finish.usage),
        },
        headers=_headers(stream, req),
    )


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


_DONE = b"data: [DONE]\n\n"


async def _chat_sse(
    request: Request, stream: Stream, cid: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({**base, "choices": [choice]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for ev in stream:
            if isinstance(ev, Token):
                yield chunk({"content": ev.text})
            elif isinstance(ev, Finish):
                yield chunk({}, ev.reason)
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage(ev.usage)})
            elif isinstance(ev, Error):
                yield _sse(error_body(ev))
        yield _DONE
    finally:
        record(request, stream)
        await stream.aclose()


async def completions(request: Request) -> Response:
    body = parse_request(CompletionIn, await parse_json(request))
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    req = _generate_request(request, body, prompt=prompt, params=body.sampling(body.max_tokens))
    stream = await until_disconnect(request, _engine(request).open(req))
    cid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), stream.model.id
    prefix = prompt if body.echo else ""

    def obj(text: str, finish: str | None) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
        }

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def sse() -> AsyncIterator[bytes]:
            try:
                if prefix:
                    yield _sse(obj(prefix, None))
                async for ev in stream:
                    if isinstance(ev, Token):
                        yield _sse(obj(ev.text, None))
                    elif isinstance(ev, Finish):
                        yield _sse(obj("", ev.reason))
                        if include_usage:
                            yield _sse({**obj("", None), "choices": [], "usage": _usage(ev.usage)})
                    elif isinstance(ev, Error):
                        yield _sse(error_body(ev))
                yield _DONE
            finally:
                record(request, stream)
                await stream.aclose()

        return StreamingResponse(
            sse(), media_type="text/event-stream", headers={**SSE_HEADERS, **_headers(stream, req)}
        )
    text, finish, err = await until_disconnect(request, collect(stream))
    record(request, stream)
    if err is not None:
        return error_response(err, _headers(stream, req))
    assert finish is not None
    return JSONResponse(
        {**obj(prefix + text, finish.reason), "usage": _usage(finish.usage)}, headers=_headers(stream, req)
    )


def _model_obj(entry: Any) -> dict[str, Any]:
    return {
        "id": entry.id,
        "object": "model",
        "created": entry.created,
        "owned_by": "appliance",
        "aliases": entry.aliases,
    }


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_obj(e) for e in _engine(request).registry]})


async def get_model(request: Request) -> Response:
    entry = _engine(request).registry.get(request.path_params["model_id"])
    return JSONResponse(_model_obj(entry))


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
]
