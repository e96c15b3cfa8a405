"""`n` > 1 on /v1/chat/completions and /v1/completions: n generations of one prompt at once, one answer.

Each choice is its own internal request (with `seed` set, choice i uses seed + i, so that they differ),
opened concurrently on the model's slots, so n is bounded by the model's slot count (APPLIANCE_PARALLEL or
the models file's `parallel`). The llama.cpp worker copies a prompt prefix that one slot has already
evaluated into the others (see backends/llamacpp), so the shared prompt is prefilled once, not n times.
Each choice runs through its own renderer (tool calls, logprobs alike); the chunks are merged with their
`index` set to the choice's, one id, and one usage: the prompt counted once, the completions summed.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from appliance.api.errors import error_response
from appliance.api.protocol.common import client_error
from appliance.api.protocol.openai import UsageOut
from appliance.api.sse import json_response, sse_response
from appliance.api.streaming import note_request, pump, until_disconnect
from appliance.engine.router import Engine, Stream
from appliance.engine.types import (
    Error,
    Finish,
    GenerateRequest,
    Token,
    TokenLogprob,
    ToolCallDelta,
    Usage,
    assemble_tool_calls,
)

UNSLOTTED_MAX_N = 8  # remote and Ollama backends: no slot count of ours to go by


def max_n(engine: Engine, model: str) -> int:
    entry = engine.registry.get(model)
    if entry.kind == "agent":
        return 1  # one run per thread at a time
    slots = [b.status().slots for b in entry.backends]
    return max((s for s in slots if s), default=UNSLOTTED_MAX_N)


def _requests(req: GenerateRequest, n: int) -> list[GenerateRequest]:
    out = []
    for i in range(n):
        r = copy.deepcopy(req)
        if r.params.seed is not None:
            r.params.seed += i
        out.append(r)
    return out


async def _open_all(engine: Engine, reqs: list[GenerateRequest]) -> list[Stream]:
    """Open every choice's stream; on any failure (or cancellation) close the ones that opened."""
    tasks = [asyncio.ensure_future(engine.open(r)) for r in reqs]
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _close([t.result() for t in tasks if not t.cancelled() and t.exception() is None])
        raise
    streams = [t.result() for t in tasks if t.exception() is None]
    failed = [t.exception() for t in tasks if t.exception() is not None]
    if failed:
        await _close(streams)
        raise failed[0]  # type: ignore[misc]
    return streams


async def _close(streams: list[Stream]) -> None:
    for s in streams:
        await s.aclose()


async def _drain(stream: Stream) -> tuple[str, list[ToolCallDelta], list[TokenLogprob], Finish | None, Error | None]:
    parts: list[str] = []
    calls: list[ToolCallDelta] = []
    lps: list[TokenLogprob] = []
    try:
        async for ev in stream:
            if isinstance(ev, Token):
                parts.append(ev.text)
                lps += ev.logprobs or ()
            elif isinstance(ev, ToolCallDelta):
                calls.append(ev)
            elif isinstance(ev, Finish):
                return "".join(parts), calls, lps, ev, None
            elif isinstance(ev, Error):
                return "".join(parts), calls, lps, None, ev
        return "".join(parts), calls, lps, None, Error(500, "the stream ended without finishing", "server_error")
    finally:
        await stream.aclose()


def _usage(finishes: list[Usage]) -> Usage:
    first = finishes[0]
    return Usage(first.prompt_tokens, sum(u.completion_tokens for u in finishes), first.cached_tokens)


def _note(request: Request, streams: list[Stream], usage: Usage) -> None:
    st = request.state
    st.model, st.backend, st.ttft = streams[0].model.id, streams[0].backend, streams[0].ttft
    st.prompt_tokens, st.completion_tokens = usage.prompt_tokens, usage.completion_tokens


async def run_n(
    request: Request,
    req: GenerateRequest,
    make_renderer: Callable[[str], Any],
    streamed: bool,
    n: int,
    headers: Callable[[Stream, GenerateRequest], dict[str, str]],
) -> Response:
    engine: Engine = request.app.state.engine
    limit = max_n(engine, req.model)
    if n > limit:
        raise client_error(
            400, f"n may be at most {limit} for '{req.model}' (its slots run the choices at once)", "invalid_value", "n"
        )
    note_request(request, req)
    streams = await until_disconnect(request, _open_all(engine, _requests(req, n)))
    renderers = [make_renderer(s.model.id) for s in streams]
    h = headers(streams[0], req)
    if streamed:
        return sse_response(_merged(request, streams, renderers), h)
    results = await until_disconnect(request, asyncio.gather(*(_drain(s) for s in streams)))
    err = next((e for *_, e in results if e is not None), None)
    if err is not None:
        return error_response(err, request.url.path, h)
    wholes = []
    for r, (text, calls, lps, finish, _) in zip(renderers, results, strict=True):
        assert finish is not None
        logprobs = lps if req.params.logprobs is not None else None
        if calls:
            wholes.append(r.whole(text, finish, assemble_tool_calls(calls), logprobs=logprobs))
        else:
            wholes.append(r.whole(text, finish, logprobs=logprobs))
    usage = _usage([f.usage for *_, f, _ in results if f is not None])
    _note(request, streams, usage)
    choices = [w.choices[0].model_copy(update={"index": i}) for i, w in enumerate(wholes)]
    return json_response(wholes[0].model_copy(update={"choices": choices, "usage": UsageOut.of(usage)}), h)


async def _merged(request: Request, streams: list[Stream], renderers: list[Any]) -> AsyncIterator[BaseModel]:
    """The choices' chunks as they come, each with its `index`; one usage chunk (when asked) at the end."""
    q: asyncio.Queue[tuple[int, BaseModel | None]] = asyncio.Queue()
    common = renderers[0].id

    async def feed(i: int) -> None:
        try:
            async for item in pump(request, streams[i], renderers[i]):
                q.put_nowait((i, item))
        finally:
            q.put_nowait((i, None))

    tasks = [asyncio.create_task(feed(i)) for i in range(len(streams))]
    usage_chunk: BaseModel | None = None
    usages: list[Usage] = []
    try:
        left = len(tasks)
        while left:
            i, item = await q.get()
            if item is None:
                left -= 1
                continue
            choices = getattr(item, "choices", None)
            if choices is None:  # an error event: as it is
                yield item
                continue
            if not choices and getattr(item, "usage", None) is not None:
                u = item.usage  # type: ignore[attr-defined]
                usages.append(Usage(u.prompt_tokens, u.completion_tokens, u.prompt_tokens_details.cached_tokens))
                usage_chunk = item
                continue
            indexed = [c.model_copy(update={"index": i}) for c in choices]
            yield item.model_copy(update={"id": common, "choices": indexed})
        if usage_chunk is not None:
            yield usage_chunk.model_copy(update={"id": common, "usage": UsageOut.of(_usage(usages))})
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        finished = [s.finish.usage for s in streams if s.finish is not None]
        if finished:
            _note(request, streams, _usage(finished))
