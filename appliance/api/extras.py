"""Ollama's model management (/api/pull, /api/delete, /api/copy) and legacy /api/embeddings; llama-server's
/tokenize and /detokenize.

Pulling, deleting and copying change the models file and what this server serves at once; they need an
admin key (security/roles.py). A pull's download, check and placement are appliance/models_pull.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance import models_pull
from appliance.api.errors import client_error, error_body, error_response
from appliance.api.protocol import extras as wire
from appliance.api.protocol.common import parse
from appliance.api.sse import json_response, ndjson_response
from appliance.backends.base import Tokenizes
from appliance.config import ConfigError, LlamaCppBackendSpec, ModelsFile, ModelSpec, load_models_file
from appliance.engine.registry import ModelEntry, Registry
from appliance.engine.types import EngineError, Error
from appliance.security.roles import require_role

log = logging.getLogger("appliance.api")
PROGRESS_INTERVAL = 0.1  # seconds between download progress lines


def _registry(request: Request) -> Registry:
    return request.app.state.engine.registry


def _entry(request: Request, name: str) -> ModelEntry:
    reg = _registry(request)
    try:
        return reg.get(name)
    except EngineError:
        if name.endswith(":latest"):
            return _entry(request, name.removesuffix(":latest"))
        raise client_error(404, f"model '{name}' not found", "model_not_found", "model") from None


# -- /api/pull ------------------------------------------------------------------------------------------


async def _serve_pulled(request: Request, spec: ModelSpec) -> None:
    """Serve the pulled model now: a new entry is registered; a model pulled again is unloaded, so that its
    next request loads the new file."""
    reg = _registry(request)
    entry = reg.entries.get(spec.id)
    if entry is None:
        with contextlib.suppress(ConfigError):  # a name taken by something the appliance serves itself
            reg.register(spec)
        return
    for b in entry.backends:
        await b.unload("pulled again")


async def pull(request: Request) -> Response:
    require_role(request, "admin", param="model")
    body = parse(wire.PullRequest, await request.body())
    source = body.target
    try:
        models_pull.resolve(source, os.environ)  # a malformed source is a 400 before any progress line
    except models_pull.PullError as e:
        raise client_error(e.status, str(e), param="model") from None
    settings = request.app.state.settings
    lines: asyncio.Queue[BaseModel | None] = asyncio.Queue()
    last = [0.0, ""]

    def progress(status: str, done: int, total: int | None, digest: str | None) -> None:
        now = time.monotonic()
        if status == last[1] and now - last[0] < PROGRESS_INTERVAL and done != total:
            return
        last[0], last[1] = now, status
        if status.startswith("downloading"):
            digest = digest or (f"sha256:{body.sha256.lower()}" if body.sha256 else None)
            lines.put_nowait(wire.ProgressResponse(status=status, digest=digest, total=total, completed=done))
        elif status != "success":
            lines.put_nowait(wire.ProgressResponse(status=status))

    async def run() -> None:
        try:
            spec, _ = await models_pull.pull(settings, source, sha256=body.sha256, progress=progress)
            await _serve_pulled(request, spec)
            lines.put_nowait(wire.ProgressResponse(status="success"))
        except models_pull.PullError as e:
            lines.put_nowait(error_body(Error(e.status, str(e), "invalid_request_error"), request.url.path))
            raise
        except Exception as e:
            log.exception("pull of %s failed", source)
            err = Error(500, f"the pull failed: {type(e).__name__}: {e}", "server_error")
            lines.put_nowait(error_body(err, request.url.path))
            raise models_pull.PullError(500, err.message) from e
        finally:
            lines.put_nowait(None)

    task = asyncio.create_task(run())
    if not body.stream:
        try:
            await task
        except models_pull.PullError as e:
            return error_response(Error(e.status, str(e), "invalid_request_error"), request.url.path)
        return json_response(wire.StatusResponse())

    async def stream() -> AsyncIterator[BaseModel]:
        try:
            while (line := await lines.get()) is not None:
                yield line
        finally:
            if not task.done():
                task.cancel()  # the client left: stop; the partial file stays for a resume
            with contextlib.suppress(BaseException):
                await task

    return ndjson_response(stream())


# -- /api/delete and /api/copy ----------------------------------------------------------------------------


def _file_of(settings, spec: ModelSpec) -> Path | None:
    """The model file the appliance owns (in its models directory), if the entry has one."""
    b = spec.backends[0]
    if not isinstance(b, LlamaCppBackendSpec) or b.path.startswith("embedded:"):
        return None
    p = Path(b.path) if Path(b.path).is_absolute() else settings.models_dir / b.path
    return p if p.parent.resolve() == settings.models_dir.resolve() else None


def _models_file_entry(request: Request, name: str) -> tuple[ModelsFile, ModelSpec, ModelEntry]:
    entry = _entry(request, name)
    settings = request.app.state.settings
    models = load_models_file(settings)
    spec = next((m for m in models.models if m.id == entry.id), None)
    if spec is None:
        raise client_error(400, f"'{entry.id}' is not an entry of the models file", param="model")
    return models, spec, entry


async def delete(request: Request) -> Response:
    require_role(request, "admin", param="model")
    body = parse(wire.DeleteRequest, await request.body())
    settings = request.app.state.settings
    models, spec, entry = _models_file_entry(request, body.target)
    if entry is _registry(request).default:
        raise client_error(400, f"'{entry.id}' is the default model (APPLIANCE_DEFAULT_MODEL)", param="model")
    models.models.remove(spec)
    _write(settings, models)
    removed = _registry(request).remove(entry.id)
    path = _file_of(settings, spec)
    if path is not None and all(_file_of(settings, m) != path for m in models.models):
        path.unlink(missing_ok=True)
    for b in removed.backends:
        await b.close()
    return json_response(wire.StatusResponse())


async def copy_model(request: Request) -> Response:
    require_role(request, "admin", param="source")
    body = parse(wire.CopyRequest, await request.body())
    models, spec, _ = _models_file_entry(request, body.source)
    names = {n for m in models.models for n in (m.id, *m.aliases)}
    if body.destination in names or _served(_registry(request), body.destination):
        raise client_error(400, f"a model named '{body.destination}' already exists", param="destination")
    new = ModelSpec(id=body.destination, backends=copy.deepcopy(spec.backends))
    models.models.append(new)
    _write(request.app.state.settings, models)
    _registry(request).register(new)
    return json_response(wire.StatusResponse())


def _served(reg: Registry, name: str) -> bool:
    try:
        reg.get(name)
    except EngineError:
        return False
    return True


def _write(settings, models: ModelsFile) -> None:
    try:
        models_pull.write_models(settings, models)
    except (ConfigError, OSError) as e:
        raise EngineError(Error(500, f"cannot write the models file: {e}", "server_error")) from None


# -- /api/embeddings (legacy) ------------------------------------------------------------------------------


async def legacy_embeddings(request: Request) -> Response:
    body = parse(wire.LegacyEmbeddingsRequest, await request.body())
    entry = _entry(request, body.model)
    svc = getattr(request.app.state, "embeddings", None)
    if svc is None or entry.kind != "embedding":
        raise client_error(400, f'"{entry.id}" does not support embeddings', param="model")
    if not body.prompt:
        return json_response(wire.LegacyEmbeddingsResponse(embedding=[]))  # as Ollama answers
    vectors, tokens = await svc.embed_with_usage([body.prompt])
    request.state.model, request.state.prompt_tokens, request.state.embedding_inputs = entry.id, tokens, 1
    return json_response(wire.LegacyEmbeddingsResponse(embedding=vectors[0]))


# -- /tokenize and /detokenize ------------------------------------------------------------------------------


def _tokenizer(request: Request, model: str) -> Tokenizes:
    entry = _registry(request).get(model)
    for b in entry.backends:
        if isinstance(b, Tokenizes):
            return b
    raise client_error(400, f"'{entry.id}' has no local tokenizer (only llama.cpp models do)", param="model")


async def tokenize(request: Request) -> Response:
    body = parse(wire.TokenizeRequest, await request.body())
    tokens = await _tokenizer(request, body.model).tokenize(body.content, body.add_special)
    return json_response(wire.TokenizeResponse(tokens=tokens))


async def detokenize(request: Request) -> Response:
    body = parse(wire.DetokenizeRequest, await request.body())
    text = await _tokenizer(request, body.model).detokenize(body.tokens)
    return json_response(wire.DetokenizeResponse(content=text))


routes = [
    Route("/api/pull", pull, methods=["POST"]),
    Route("/api/delete", delete, methods=["DELETE"]),
    Route("/api/copy", copy_model, methods=["POST"]),
    Route("/api/embeddings", legacy_embeddings, methods=["POST"]),
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/detokenize", detokenize, methods=["POST"]),
]
