"""POST /v1/embeddings: OpenAI's request and response shape over the sentence-transformers model.

`input` is a string or a list of strings (token arrays are not supported); `encoding_format` is "float"
(default) or "base64" (little-endian float32 bytes, base64-encoded, as OpenAI sends them). Vectors have
384 dimensions and unit length. The model loads in the background; until it is ready a request waits up to
APPLIANCE_EMBEDDINGS_WAIT seconds, then gets a 503 `embeddings_loading`.
"""

from __future__ import annotations

import base64
import struct
from typing import Any, Literal

from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from appliance.api.errors import client_error, parse_json
from appliance.api.openai import RequestModel, parse_request
from appliance.memory.embeddings import MAX_INPUTS, EmbeddingService


class EmbeddingsIn(RequestModel):
    model: str = Field(min_length=1)
    input: Any  # a string or a list of strings: checked by _inputs() with messages of its own
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def _inputs(raw: Any) -> list[str]:
    if isinstance(raw, str):
        items = [raw]
    elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        items = raw
    elif isinstance(raw, list) and raw and all(isinstance(x, int | list) for x in raw):
        raise client_error(400, "Token arrays are not supported as 'input'; send strings.", "invalid_value", "input")
    else:
        raise client_error(
            400, "Invalid value for 'input': expected a string or a list of strings.", "invalid_value", "input"
        )
    if not items:
        raise client_error(400, "'input' must not be empty.", "invalid_value", "input")
    if len(items) > MAX_INPUTS:
        raise client_error(400, f"'input' may hold at most {MAX_INPUTS} strings.", "invalid_value", "input")
    for i, s in enumerate(items):
        if not s.strip():
            param = "input" if isinstance(raw, str) else f"input[{i}]"
            raise client_error(400, f"'{param}' must not be empty.", "invalid_value", param)
    return items


def encode_base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def create_embeddings(request: Request) -> Response:
    body: EmbeddingsIn = parse_request(EmbeddingsIn, await parse_json(request))
    service: EmbeddingService = request.app.state.embeddings
    model = body.model
    entry = request.app.state.engine.registry.get(model)  # 404 model_not_found if unknown
    if entry.kind != "embedding":
        raise client_error(
            400,
            f"'{model}' is not an embedding model; use '{service.id}'.",
            code="model_not_supported",
            param="model",
        )
    fmt = body.encoding_format
    dims = body.dimensions
    if dims is not None and dims != service.dimensions:
        raise client_error(
            400,
            f"'{entry.id}' has {service.dimensions} dimensions; 'dimensions' cannot change that.",
            "invalid_value",
            "dimensions",
        )
    texts = _inputs(body.input)
    vectors, tokens = await service.embed_with_usage(texts)
    request.state.model = entry.id
    request.state.prompt_tokens = tokens
    data = [
        {"object": "embedding", "index": i, "embedding": encode_base64(v) if fmt == "base64" else v}
        for i, v in enumerate(vectors)
    ]
    return JSONResponse(
        {"object": "list", "data": data, "model": entry.id, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    )


routes = [Route("/v1/embeddings", create_embeddings, methods=["POST"])]
