"""The one error shape: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status."""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from appliance.engine.types import EngineError, Error

log = logging.getLogger("appliance.api")

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_exceeded",
}


def error_body(err: Error) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def error_response(err: Error, headers: dict[str, str] | None = None, ollama: bool = False) -> JSONResponse:
    """The error as JSON: OpenAI's shape, or Ollama's `{"error": "..."}` for the /api/* routes."""
    h = dict(headers or {})
    if err.retry_after is not None:
        h["Retry-After"] = str(max(1, round(err.retry_after)))
    body = {"error": err.message} if ollama else error_body(err)
    return JSONResponse(body, status_code=err.status, headers=h)


def _is_ollama(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def client_error(status: int, message: str, code: str | None = None, param: str | None = None) -> EngineError:
    return EngineError.of(status, message, type=_TYPES.get(status, "invalid_request_error"), code=code, param=param)


def param_path(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'role') -> 'messages[0].role' (OpenAI's way of naming a param)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def from_validation(e: ValidationError) -> EngineError:
    err = e.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # Drop pydantic's union-branch labels (e.g. 'str', 'list[...]') from the path.
    loc = tuple(p for p in loc if isinstance(p, int) or ("[" not in p and p not in ("str", "int", "list")))
    param = param_path(loc) or None
    msg = err["msg"]
    if err["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    elif err["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    else:
        message = f"Invalid value for '{param}': {msg}."
    return client_error(400, message, code="invalid_value" if err["type"] != "missing" else None, param=param)


async def parse_json(request: Request) -> Any:
    body = await request.body()
    if not body:
        raise client_error(400, "The request body is empty; expected a JSON object.")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise client_error(400, f"The request body is not valid JSON: {e}.") from None


async def engine_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EngineError)
    return error_response(exc.error, ollama=_is_ollama(request))


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    if status == 404:
        message = f"Unknown route: {request.method} {request.url.path}"
    elif status == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    err = Error(status, message, _TYPES.get(status, "invalid_request_error"))
    return error_response(err, exc.headers, ollama=_is_ollama(request))


async def unhandled_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    err = Error(500, "The server had an internal error; it has been logged.", "server_error")
    return error_response(err, ollama=_is_ollama(request))
