"""OpenAI-compatible handlers: /v1/chat/completions, /v1/completions, /v1/models.

Thin: parse (api/protocol/openai.py) → engine → render → frame. No wire shape is written here.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance.api.choices import run_n
from appliance.api.errors import error_response
from appliance.api.protocol import openai as wire
from appliance.api.protocol.common import parse
from appliance.api.sse import json_response, sse_response
from appliance.api.streaming import caller, collect, note_request, pump, until_disconnect
from appliance.engine.router import Engine, Stream
from appliance.engine.types import GenerateRequest, TokenLogprob, ToolCallDelta, assemble_tool_calls


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def stream_headers(stream: Stream, req: GenerateRequest) -> dict[str, str]:
    """Which backend answered; the agent's thread (only the agent has threads)."""
    h = {"X-Appliance-Backend": stream.backend}
    if stream.model.kind == "agent" and req.thread_id:
        h["X-Thread-Id"] = req.thread_id
    return h


async def _run(request: Request, req: GenerateRequest, renderer, streamed: bool, n: int = 1) -> Response:
    if n > 1:  # n choices at once: api/choices.py
        return await run_n(request, req, renderer, streamed, n, stream_headers)
    note_request(request, req)
    stream = await until_disconnect(request, _engine(request).open(req))
    renderer = renderer(stream.model.id)
    headers = stream_headers(stream, req)
    if streamed:
        return sse_response(pump(request, stream, renderer), headers)
    deltas: list[ToolCallDelta] = []
    lps: list[TokenLogprob] = []
    text, finish, err = await collect(request, stream, deltas, lps)
    if err is not None:
        return error_response(err, request.url.path, headers)
    assert finish is not None
    if deltas:
        return json_response(renderer.whole(text, finish, assemble_tool_calls(deltas), logprobs=lps), headers)
    return json_response(renderer.whole(text, finish, logprobs=lps), headers)


async def chat_completions(request: Request) -> Response:
    body = parse(wire.ChatCompletionRequest, await request.body())
    req = wire.chat_request(body, thread_id=request.headers.get("x-thread-id"), **caller(request))
    renderer = lambda m: wire.ChatRenderer(m, body.include_usage, bool(body.logprobs))  # noqa: E731
    return await _run(request, req, renderer, bool(body.stream), body.n or 1)


async def completions(request: Request) -> Response:
    body = parse(wire.CompletionRequest, await request.body())
    req = wire.completion_request(body, **caller(request))
    echo = body.text if body.echo else ""
    renderer = lambda m: wire.CompletionRenderer(m, echo, body.include_usage, body.logprobs is not None)  # noqa: E731
    return await _run(request, req, renderer, bool(body.stream), body.n or 1)


def _tool_format(entry) -> str | None:
    """How the model calls tools: generic / native-hermes / native-llama3 (llama.cpp, known once loaded
    unless the models file sets it), upstream (remote and Ollama backends), None (agent, embeddings)."""
    if entry.kind != "chat" or not entry.backends:
        return None
    st = entry.backends[0].status()
    if st.kind in ("remote", "ollama"):
        return "upstream"
    spec = entry.spec.backends[0] if entry.spec is not None else None
    return st.details.get("tool_format") or getattr(spec, "tool_format", None)


def _model(entry) -> wire.Model:
    return wire.Model(id=entry.id, created=entry.created, aliases=entry.aliases, tool_format=_tool_format(entry))


async def list_models(request: Request) -> Response:
    return json_response(wire.ModelList(data=[_model(e) for e in _engine(request).registry]))


async def get_model(request: Request) -> Response:
    return json_response(_model(_engine(request).registry.get(request.path_params["model_id"])))


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
]
