"""The OpenAPI 3.1 document, generated from the wire models in api/protocol/ (`GET /openapi.json`).

Only the table of paths below is kept by hand: which model each operation reads and answers. The schemas
come from the same pydantic models the handlers parse and render with, so the document cannot drift
from the server (tests/test_fuzz_api.py holds the server to it).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from appliance.api.openapi_parity import parity_paths
from appliance.api.protocol import health, ollama, openai, threads, usage

OPENAPI_VERSION = "3.1.0"
_ERRORS = {
    400: "Invalid request: malformed JSON or an invalid field (`param` names it)",
    401: "Missing or wrong API key (`code: invalid_api_key`); only when API keys are configured",
    403: "The API key may not do this, or only on its own data (`code: forbidden`)",
    404: "Unknown model, thread or memory (`code: model_not_found`, ...)",
    409: "The thread is busy with a request (`code: thread_busy`)",
    413: "Body over APPLIANCE_MAX_BODY_BYTES (`code: request_too_large`)",
    429: "A limit of the key was reached (`code: rate_limit_exceeded`, `type`: requests, tokens or streams)",
    500: "An internal error (logged)",
    502: "An upstream backend answered badly (`code: upstream_error`)",
    503: "No backend can take the request now: queue_full, queue_timeout, model_loading, worker_crashed, ...",
    504: "No first token in time (`code: first_token_timeout`)",
}
_HEADER = {"schema": {"type": "string"}}
_RATE = {f"x-ratelimit-{a}-{b}": _HEADER for a in ("limit", "remaining", "reset") for b in ("requests", "tokens")}
_ERROR_HEADERS = {
    401: {"WWW-Authenticate": _HEADER},
    429: {"Retry-After": _HEADER, **_RATE},
    503: {"Retry-After": _HEADER},
}
GENERATION_ERRORS = (400, 401, 404, 413, 429, 500, 502, 503, 504)


@dataclass(frozen=True)
class Op:
    """One operation: what it reads (body, query) and what it answers."""

    id: str
    summary: str
    response: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    stream: str | None = None  # "text/event-stream" or "application/x-ndjson" when `stream: true` is offered
    errors: tuple[int, ...] = ()
    status: int = 200
    ollama: bool = False
    public: bool = False  # served without an API key
    media: str = "application/json"


PATHS: dict[str, dict[str, Op]] = {
    "/health": {
        "get": Op(
            "health", "Liveness and readiness", health.Health, query=health.HealthQuery, errors=(400, 403), public=True
        )
    },
    "/v1/usage": {
        "get": Op(
            "getUsage",
            "Tokens, requests and embedding inputs per key, model and UTC day",
            usage.UsageList,
            query=usage.UsageQuery,
            errors=(400, 401, 403),
        )
    },
    "/metrics": {"get": Op("metrics", "Prometheus metrics", errors=(401, 403), media="text/plain")},
    "/openapi.json": {"get": Op("openapi", "This document", public=True)},
    "/v1/models": {"get": Op("listModels", "Models served here", openai.ModelList, errors=(401, 429))},
    "/v1/models/{model_id}": {"get": Op("getModel", "One model", openai.Model, errors=(401, 404, 429))},
    "/v1/chat/completions": {
        "post": Op(
            "createChatCompletion",
            "Chat completion (OpenAI)",
            openai.ChatCompletion,
            openai.ChatCompletionRequest,
            stream="text/event-stream",
            errors=GENERATION_ERRORS,
        )
    },
    "/v1/completions": {
        "post": Op(
            "createCompletion",
            "Text completion (OpenAI)",
            openai.Completion,
            openai.CompletionRequest,
            stream="text/event-stream",
            errors=GENERATION_ERRORS,
        )
    },
    "/v1/embeddings": {
        "post": Op(
            "createEmbedding",
            "Embeddings (OpenAI)",
            openai.EmbeddingList,
            openai.EmbeddingRequest,
            errors=(400, 401, 404, 413, 429, 503),
        )
    },
    "/v1/threads": {
        "get": Op(
            "listThreads",
            "The agent's threads",
            threads.ThreadList,
            query=threads.ThreadListQuery,
            errors=(400, 401, 403, 503),
        )
    },
    "/v1/threads/{thread_id}": {
        "get": Op("getThread", "A thread with its messages", threads.ThreadWithMessages, errors=(400, 401, 404, 503)),
        "delete": Op("deleteThread", "Delete a thread", threads.Deleted, errors=(400, 401, 404, 409, 503)),
    },
    "/v1/memories": {
        "get": Op(
            "listMemories",
            "A user's long-term memories",
            threads.MemoryList,
            query=threads.MemoryListQuery,
            errors=(400, 401, 403, 503),
        ),
        "post": Op(
            "createMemory",
            "Remember a fact",
            threads.Memory,
            threads.MemoryRequest,
            status=201,
            errors=(400, 401, 403, 413, 503),
        ),
        "delete": Op(
            "deleteMemories",
            "Forget all of a user's memories",
            threads.Deleted,
            query=threads.UserQuery,
            errors=(400, 401, 403, 503),
        ),
    },
    "/v1/memories/search": {
        "get": Op(
            "searchMemories",
            "Memories nearest in meaning to `q`",
            threads.MemoryList,
            query=threads.MemorySearchQuery,
            errors=(400, 401, 403, 503),
        )
    },
    "/v1/memories/{memory_id}": {
        "delete": Op(
            "deleteMemory",
            "Forget one memory",
            threads.Deleted,
            query=threads.UserQuery,
            errors=(400, 401, 403, 404, 503),
        )
    },
    "/api/chat": {
        "post": Op(
            "ollamaChat",
            "Chat (Ollama)",
            ollama.ChatResponse,
            ollama.ChatRequest,
            stream="application/x-ndjson",
            errors=(400, 401, 403, 404, 413, 429, 500, 502, 503, 504),
            ollama=True,
        )
    },
    "/api/generate": {
        "post": Op(
            "ollamaGenerate",
            "Generate (Ollama)",
            ollama.GenerateResponse,
            ollama.GenerateRequest,
            stream="application/x-ndjson",
            errors=(400, 401, 403, 404, 413, 429, 500, 502, 503, 504),
            ollama=True,
        )
    },
    "/api/tags": {
        "get": Op("ollamaTags", "Local models (Ollama)", ollama.TagsResponse, errors=(401, 429), ollama=True)
    },
    "/api/ps": {"get": Op("ollamaPs", "Loaded models (Ollama)", ollama.PsResponse, errors=(401, 429), ollama=True)},
    "/api/show": {
        "post": Op(
            "ollamaShow",
            "Model details (Ollama)",
            ollama.ShowResponse,
            ollama.ModelRequest,
            errors=(400, 401, 404, 413, 429),
            ollama=True,
        )
    },
    "/api/version": {
        "get": Op("ollamaVersion", "Ollama API version", ollama.VersionResponse, errors=(401, 429), ollama=True)
    },
    "/api/embed": {
        "post": Op(
            "ollamaEmbed",
            "Embeddings (Ollama)",
            ollama.EmbedResponse,
            ollama.EmbedRequest,
            errors=(400, 401, 404, 413, 429, 503),
            ollama=True,
        )
    },
}

PATHS.update(parity_paths(Op))  # the Responses API, model management, the tokenizer


_SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "description": "the event's name (the Responses API names its events)"},
        "data": {"type": "string", "description": "one JSON chunk, or [DONE] at the end of a chat stream"},
    },
    "required": ["data"],
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{_names()[model]}"}


@cache
def _schemas() -> tuple[dict[type[BaseModel], str], dict[str, Any]]:
    """Every model's JSON schema: requests as validated, responses as serialized."""
    ops = [op for item in PATHS.values() for op in item.values()]
    models: list[tuple[type[BaseModel], Any]] = []
    for op in ops:
        models += [(m, "validation") for m in (op.body, op.query) if m is not None]
        if op.response is not None:
            models.append((op.response, "serialization"))
    models += [(openai.ErrorResponse, "serialization"), (ollama.ErrorResponse, "serialization")]
    models += [(openai.ChatCompletionChunk, "serialization")]
    keys, doc = models_json_schema(list(dict.fromkeys(models)), ref_template="#/components/schemas/{model}")
    names = {m: keys[(m, mode)]["$ref"].rsplit("/", 1)[1] for m, mode in dict.fromkeys(models)}
    return names, doc.get("$defs", {})


def _names() -> dict[type[BaseModel], str]:
    return _schemas()[0]


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = _schemas()[1][_names()[model]]
    required = set(schema.get("required", []))
    return [
        {
            "name": name,
            "in": "query",
            "required": name in required,
            "schema": {k: v for k, v in prop.items() if k not in ("title", "description", "default")},
            **({"description": prop["description"]} if "description" in prop else {}),
        }
        for name, prop in schema.get("properties", {}).items()
    ]


_PARAM = re.compile(r"\{([^}:]+)(:[^}]*)?\}")


def _operation(path: str, method: str, op: Op) -> dict[str, Any]:
    error_model = ollama.ErrorResponse if op.ollama else openai.ErrorResponse
    content: dict[str, Any] = {}
    if op.media == "application/json":
        content["application/json"] = {"schema": _ref(op.response) if op.response else {"type": "object"}}
    else:
        content[op.media] = {"schema": {"type": "string"}}
    if op.stream == "text/event-stream":  # the schema of each event (a JSON chunk in `data`, or [DONE])
        content[op.stream] = {"schema": _SSE_EVENT}
    elif op.stream:
        content[op.stream] = {"schema": {"type": "string", "description": "one JSON object per line"}}
    ok: dict[str, Any] = {"description": op.summary, "content": content}
    if op.body is not None or op.stream:
        ok["headers"] = {"X-Appliance-Backend": _HEADER, **_RATE} if op.stream else dict(_RATE)
    responses: dict[str, Any] = {str(op.status): ok}
    for status in op.errors:
        err: dict[str, Any] = {
            "description": _ERRORS[status],
            "content": {"application/json": {"schema": _ref(error_model)}},
        }
        if status in _ERROR_HEADERS:
            err["headers"] = _ERROR_HEADERS[status]
        responses[str(status)] = err
    out: dict[str, Any] = {"operationId": op.id, "summary": op.summary, "responses": responses}
    params = [
        {"name": n[0], "in": "path", "required": True, "schema": {"type": "string"}} for n in _PARAM.findall(path)
    ]
    if op.query is not None:
        params += _query_parameters(op.query)
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(op.body)}}}
    if op.public:
        out["security"] = []
    return out


def _route_paths(routes: Any, prefix: str = "") -> set[str]:
    """Path templates of the app's routes, Starlette's `{name:convertor}` written as `{name}`."""
    out: set[str] = set()
    for r in routes or ():
        path = getattr(r, "path", None)
        if path is None:
            continue
        sub = getattr(r, "routes", None)
        if sub:
            out |= _route_paths(sub, prefix + path)
        else:
            out.add(_PARAM.sub(r"{\1}", prefix + path))
    return out


@cache
def _full() -> dict[str, Any]:
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "The appliance",
            "version": "1",
            "description": "A self-hosted LLM inference server: OpenAI- and Ollama-compatible API over local models. "
            'Errors have the shape of `ErrorResponse` (Ollama\'s routes: its own `{"error": ...}`).',
        },
        "paths": {
            path: {method: _operation(path, method, op) for method, op in item.items()} for path, item in PATHS.items()
        },
        "components": {
            "schemas": _schemas()[1],
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key from `appliance keys add`; required when keys are configured",
                }
            },
        },
        # A key is optional when no keys are configured ({}), required otherwise.
        "security": [{"bearer": []}, {}],
    }


def document(routes: Any = None) -> dict[str, Any]:
    """The OpenAPI document; with `routes`, only the paths the app actually serves."""
    doc = copy.deepcopy(_full())
    if routes is not None:
        served = _route_paths(routes)
        doc["paths"] = {p: item for p, item in doc["paths"].items() if p in served}
    return doc


async def endpoint(request: Request) -> Response:
    return JSONResponse(document(request.app.routes))
