"""The one error renderer: every error, from a handler, a middleware or mid-stream, goes through here.

OpenAI's shape `{"error": {"message", "type", "param", "code"}}` on every route but /api/*, where Ollama's
`{"error": "..."}` is what its clients parse. `Retry-After` goes with every error that carries it.
"""

from __future__ import annotations

import logging
import math

from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from appliance.api.protocol import ollama as ollama_wire
from appliance.api.protocol import openai as openai_wire
from appliance.api.protocol.common import client_error
from appliance.engine.types import EngineError, Error

log = logging.getLogger("appliance.api")

__all__ = ["client_error", "error_body", "error_response", "send_error"]


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def error_body(err: Error, path: str = "") -> BaseModel:
    """The error's wire model in the dialect of `path`."""
    if is_ollama_path(path):
        return ollama_wire.ErrorResponse(error=err.message)
    return openai_wire.ErrorResponse.of(err)


def retry_after(err: Error) -> str | None:
    return None if err.retry_after is None else str(max(1, math.ceil(err.retry_after)))


def error_response(err: Error, path: str = "", headers: dict[str, str] | None = None) -> Response:
    h = dict(headers or {})
    if (ra := retry_after(err)) is not None:
        h["Retry-After"] = ra
    body = error_body(err, path).model_dump_json().encode()
    return Response(body, status_code=err.status, headers=h, media_type="application/json")


async def send_error(
    scope: Scope, receive: Receive, send: Send, err: Error, headers: dict[str, str] | None = None
) -> None:
    """Answer from ASGI middleware (auth, limits, body size) with the same renderer as the handlers."""
    await error_response(err, scope.get("path", ""), headers)(scope, receive, send)


async def engine_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EngineError)
    return error_response(exc.error, request.url.path)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    if status == 404:
        message = f"Unknown route: {request.method} {request.url.path}"
    elif status == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(client_error(status, message).error, request.url.path, exc.headers)


async def unhandled_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    err = Error(500, "The server had an internal error; it has been logged.", "server_error")
    return error_response(err, request.url.path)
