"""Helpers shared by the wire adapters: collecting a stream, and stopping work when the client leaves."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import Response

from appliance.engine.router import Stream
from appliance.engine.types import Error, Finish, Token

T = TypeVar("T")

# Streams must reach the client token by token, also through Nginx.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientDisconnected(Exception):
    """The client went away before the response was ready; nobody is left to answer."""


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


async def collect(stream: Stream) -> tuple[str, Finish | None, Error | None]:
    """Run a stream to its end: (text, finish, error)."""
    parts: list[str] = []
    try:
        async for ev in stream:
            if isinstance(ev, Token):
                parts.append(ev.text)
            elif isinstance(ev, Finish):
                return "".join(parts), ev, None
            elif isinstance(ev, Error):
                return "".join(parts), None, ev
    finally:
        await stream.aclose()
    return "".join(parts), None, Error(500, "the stream ended without finishing", "server_error")


async def disconnected_handler(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)
