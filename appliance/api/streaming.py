"""Running an engine stream for a handler: stop work when the client leaves, collect or pump events,
and leave what the access log and metrics want on `request.state` (read from the events, not the bytes)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Protocol, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from appliance.engine.router import Stream
from appliance.engine.types import Error, Event, Finish, GenerateRequest, Token, TokenLogprob, ToolCallDelta

T = TypeVar("T")
CAPTURE_LIMIT = 8 * 1024  # characters of completion text kept for APPLIANCE_LOG_PROMPTS


class ClientDisconnected(Exception):
    """The client went away before the response was ready; nobody is left to answer."""


class Renderer(Protocol):
    """A dialect's translation of one generation's events into wire models (api/protocol/*)."""

    def start(self) -> list[BaseModel]: ...
    def event(self, ev: Event) -> list[BaseModel]: ...


async def until_disconnect(request: Request, aw: Awaitable[T]) -> T:
    """Await `aw`, cancelling it (and so freeing the model) if the client disconnects first."""
    task = asyncio.ensure_future(aw)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnected
    return task.result()


def caller(request: Request) -> dict[str, str | None]:
    """Who asks, for the internal request: the key's identity and the request id (for logs only)."""
    st = request.state
    return {"principal": getattr(st, "principal", None), "request_id": st.request_id}


def note_request(request: Request, req: GenerateRequest) -> None:
    """Keep the prompt for the access log, only when APPLIANCE_LOG_PROMPTS asked for it."""
    if getattr(request.state, "capture", False):
        text = req.prompt if req.messages is None else "\n".join(f"{m.role}: {m.content}" for m in req.messages)
        request.state.prompt = (text or "")[:CAPTURE_LIMIT]


def _record(request: Request, stream: Stream, text: list[str]) -> None:
    st = request.state
    st.model, st.backend, st.ttft = stream.model.id, stream.backend, stream.ttft
    if stream.finish is not None:
        st.prompt_tokens = stream.finish.usage.prompt_tokens
        st.completion_tokens = stream.finish.usage.completion_tokens
    if getattr(st, "capture", False):
        st.completion = "".join(text)[:CAPTURE_LIMIT]


async def collect(
    request: Request,
    stream: Stream,
    calls: list[ToolCallDelta] | None = None,
    logprobs: list[TokenLogprob] | None = None,
) -> tuple[str, Finish | None, Error | None]:
    """Run a stream to its end: (text, finish, error); tool-call fragments go to `calls` when given
    (`engine.types.assemble_tool_calls` makes them whole)."""
    parts: list[str] = []

    async def run() -> tuple[str, Finish | None, Error | None]:
        async for ev in stream:
            if isinstance(ev, Token):
                parts.append(ev.text)
                if logprobs is not None and ev.logprobs:
                    logprobs.extend(ev.logprobs)
            elif isinstance(ev, ToolCallDelta):
                if calls is not None:
                    calls.append(ev)
            elif isinstance(ev, Finish):
                return "".join(parts), ev, None
            elif isinstance(ev, Error):
                return "".join(parts), None, ev
        return "".join(parts), None, Error(500, "the stream ended without finishing", "server_error")

    try:
        return await until_disconnect(request, run())
    finally:
        _record(request, stream, parts)
        await stream.aclose()


async def pump(request: Request, stream: Stream, renderer: Renderer) -> AsyncIterator[BaseModel]:
    """Stream events through a dialect's renderer, for a framer (api/sse.py)."""
    parts: list[str] = []
    capture = getattr(request.state, "capture", False)
    try:
        for item in renderer.start():
            yield item
        async for ev in stream:
            if capture and isinstance(ev, Token):
                parts.append(ev.text)
            for item in renderer.event(ev):
                yield item
    finally:
        _record(request, stream, parts)
        await stream.aclose()


async def disconnected_handler(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)
