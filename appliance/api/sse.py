"""The framers: a wire model as one JSON response, or a stream of them as Server-Sent Events (OpenAI) or
NDJSON (Ollama)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from pydantic import BaseModel
from starlette.responses import Response, StreamingResponse

# Streams must reach the client token by token, also through Nginx.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


def json_response(model: BaseModel, headers: dict[str, str] | None = None, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, headers=headers, media_type="application/json")


async def _sse(items: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    async for item in items:
        yield b"data: " + item.model_dump_json().encode() + b"\n\n"
    yield DONE


async def _sse_named(items: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    """The Responses API's framing: `event: <type>` before each `data:`, and no `[DONE]`."""
    async for item in items:
        kind = getattr(item, "type", "message")
        yield b"event: " + str(kind).encode() + b"\ndata: " + item.model_dump_json().encode() + b"\n\n"


async def _ndjson(items: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    async for item in items:
        yield item.model_dump_json().encode() + b"\n"


def sse_response(
    items: AsyncIterator[BaseModel], headers: dict[str, str] | None = None, named: bool = False
) -> StreamingResponse:
    """`data: {json}` per item, then `data: [DONE]`; `named`: `event: <type>` lines and no `[DONE]`."""
    body = _sse_named(items) if named else _sse(items)
    return StreamingResponse(body, media_type="text/event-stream", headers={**STREAM_HEADERS, **(headers or {})})


def ndjson_response(items: AsyncIterator[BaseModel], headers: dict[str, str] | None = None) -> StreamingResponse:
    """One JSON object per line."""
    return StreamingResponse(
        _ndjson(items), media_type="application/x-ndjson", headers={**STREAM_HEADERS, **(headers or {})}
    )
