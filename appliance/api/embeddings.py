"""POST /v1/embeddings: OpenAI's request and response shape over the sentence-transformers model.

`encoding_format` "base64" sends little-endian float32 bytes, base64-encoded, as OpenAI does. The model
loads on first use (or in the background); until it is ready a request waits up to
APPLIANCE_EMBEDDINGS_WAIT seconds, then gets a 503 `embeddings_loading`.
"""

from __future__ import annotations

import base64
import struct

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance.api.protocol import openai as wire
from appliance.api.protocol.common import client_error, embedding_inputs, parse
from appliance.api.sse import json_response


def encode_base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def create_embeddings(request: Request) -> Response:
    body = parse(wire.EmbeddingRequest, await request.body())
    service = request.app.state.embeddings
    entry = request.app.state.engine.registry.get(body.model)  # 404 model_not_found if unknown
    if entry.kind != "embedding":
        raise client_error(
            400, f"'{body.model}' is not an embedding model; use '{service.id}'.", "model_not_supported", "model"
        )
    if body.dimensions is not None and body.dimensions != service.dimensions:
        raise client_error(
            400,
            f"'{entry.id}' has {service.dimensions} dimensions; 'dimensions' cannot change that.",
            "invalid_value",
            "dimensions",
        )
    texts = embedding_inputs(body.input)
    vectors, tokens = await service.embed_with_usage(texts)
    request.state.model, request.state.prompt_tokens = entry.id, tokens
    request.state.embedding_inputs = len(texts)
    b64 = body.encoding_format == "base64"
    data = [wire.Embedding(index=i, embedding=encode_base64(v) if b64 else v) for i, v in enumerate(vectors)]
    usage = wire.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    return json_response(wire.EmbeddingList(data=data, model=entry.id, usage=usage))


routes = [Route("/v1/embeddings", create_embeddings, methods=["POST"])]
