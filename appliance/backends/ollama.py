"""A model on an Ollama server, through the official `ollama` client (Ollama's native API).

Imported only when a models file configures an `ollama` backend (see `appliance.backends.default_factories`),
so the `ollama` package costs nothing at start-up otherwise.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import ollama

from appliance.backends.http import HTTPBackend, upstream_error
from appliance.config import OllamaBackendSpec, Settings
from appliance.engine.types import (
    EngineError,
    Error,
    Event,
    Finish,
    GenerateRequest,
    Message,
    Token,
    TokenLogprob,
    ToolCallDelta,
    Usage,
)


def options_for(req: GenerateRequest, default_max_tokens: int) -> dict[str, Any]:
    p = req.params
    opts: dict[str, Any] = {
        "temperature": p.temperature,
        "top_p": p.top_p,
        "top_k": p.top_k,
        "min_p": p.min_p,
        "num_predict": p.max_tokens or default_max_tokens,
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
        "repeat_penalty": p.repeat_penalty,
    }
    if p.seed is not None:
        opts["seed"] = p.seed
    if p.stop:
        opts["stop"] = list(p.stop)
    return opts


def _role(role: str) -> str:
    return "system" if role == "developer" else role


def _message(m: Message) -> dict[str, Any]:
    """An internal message in Ollama's shape (calls with object arguments; tool turns name their tool)."""
    d: dict[str, Any] = {"role": _role(m.role), "content": m.content}
    if m.tool_calls:
        d["tool_calls"] = [{"function": {"name": c.name, "arguments": _object(c.arguments)}} for c in m.tool_calls]
    if m.role == "tool" and m.name:
        d["tool_name"] = m.name
    return d


def _object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _tools(req: GenerateRequest) -> list[dict[str, Any]] | None:
    """The request's tools for Ollama (which has no tool_choice: it decides, as with `auto`)."""
    if not req.tools or req.tool_choice.mode == "none":
        return None
    return [
        {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
        for t in req.tools
    ]


def _logprobs(entries: Any) -> list[TokenLogprob] | None:
    """A part's `logprobs` (Ollama >= 0.12.11: token, logprob, top_logprobs) as ours."""
    out = [
        TokenLogprob(e.token, e.logprob, tuple((t.token, t.logprob) for t in e.top_logprobs or ()))
        for e in entries or ()
    ]
    return out or None


class OllamaBackend(HTTPBackend):
    name = "ollama"

    def __init__(self, model_id: str, spec: OllamaBackendSpec, settings: Settings):
        super().__init__(model_id, spec, settings)
        self._client = ollama.AsyncClient(host=spec.base_url, timeout=spec.timeout)

    async def close(self) -> None:
        await self._client._client.aclose()

    async def _stream(self, req: GenerateRequest) -> AsyncIterator[Event]:
        p = req.params
        if p.logit_bias:  # Ollama has no such option: refused, never silently ignored
            raise EngineError.of(
                400,
                f"logit_bias is not supported by the backend of model '{self.model_id}' (Ollama has no logit bias).",
                code="unsupported_parameter",
                param="logit_bias",
            )
        opts = options_for(req, self.settings.default_max_tokens)
        common: dict[str, Any] = {"stream": True, "options": opts, "keep_alive": req.keep_alive}
        if p.logprobs is not None:  # Ollama >= 0.12.11; older servers ignore the fields and send none
            common["logprobs"], common["top_logprobs"] = True, p.logprobs
        if (out := req.params.output) is not None:  # Ollama's own structured outputs
            common["format"] = "json" if out.kind == "json_object" else out.schema
        try:
            if req.messages is not None:
                msgs = [_message(m) for m in req.messages]
                tools = _tools(req)
                parts = await self._client.chat(self.spec.model, msgs, tools=tools, **common)
            else:
                parts = await self._client.generate(self.spec.model, req.prompt or "", raw=True, **common)
            calls = 0
            async for part in parts:
                text = part.message.content if req.messages is not None else part.response
                lps = _logprobs(part.logprobs) if p.logprobs is not None else None
                if text or lps:
                    yield Token(text or "", lps)
                for tc in (part.message.tool_calls if req.messages is not None else None) or []:
                    yield ToolCallDelta(calls, "", "call_" + uuid.uuid4().hex[:24], tc.function.name)
                    yield ToolCallDelta(calls, json.dumps(dict(tc.function.arguments or {})))
                    calls += 1
                if part.done:
                    reason = "length" if part.done_reason == "length" else "tool_calls" if calls else "stop"
                    yield Finish(reason, Usage(part.prompt_eval_count or 0, part.eval_count or 0))
                    return
            yield Error(502, "The Ollama stream ended without a final message.", "server_error", "upstream_error")
        except ollama.ResponseError as e:
            yield upstream_error("Ollama", e.status_code, e.error)
        except httpx.TimeoutException:
            yield Error(504, f"Ollama at {self.spec.base_url} timed out.", "server_error", "upstream_timeout")
        except (ConnectionError, httpx.TransportError) as e:
            yield Error(503, f"Cannot reach Ollama at {self.spec.base_url}: {e}", "server_error", "connection_error")
