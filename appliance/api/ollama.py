"""Ollama-compatible wire format: /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version, /api/embed.

Follows Ollama's documented fields; errors are `{"error": "..."}`. Only translation lives here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from appliance import __version__
from appliance.api.openai import record
from appliance.api.streaming import collect, until_disconnect
from appliance.catalog import peek_model_path
from appliance.engine.registry import ModelEntry
from appliance.engine.router import Engine, Stream
from appliance.engine.types import EngineError, Error, Finish, GenerateRequest, Message, SamplingParams, Token
from appliance.gguf_meta import GGUFError, read_info

# Ollama clients and UIs gate features on this; we implement the API of this Ollama release.
OLLAMA_COMPAT_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Options(_In):
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    num_predict: int | None = None
    stop: list[str] | str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_penalty: float | None = Field(None, ge=0)


class ChatMessageIn(_In):
    role: str = Field(pattern="^(system|user|assistant|tool|developer)$")
    content: str = ""


class ChatIn(_In):
    model: str = Field(min_length=1)
    messages: list[ChatMessageIn] = []
    stream: bool = True
    options: Options | None = None
    keep_alive: float | str | None = None


class GenerateIn(_In):
    model: str = Field(min_length=1)
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    options: Options | None = None
    keep_alive: float | str | None = None


class ModelIn(_In):
    model: str = ""
    name: str = ""  # older clients


class EmbedIn(_In):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(min_length=1)
    keep_alive: float | str | None = None


def ollama_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _body(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError.of(400, f"invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise EngineError.of(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise EngineError.of(400, f"invalid {where}: {err['msg']}") from None


_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_keep_alive(value: float | str | None) -> float | None:
    """Ollama's keep_alive: seconds as a number, or a Go duration ("5m", "1h30m", "-1"); < 0 means forever."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        s = value.strip()
        try:
            seconds = float(s)
        except ValueError:
            parts = _DURATION.findall(s)
            if not parts or "".join(n + u for n, u in parts) != s:
                raise EngineError.of(400, f"invalid keep_alive duration {value!r}") from None
            scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
            seconds = sum(float(n) * scale[u] for n, u in parts)
    if not math.isfinite(seconds):
        raise EngineError.of(400, f"invalid keep_alive duration {value!r}")
    return -1.0 if seconds > _FOREVER else seconds


_FOREVER = 10 * 365 * 86400.0  # longer than this is "forever" (and keeps datetimes in range)


def _sampling(o: Options | None) -> SamplingParams:
    p = SamplingParams(temperature=0.8, top_p=0.9)  # Ollama's defaults
    if o is None:
        return p
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty"):
        v = getattr(o, name)
        if v is not None:
            setattr(p, name, v)
    if o.repeat_penalty is not None:
        p.repeat_penalty = o.repeat_penalty
    if o.num_predict is not None and o.num_predict > 0:
        p.max_tokens = o.num_predict
    if o.stop:
        p.stop = [o.stop] if isinstance(o.stop, str) else list(o.stop)
    return p


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _resolve(request: Request, name: str) -> ModelEntry:
    reg = _engine(request).registry
    try:
        return reg.get(name)
    except EngineError:
        if name.endswith(":latest"):
            return reg.get(name.removesuffix(":latest"))
        raise EngineError.of(404, f"model '{name}' not found") from None


def _ns(seconds: float | None) -> int:
    return int((seconds or 0) * 1e9)


def _final(stream: Stream, finish: Finish) -> dict[str, Any]:
    total = time.monotonic() - stream.started
    ttft = stream.ttft or 0.0
    return {
        "done": True,
        "done_reason": finish.reason,
        "total_duration": _ns(total),
        "load_duration": 0,
        "prompt_eval_count": finish.usage.prompt_tokens,
        "prompt_eval_duration": _ns(ttft),
        "eval_count": finish.usage.completion_tokens,
        "eval_duration": _ns(max(0.0, total - ttft)),
    }


async def _respond(request: Request, req: GenerateRequest, stream_out: bool, piece) -> Response:
    """Run `req` and answer as NDJSON lines or one JSON object; `piece(text)` builds the per-chunk fields."""
    stream = await until_disconnect(request, _engine(request).open(req))
    model = req.model
    headers = {"X-Appliance-Backend": stream.backend}
    if stream_out:

        async def lines() -> AsyncIterator[bytes]:
            try:
                async for ev in stream:
                    if isinstance(ev, Token):
                        obj = {"model": model, "created_at": _now(), **piece(ev.text), "done": False}
                    elif isinstance(ev, Finish):
                        obj = {"model": model, "created_at": _now(), **piece(""), **_final(stream, ev)}
                    else:
                        assert isinstance(ev, Error)
                        obj = {"error": ev.message}
                    yield json.dumps(obj, ensure_ascii=False).encode() + b"\n"
            finally:
                record(request, stream)
                await stream.aclose()

        return StreamingResponse(lines(), media_type=NDJSON, headers={**headers, "X-Accel-Buffering": "no"})
    text, finish, err = await until_disconnect(request, collect(stream))
    record(request, stream)
    if err is not None:
        return ollama_error(err.status, err.message)
    assert finish is not None
    return JSONResponse(
        {"model": model, "created_at": _now(), **piece(text), **_final(stream, finish)}, headers=headers
    )


def _check_generative(entry: ModelEntry) -> None:
    if entry.kind == "embedding":
        raise EngineError.of(400, f'"{entry.id}" does not support chat or generate (it is an embedding model)')


async def chat(request: Request) -> Response:
    body: ChatIn = await _body(request, ChatIn)
    entry = _resolve(request, body.model)
    _check_generative(entry)
    keep_alive = parse_keep_alive(body.keep_alive)
    if not body.messages:  # Ollama: an empty chat loads (or, with keep_alive 0, unloads) the model
        return await _load_or_unload(request, entry, keep_alive, {"message": {"role": "assistant", "content": ""}})
    req = GenerateRequest(
        model=entry.id,
        messages=[Message(m.role, m.content) for m in body.messages],  # type: ignore[arg-type]
        params=_sampling(body.options),
        principal=getattr(request.state, "principal", None),
        request_id=request.state.request_id,
        keep_alive=keep_alive,
    )
    return await _respond(request, req, body.stream, lambda t: {"message": {"role": "assistant", "content": t}})


async def generate(request: Request) -> Response:
    body: GenerateIn = await _body(request, GenerateIn)
    entry = _resolve(request, body.model)
    _check_generative(entry)
    keep_alive = parse_keep_alive(body.keep_alive)
    if not body.prompt and not body.system:
        return await _load_or_unload(request, entry, keep_alive, {"response": ""})
    common = {
        "model": entry.id,
        "params": _sampling(body.options),
        "principal": getattr(request.state, "principal", None),
        "request_id": request.state.request_id,
        "keep_alive": keep_alive,
    }
    if body.raw:
        req = GenerateRequest(prompt=body.prompt, **common)
    else:  # Ollama applies the model's template to prompt (and system)
        msgs = ([Message("system", body.system)] if body.system else []) + [Message("user", body.prompt)]
        req = GenerateRequest(messages=msgs, **common)
    return await _respond(request, req, body.stream, lambda t: {"response": t})


async def _load_or_unload(request: Request, entry: ModelEntry, keep_alive: float | None, empty: dict) -> Response:
    reason = "load"
    for b in entry.backends:
        if not hasattr(b, "unload"):
            continue
        if keep_alive == 0:
            await b.unload("keep_alive 0")
            reason = "unload"
        else:
            await b.load(keep_alive)
        break
    return JSONResponse({"model": entry.id, "created_at": _now(), **empty, "done": True, "done_reason": reason})


def _details(entry: ModelEntry) -> tuple[dict[str, Any], int, str]:
    """Ollama's `details` for a model, its file size and a digest-like id."""
    b = entry.backends[0]
    path = getattr(b, "path", None)
    if path is None and getattr(getattr(b, "spec", None), "type", "") == "llamacpp":
        path = peek_model_path(b.spec.path, b.settings.models_dir)
    details: dict[str, Any] = {
        "parent_model": "",
        "format": "gguf",
        "family": "",
        "families": None,
        "parameter_size": "",
        "quantization_level": "",
    }
    size = 0
    if path is not None:
        try:
            info = read_info(path)
            details.update(
                family=info.architecture,
                families=[info.architecture],
                parameter_size=info.parameters_label,
                quantization_level=info.quantization,
            )
            size = info.size
        except (OSError, GGUFError):
            pass
    else:
        details["format"] = getattr(b, "name", "")
    digest = hashlib.sha256(f"{entry.id}:{path}:{size}".encode()).hexdigest()
    return details, size, digest


async def tags(request: Request) -> Response:
    models = []
    for entry in _engine(request).registry:
        if entry.kind != "chat":
            continue
        details, size, digest = _details(entry)
        modified = datetime.fromtimestamp(entry.created, UTC).isoformat().replace("+00:00", "Z")
        models.append(
            {
                "name": entry.id,
                "model": entry.id,
                "modified_at": modified,
                "size": size,
                "digest": digest,
                "details": details,
            }
        )
    return JSONResponse({"models": models})


async def ps(request: Request) -> Response:
    models = []
    now = time.monotonic()
    for entry in _engine(request).registry:
        for b in entry.backends:
            if not getattr(b, "loaded", False):
                continue
            details, _, digest = _details(entry)
            expires = (
                datetime.now(UTC) + timedelta(seconds=b.expires_at - now)
                if b.expires_at is not None
                else datetime(2318, 1, 1, tzinfo=UTC)  # Ollama's "forever"
            )
            models.append(
                {
                    "name": entry.id,
                    "model": entry.id,
                    "size": b.memory(),
                    "digest": digest,
                    "details": details,
                    "expires_at": expires.isoformat().replace("+00:00", "Z"),
                    "size_vram": 0,
                    "context_length": b.info.get("n_ctx", 0),
                }
            )
    return JSONResponse({"models": models})


async def show(request: Request) -> Response:
    body: ModelIn = await _body(request, ModelIn)
    name = body.model or body.name
    if not name:
        return ollama_error(400, "model is required")
    entry = _resolve(request, name)
    details, _, _ = _details(entry)
    b = entry.backends[0]
    model_info: dict[str, Any] = {}
    path = getattr(b, "path", None)
    caps = ["completion"]
    if path is not None:
        with contextlib.suppress(OSError, GGUFError):
            model_info = read_info(path).metadata
    if entry.kind == "embedding":
        caps = ["embedding"]
    return JSONResponse(
        {
            "modelfile": f"# served by the appliance\nFROM {entry.id}\n",
            "parameters": "",
            "template": "",
            "details": details,
            "model_info": model_info,
            "capabilities": caps,
            "modified_at": _now(),
        }
    )


async def version(request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_COMPAT_VERSION, "appliance": __version__})


async def embed(request: Request) -> Response:
    body: EmbedIn = await _body(request, EmbedIn)
    svc = getattr(request.app.state, "embeddings", None)
    entry = _resolve(request, body.model)
    if svc is None or entry.kind != "embedding":
        return ollama_error(400, f'"{entry.id}" does not support embeddings')
    texts = [body.input] if isinstance(body.input, str) else body.input
    t0 = time.monotonic()
    vectors, tokens = await svc.embed_with_usage(texts)
    return JSONResponse(
        {
            "model": entry.id,
            "embeddings": vectors,
            "total_duration": _ns(time.monotonic() - t0),
            "load_duration": 0,
            "prompt_eval_count": tokens,
        }
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
