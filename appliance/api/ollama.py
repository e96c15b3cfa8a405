"""Ollama-compatible handlers: /api/chat, /api/generate, /api/tags, /api/ps, /api/show, /api/version, /api/embed.

Thin: parse (api/protocol/ollama.py) → engine → render → frame. Errors are Ollama's `{"error": "..."}`
(api/errors.py picks the dialect by path).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance import __version__
from appliance.api.errors import client_error, error_response
from appliance.api.protocol import ollama as wire
from appliance.api.protocol.common import embedding_inputs, parse
from appliance.api.sse import json_response, ndjson_response
from appliance.api.streaming import caller, collect, note_request, pump, until_disconnect
from appliance.catalog import peek_model_path
from appliance.engine.registry import ModelEntry
from appliance.engine.router import Engine
from appliance.engine.types import EngineError, GenerateRequest, TokenLogprob, ToolCallDelta, assemble_tool_calls
from appliance.gguf_meta import GGUFError, read_info


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _resolve(request: Request, name: str) -> ModelEntry:
    reg = _engine(request).registry
    try:
        return reg.get(name)
    except EngineError:
        if name.endswith(":latest"):
            return reg.get(name.removesuffix(":latest"))
        raise EngineError.of(404, f"model '{name}' not found", code="model_not_found", param="model") from None


def _generative(request: Request, name: str) -> ModelEntry:
    entry = _resolve(request, name)
    if entry.kind == "embedding":
        raise client_error(400, f'"{entry.id}" does not support chat or generate (it is an embedding model)')
    return entry


async def _respond(request: Request, kind: Literal["chat", "generate"], req: GenerateRequest, streamed: bool):
    note_request(request, req)
    stream = await until_disconnect(request, _engine(request).open(req))
    renderer = wire.Renderer(kind, req.model, stream)
    headers = {"X-Appliance-Backend": stream.backend}
    if streamed:
        return ndjson_response(pump(request, stream, renderer), headers)
    deltas: list[ToolCallDelta] = []
    lps: list[TokenLogprob] | None = [] if req.params.logprobs is not None else None
    text, finish, err = await collect(request, stream, deltas, lps)
    if err is not None:
        return error_response(err, request.url.path, headers)
    assert finish is not None
    return json_response(renderer.whole(text, finish, assemble_tool_calls(deltas), lps), headers)


async def chat(request: Request) -> Response:
    body = parse(wire.ChatRequest, await request.body())
    entry = _generative(request, body.model)
    if not body.messages:  # Ollama: an empty chat loads (or, with keep_alive 0, unloads) the model
        return await _load_or_unload(request, "chat", entry, wire.parse_keep_alive(body.keep_alive))
    return await _respond(request, "chat", wire.chat_request(body, entry.id, **caller(request)), body.stream)


async def generate(request: Request) -> Response:
    body = parse(wire.GenerateRequest, await request.body())
    entry = _generative(request, body.model)
    if not body.prompt and not body.system:
        return await _load_or_unload(request, "generate", entry, wire.parse_keep_alive(body.keep_alive))
    return await _respond(request, "generate", wire.generate_request(body, entry.id, **caller(request)), body.stream)


async def _load_or_unload(
    request: Request, kind: Literal["chat", "generate"], entry: ModelEntry, keep_alive: float | None
) -> Response:
    unload = keep_alive == 0
    backend = next((b for b in entry.backends if b.can_load), None)
    if backend is not None:
        if unload:
            if getattr(request.state, "role", "admin") != "admin":
                raise client_error(403, "Only an admin key may unload a model.", "forbidden", "keep_alive")
            await backend.unload("keep_alive 0")
        else:
            await backend.load(keep_alive)
    return json_response(wire.load_response(kind, entry.id, unload))


def _details(request: Request, entry: ModelEntry) -> tuple[wire.ModelDetails, int, str]:
    """Ollama's `details` for a model, its file size and a digest-like id."""
    st = entry.backends[0].status()
    path: str | None = st.path
    if st.kind == "llamacpp" and path is not None and not Path(path).is_file():  # not resolved yet
        found = peek_model_path(path, request.app.state.settings.models_dir)
        path = str(found) if found is not None else None
    details = wire.ModelDetails(format="gguf" if st.kind == "llamacpp" else st.kind)
    size = 0
    if path is not None:
        with contextlib.suppress(OSError, GGUFError):
            info = read_info(Path(path))
            details = wire.ModelDetails(
                family=info.architecture,
                families=[info.architecture],
                parameter_size=info.parameters_label,
                quantization_level=info.quantization,
            )
            size = info.size
    digest = hashlib.sha256(f"{entry.id}:{path}:{size}".encode()).hexdigest()
    return details, size, digest


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


async def tags(request: Request) -> Response:
    models = []
    for entry in _engine(request).registry:  # every model /v1/models lists: the agent and embeddings too
        details, size, digest = _details(request, entry)
        modified = _iso(datetime.fromtimestamp(entry.created, UTC))
        models.append(
            wire.ModelTag(
                name=entry.id, model=entry.id, modified_at=modified, size=size, digest=digest, details=details
            )
        )
    return json_response(wire.TagsResponse(models=models))


async def ps(request: Request) -> Response:
    models = []
    for entry in _engine(request).registry:
        for b in entry.backends:
            st = b.status()
            if not st.loaded:
                continue
            details, _, digest = _details(request, entry)
            expires = (
                datetime.now(UTC) + timedelta(seconds=st.expires_in)
                if st.expires_in is not None
                else datetime(2318, 1, 1, tzinfo=UTC)  # Ollama's "forever"
            )
            models.append(
                wire.RunningModel(
                    name=entry.id,
                    model=entry.id,
                    size=st.memory_bytes,
                    digest=digest,
                    details=details,
                    expires_at=_iso(expires),
                    context_length=st.context_length or 0,
                )
            )
    return json_response(wire.PsResponse(models=models))


async def show(request: Request) -> Response:
    body = parse(wire.ModelRequest, await request.body())
    entry = _resolve(request, body.target)
    details, _, _ = _details(request, entry)
    model_info: dict[str, Any] = {}
    path = entry.backends[0].status().path
    if path is not None:
        with contextlib.suppress(OSError, GGUFError):
            model_info = read_info(Path(path)).metadata
    caps = ["embedding"] if entry.kind == "embedding" else ["completion", "tools"]
    return json_response(
        wire.ShowResponse(
            modelfile=f"# served by the appliance\nFROM {entry.id}\n",
            details=details,
            model_info=model_info,
            capabilities=caps,
            modified_at=wire.now(),
        )
    )


async def version(request: Request) -> Response:
    return json_response(wire.VersionResponse(version=wire.OLLAMA_COMPAT_VERSION, appliance=__version__))


async def embed(request: Request) -> Response:
    body = parse(wire.EmbedRequest, await request.body())
    entry = _resolve(request, body.model)
    svc = getattr(request.app.state, "embeddings", None)
    if svc is None or entry.kind != "embedding":
        raise client_error(400, f'"{entry.id}" does not support embeddings', param="model")
    texts = embedding_inputs(body.input)
    t0 = time.monotonic()
    vectors, tokens = await svc.embed_with_usage(texts)
    request.state.model, request.state.prompt_tokens = entry.id, tokens
    request.state.embedding_inputs = len(texts)
    return json_response(
        wire.EmbedResponse(
            model=entry.id, embeddings=vectors, total_duration=wire.ns(time.monotonic() - t0), prompt_eval_count=tokens
        )
    )


routes = [
    Route("/api/chat", chat, methods=["POST"]),
    Route("/api/generate", generate, methods=["POST"]),
    Route("/api/tags", tags, methods=["GET"]),
    Route("/api/ps", ps, methods=["GET"]),
    Route("/api/show", show, methods=["POST"]),
    Route("/api/version", version, methods=["GET"]),
    Route("/api/embed", embed, methods=["POST"]),
]
