"""The OpenAPI 3.1 document of the appliance's own endpoints, served at `GET /openapi.json`.

Hand-written so that it says exactly what the server accepts and answers (the fuzz test in
tests/test_fuzz_api.py holds the server to it). To document a new endpoint, add its path item to
`PATHS` (or call `add_paths()` from your module) and any new schemas to `SCHEMAS`; the served document
only lists paths that are routes of the running app, so documenting ahead of the code is harmless.
Request schemas mirror the pydantic models in api/openai.py: unknown fields are ignored
(`additionalProperties` stays open), known fields are checked.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

OPENAPI_VERSION = "3.1.0"


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def error_responses(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": f"#/components/responses/{_ERROR_RESPONSES[s]}"} for s in statuses}


# -- schemas ----------------------------------------------------------------------------------------

_RATE_HEADERS = {
    name: {"description": desc, "schema": {"type": "string"}}
    for name, desc in [
        ("x-ratelimit-limit-requests", "the key's requests per minute"),
        ("x-ratelimit-remaining-requests", "requests left in the current minute"),
        ("x-ratelimit-reset-requests", "time until the request window is empty, e.g. `12s`"),
        ("x-ratelimit-limit-tokens", "the key's tokens per minute"),
        ("x-ratelimit-remaining-tokens", "tokens left in the current minute"),
        ("x-ratelimit-reset-tokens", "time until the token window is empty"),
    ]
}
_RETRY_AFTER = {"description": "seconds to wait before retrying", "schema": {"type": "string"}}

# The sampling fields shared by chat and text completions (api/openai.py `_SamplingIn`).
SAMPLING_PROPERTIES: dict[str, Any] = {
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
    "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
    "stop": {
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}, {"type": "null"}]
    },
    "seed": {"type": ["integer", "null"]},
    "presence_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
    "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 1},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": nullable({"type": "object", "properties": {"include_usage": {"type": "boolean"}}}),
    "user": {"type": ["string", "null"]},
}
SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {
                        "type": "string",
                        "description": "invalid_request_error, server_error, or for 429: requests, tokens, streams",
                    },
                    "param": {"type": ["string", "null"]},
                    "code": {
                        "type": ["string", "null"],
                        "description": "e.g. invalid_api_key, rate_limit_exceeded, model_not_found, queue_full",
                    },
                },
            }
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "loading", "failed"]},
            "default_model": {"type": "string"},
            "models": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "aliases": {"type": "array", "items": {"type": "string"}},
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": ref("Model")}},
    },
    "Usage": {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            "prompt_tokens": {"type": "integer", "minimum": 0},
            "completion_tokens": {"type": "integer", "minimum": 0},
            "total_tokens": {"type": "integer", "minimum": 0},
            "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": {"type": "integer"}}},
        },
    },
    "TextPart": {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    },
    "ChatMessage": {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": ref("TextPart")}, {"type": "null"}]},
            "name": {"type": ["string", "null"]},
        },
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string", "minLength": 1, "examples": ["default"]},
            "messages": {"type": "array", "minItems": 1, "items": ref("ChatMessage")},
            "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
            **SAMPLING_PROPERTIES,
        },
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {
            "model": {"type": "string", "minLength": 1, "examples": ["default"]},
            "prompt": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
                ]
            },
            "echo": {"type": "boolean"},
            **SAMPLING_PROPERTIES,
        },
    },
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "message", "finish_reason"],
                    "properties": {
                        "index": {"type": "integer"},
                        "message": {
                            "type": "object",
                            "required": ["role", "content"],
                            "properties": {"role": {"const": "assistant"}, "content": {"type": ["string", "null"]}},
                        },
                        "finish_reason": {"type": "string"},
                    },
                },
            },
            "usage": ref("Usage"),
        },
    },
    "Completion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "text_completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "text", "finish_reason"],
                    "properties": {
                        "index": {"type": "integer"},
                        "text": {"type": "string"},
                        "finish_reason": {"type": ["string", "null"]},
                    },
                },
            },
            "usage": ref("Usage"),
        },
    },
    "EventStream": {
        "description": "One server-sent event (OpenAPI before 3.2: `schema` describes each event). `data` is a "
        "JSON chunk, an error object on failure, and `[DONE]` last",
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
    },
}

_ERROR_RESPONSES = {
    400: "BadRequest",
    401: "Unauthorized",
    404: "NotFound",
    413: "TooLarge",
    429: "RateLimited",
    500: "ServerError",
    502: "BadGateway",
    503: "Unavailable",
    504: "GatewayTimeout",
}


def _error_response(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": ref("Error")}}}
    if headers:
        out["headers"] = headers
    return out


RESPONSES: dict[str, Any] = {
    "BadRequest": _error_response("Invalid request: malformed JSON or an invalid field (`param` names it)"),
    "Unauthorized": _error_response(
        "Missing or wrong API key (`code: invalid_api_key`); only when API keys are configured",
        {"WWW-Authenticate": {"schema": {"type": "string"}}},
    ),
    "NotFound": _error_response("Unknown model (`code: model_not_found`)"),
    "TooLarge": _error_response("Body over APPLIANCE_MAX_BODY_BYTES (`code: request_too_large`)"),
    "RateLimited": _error_response(
        "A limit of the key was reached (`code: rate_limit_exceeded`, `type`: requests, tokens or streams)",
        {"Retry-After": _RETRY_AFTER, **_RATE_HEADERS},
    ),
    "ServerError": _error_response("An internal error (logged)"),
    "BadGateway": _error_response("An upstream backend answered badly (`code: upstream_error`)"),
    "Unavailable": _error_response(
        "No backend can take the request now: queue_full, queue_timeout, model_loading, worker_crashed, ...",
        {"Retry-After": _RETRY_AFTER},
    ),
    "GatewayTimeout": _error_response("No first token in time (`code: first_token_timeout`)"),
}

_GENERATION_ERRORS = error_responses(400, 401, 404, 413, 429, 500, 502, 503, 504)


def _generation(summary: str, request: str, response: str, op_id: str) -> dict[str, Any]:
    return {
        "post": {
            "operationId": op_id,
            "summary": summary,
            "tags": ["openai"],
            "requestBody": json_body(ref(request)),
            "responses": {
                "200": {
                    "description": "The completion (JSON), or with `stream: true` server-sent events",
                    "headers": {"X-Appliance-Backend": {"schema": {"type": "string"}}, **_RATE_HEADERS},
                    "content": {
                        "application/json": {"schema": ref(response)},
                        "text/event-stream": {"schema": ref("EventStream")},
                    },
                },
                **_GENERATION_ERRORS,
            },
        }
    }


PATHS: dict[str, dict[str, Any]] = {
    "/health": {
        "get": {
            "operationId": "health",
            "summary": "Liveness and readiness; `verbose=1` adds each model's backends",
            "tags": ["ops"],
            "security": [],
            "parameters": [
                {
                    "name": "verbose",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "`1`, `true` or `yes` for details",
                }
            ],
            "responses": {
                "200": {"description": "Serving", "content": {"application/json": {"schema": ref("Health")}}},
                "503": {
                    "description": "Loading or failed",
                    "content": {"application/json": {"schema": ref("Health")}},
                },
            },
        }
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics (a key is needed when auth is on, unless APPLIANCE_METRICS_PUBLIC=true)",
            "tags": ["ops"],
            "responses": {
                "200": {
                    "description": "Prometheus text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                **error_responses(401, 429),
            },
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "tags": ["ops"],
            "security": [],
            "responses": {
                "200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}
            },
        }
    },
    "/v1/models": {
        "get": {
            "operationId": "listModels",
            "summary": "The models served here (ids; aliases resolve too)",
            "tags": ["openai"],
            "responses": {
                "200": {"description": "Models", "content": {"application/json": {"schema": ref("ModelList")}}},
                **error_responses(401, 429),
            },
        }
    },
    "/v1/models/{model_id}": {
        "get": {
            "operationId": "getModel",
            "summary": "One model, by id or alias",
            "tags": ["openai"],
            "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "200": {"description": "The model", "content": {"application/json": {"schema": ref("Model")}}},
                **error_responses(401, 404, 429),
            },
        }
    },
    "/v1/chat/completions": _generation(
        "Chat completion", "ChatCompletionRequest", "ChatCompletion", "createChatCompletion"
    ),
    "/v1/completions": _generation("Text completion", "CompletionRequest", "Completion", "createCompletion"),
}


# -- Ollama-compatible endpoints (api/ollama.py) --------------------------------------------------------
# Ollama's own errors are {"error": "<message>"}; errors raised by the engine and by auth/limits keep the
# OpenAI shape, so `error` is a string or an object.

SCHEMAS.update(
    {
        "OllamaError": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"anyOf": [{"type": "string"}, SCHEMAS["Error"]["properties"]["error"]]}},
        },
        "OllamaOptions": {
            "type": "object",
            "properties": {
                "temperature": {"type": ["number", "null"], "minimum": 0},
                "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
                "top_k": {"type": ["integer", "null"], "minimum": 0},
                "min_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "seed": {"type": ["integer", "null"]},
                "num_predict": {"type": ["integer", "null"], "description": "tokens to generate; <= 0: the default"},
                "stop": {
                    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]
                },
                "presence_penalty": {"type": ["number", "null"]},
                "frequency_penalty": {"type": ["number", "null"]},
                "repeat_penalty": {"type": ["number", "null"], "minimum": 0},
            },
        },
        "OllamaKeepAlive": {
            "anyOf": [{"type": "number"}, {"type": "string"}, {"type": "null"}],
            "description": "seconds, or a duration such as `5m`, `1h30m`; < 0 keeps the model loaded, 0 unloads it",
        },
        "OllamaChatRequest": {
            "type": "object",
            "required": ["model"],
            "properties": {
                "model": {"type": "string", "minLength": 1, "examples": ["default"]},
                "messages": {
                    "type": "array",
                    "description": "empty: only load (or with keep_alive 0 unload) the model",
                    "items": {
                        "type": "object",
                        "required": ["role"],
                        "properties": {
                            "role": {"enum": ["system", "user", "assistant", "tool", "developer"]},
                            "content": {"type": "string"},
                        },
                    },
                },
                "stream": {"type": "boolean"},
                "options": nullable(ref("OllamaOptions")),
                "keep_alive": ref("OllamaKeepAlive"),
            },
        },
        "OllamaGenerateRequest": {
            "type": "object",
            "required": ["model"],
            "properties": {
                "model": {"type": "string", "minLength": 1, "examples": ["default"]},
                "prompt": {"type": "string", "description": "empty (and no system): only load or unload the model"},
                "system": {"type": ["string", "null"]},
                "raw": {"type": "boolean"},
                "stream": {"type": "boolean"},
                "options": nullable(ref("OllamaOptions")),
                "keep_alive": ref("OllamaKeepAlive"),
            },
        },
        "OllamaGeneration": {
            "type": "object",
            "required": ["model", "created_at", "done"],
            "properties": {
                "model": {"type": "string"},
                "created_at": {"type": "string"},
                "message": {
                    "type": "object",
                    "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
                },
                "response": {"type": "string"},
                "done": {"type": "boolean"},
                "done_reason": {"type": "string"},
                "prompt_eval_count": {"type": "integer"},
                "eval_count": {"type": "integer"},
            },
        },
        "OllamaModelList": {
            "type": "object",
            "required": ["models"],
            "properties": {
                "models": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "model"],
                        "properties": {"name": {"type": "string"}, "model": {"type": "string"}},
                    },
                }
            },
        },
        "OllamaModelRequest": {
            "type": "object",
            "properties": {"model": {"type": "string"}, "name": {"type": "string", "description": "older clients"}},
        },
        "OllamaShow": {
            "type": "object",
            "required": ["details"],
            "properties": {"details": {"type": "object"}, "capabilities": {"type": "array"}},
        },
        "OllamaEmbedRequest": {
            "type": "object",
            "required": ["model", "input"],
            "properties": {
                "model": {"type": "string", "minLength": 1},
                "input": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]},
                "keep_alive": ref("OllamaKeepAlive"),
            },
        },
        "OllamaEmbeddings": {
            "type": "object",
            "required": ["model", "embeddings"],
            "properties": {
                "model": {"type": "string"},
                "embeddings": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
            },
        },
    }
)


def _ollama_errors(*statuses: int) -> dict[str, Any]:
    out = {}
    for s in statuses:
        resp = copy.deepcopy(RESPONSES[_ERROR_RESPONSES[s]])
        if s not in (401, 429):  # auth and limits answer in the OpenAI shape on every route
            resp["content"] = {"application/json": {"schema": ref("OllamaError")}}
        out[str(s)] = resp
    return out


def _ollama_get(op_id: str, summary: str, response: str) -> dict[str, Any]:
    return {
        "get": {
            "operationId": op_id,
            "summary": summary,
            "tags": ["ollama"],
            "responses": {
                "200": {"description": summary, "content": {"application/json": {"schema": ref(response)}}},
                **error_responses(401, 429),
            },
        }
    }


def _ollama_post(op_id: str, summary: str, request: str, response: str, ndjson: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": ref(response)}}
    if ndjson:
        content["application/x-ndjson"] = {"schema": {"type": "string", "description": "one JSON object a line"}}
    return {
        "post": {
            "operationId": op_id,
            "summary": summary,
            "tags": ["ollama"],
            "requestBody": json_body(ref(request)),
            "responses": {
                "200": {
                    "description": summary + (" (NDJSON lines unless `stream: false`)" if ndjson else ""),
                    "content": content,
                },
                **_ollama_errors(400, 401, 404, 413, 429, 500, 502, 503, 504),
            },
        }
    }


PATHS.update(
    {
        "/api/chat": _ollama_post("ollamaChat", "Ollama chat", "OllamaChatRequest", "OllamaGeneration", True),
        "/api/generate": _ollama_post(
            "ollamaGenerate", "Ollama generate", "OllamaGenerateRequest", "OllamaGeneration", True
        ),
        "/api/show": _ollama_post("ollamaShow", "A model's details", "OllamaModelRequest", "OllamaShow", False),
        "/api/embed": _ollama_post("ollamaEmbed", "Embeddings", "OllamaEmbedRequest", "OllamaEmbeddings", False),
        "/api/tags": _ollama_get("ollamaTags", "The models served here", "OllamaModelList"),
        "/api/ps": _ollama_get("ollamaPs", "The models loaded now", "OllamaModelList"),
        "/api/version": {
            "get": {
                "operationId": "ollamaVersion",
                "summary": "The Ollama API version implemented",
                "tags": ["ollama"],
                "responses": {
                    "200": {
                        "description": "Version",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["version"],
                                    "properties": {"version": {"type": "string"}},
                                }
                            }
                        },
                    },
                    **error_responses(401, 429),
                },
            }
        },
    }
)


# -- embeddings, threads and memories (api/embeddings.py, api/threads.py) -----------------------------

_ERROR_RESPONSES.update({403: "Forbidden", 409: "Conflict"})
RESPONSES.update(
    {
        "Forbidden": _error_response("The API key may only use its own data (`code: forbidden`)"),
        "Conflict": _error_response("The thread is busy with a request (`code: thread_busy`)"),
    }
)
SCHEMAS.update(
    {
        "EmbeddingRequest": {
            "type": "object",
            "required": ["model", "input"],
            "properties": {
                "model": {"type": "string", "minLength": 1},
                "input": {
                    "anyOf": [
                        {"type": "string", "minLength": 1},
                        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                    ],
                    "description": "non-blank strings; token arrays are not supported",
                },
                "encoding_format": {"enum": ["float", "base64"]},
                "dimensions": {"type": ["integer", "null"], "description": "only the model's own (384)"},
                "user": {"type": "string"},
            },
        },
        "EmbeddingList": {
            "type": "object",
            "required": ["object", "data", "model", "usage"],
            "properties": {
                "object": {"const": "list"},
                "model": {"type": "string"},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["object", "index", "embedding"],
                        "properties": {
                            "object": {"const": "embedding"},
                            "index": {"type": "integer"},
                            "embedding": {
                                "anyOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]
                            },
                        },
                    },
                },
                "usage": {"type": "object", "properties": {"prompt_tokens": {"type": "integer"}}},
            },
        },
        "Thread": {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}},
        "ThreadList": {
            "type": "object",
            "required": ["object", "data", "has_more"],
            "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": ref("Thread")},
                "has_more": {"type": "boolean"},
            },
        },
        "Deleted": {
            "type": "object",
            "required": ["object", "deleted"],
            "properties": {"id": {"type": "string"}, "object": {"type": "string"}, "deleted": {}},
        },
        "Memory": {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}},
        "MemoryList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "user": {"type": "string"},
                "data": {"type": "array", "items": ref("Memory")},
                "has_more": {"type": "boolean"},
            },
        },
        "MemoryRequest": {
            "type": "object",
            "required": ["text"],
            "properties": {"text": {"type": "string", "minLength": 1}, "user": {"type": ["string", "null"]}},
        },
    }
)


def _query(name: str, schema: dict[str, Any], description: str = "", required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


def _op(op_id: str, summary: str, response: str, *errors: int, status: int = 200, **extra: Any) -> dict[str, Any]:
    return {
        "operationId": op_id,
        "summary": summary,
        "tags": ["agent"],
        **extra,
        "responses": {
            str(status): {"description": summary, "content": {"application/json": {"schema": ref(response)}}},
            **error_responses(401, 429, 503, *errors),
        },
    }


_USER = _query("user", {"type": "string"}, "whose memories (without API keys); with keys only the key's own")
_LIMIT_100 = _query("limit", {"type": "integer", "minimum": 1, "maximum": 100})
PATHS.update(
    {
        "/v1/embeddings": {
            "post": {
                "operationId": "createEmbeddings",
                "summary": "Embeddings (OpenAI shape) from the built-in sentence-transformers model",
                "tags": ["openai"],
                "requestBody": json_body(ref("EmbeddingRequest")),
                "responses": {
                    "200": {
                        "description": "Vectors",
                        "content": {"application/json": {"schema": ref("EmbeddingList")}},
                    },
                    **error_responses(400, 401, 404, 413, 429, 503),
                },
            }
        },
        "/v1/threads": {
            "get": _op(
                "listThreads",
                "The agent's conversation threads",
                "ThreadList",
                400,
                parameters=[_LIMIT_100, _query("after", {"type": "string"}, "cursor: a thread id"), _USER],
            )
        },
        "/v1/threads/{thread_id}": {
            "parameters": [{"name": "thread_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "get": _op("getThread", "A thread with its messages", "Thread", 400, 404),
            "delete": _op("deleteThread", "Delete a thread", "Deleted", 400, 404, 409),
        },
        "/v1/memories": {
            "get": _op(
                "listMemories",
                "Long-term memories of a user",
                "MemoryList",
                400,
                403,
                parameters=[
                    _USER,
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                    _query("offset", {"type": "integer", "minimum": 0, "maximum": 10**9}),
                ],
            ),
            "post": _op(
                "createMemory",
                "Remember a fact",
                "Memory",
                400,
                403,
                413,
                status=201,
                requestBody=json_body(ref("MemoryRequest")),
            ),
            "delete": _op("deleteMemories", "Forget all of a user's memories", "Deleted", 403, parameters=[_USER]),
        },
        "/v1/memories/search": {
            "get": _op(
                "searchMemories",
                "Memories nearest in meaning to `q`",
                "MemoryList",
                400,
                403,
                parameters=[_query("q", {"type": "string", "minLength": 1}, required=True), _USER, _LIMIT_100],
            )
        },
        "/v1/memories/{memory_id}": {
            "delete": _op(
                "deleteMemory",
                "Forget one memory",
                "Deleted",
                403,
                404,
                parameters=[{"name": "memory_id", "in": "path", "required": True, "schema": {"type": "string"}}, _USER],
            )
        },
    }
)


def add_paths(paths: dict[str, dict[str, Any]], schemas: dict[str, Any] | None = None) -> None:
    """Document more endpoints (call at import time of the module that defines them)."""
    PATHS.update(paths)
    SCHEMAS.update(schemas or {})


# -- the document -------------------------------------------------------------------------------------

_PARAM = re.compile(r"\{([^}:]+)(:[^}]*)?\}")


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


def document(routes: Any = None) -> dict[str, Any]:
    """The OpenAPI document; with `routes`, only the paths the app actually serves."""
    served = _route_paths(routes) if routes is not None else None
    paths = {p: item for p, item in PATHS.items() if served is None or p in served}
    return copy.deepcopy(
        {
            "openapi": OPENAPI_VERSION,
            "info": {
                "title": "The appliance",
                "version": "1",
                "description": "A self-hosted LLM inference server: OpenAI-compatible API over local models. "
                "Errors always have the shape of the `Error` schema.",
            },
            "paths": paths,
            "components": {
                "schemas": SCHEMAS,
                "responses": RESPONSES,
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
    )


async def endpoint(request: Request) -> Response:
    return JSONResponse(document(request.app.routes))
