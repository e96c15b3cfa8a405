"""A model behind any OpenAI-compatible API, through the official `openai` client.

Imported only when a models file configures a `remote` backend (see `appliance.backends.default_factories`),
so the `openai` SDK (~1 s to import) costs nothing at start-up otherwise.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import openai

from appliance.backends.http import HTTPBackend, upstream_error
from appliance.config import RemoteBackendSpec, Settings
from appliance.engine.types import (
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
from appliance.observability.tracing import trace_headers


class RemoteBackend(HTTPBackend):
    name = "remote"

    def __init__(self, model_id: str, spec: RemoteBackendSpec, settings: Settings):
        super().__init__(model_id, spec, settings)
        # The key comes from the environment at start; it is never logged or shown.
        key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
        self._client = openai.AsyncOpenAI(
            base_url=spec.base_url, api_key=key or "unused", max_retries=0, timeout=spec.timeout
        )

    async def close(self) -> None:
        await self._client.close()

    def _args(self, req: GenerateRequest) -> dict[str, Any]:
        p = req.params
        args: dict[str, Any] = {
            "model": self.spec.model,
            "max_tokens": p.max_tokens or self.settings.default_max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if p.seed is not None:
            args["seed"] = p.seed
        if p.stop:
            args["stop"] = list(p.stop)
        if req.user:
            args["user"] = req.user
        if p.logit_bias:  # token ids of the upstream's tokenizer, as the client sent them
            args["logit_bias"] = {str(t): b for t, b in p.logit_bias.items()}
        if p.logprobs is not None:
            if req.messages is not None:
                args["logprobs"], args["top_logprobs"] = True, p.logprobs
            else:
                args["logprobs"] = p.logprobs
        if headers := trace_headers():  # the trace continues upstream (APPLIANCE_OTEL_ENDPOINT)
            args["extra_headers"] = headers
        if req.tools and req.messages is not None:  # the upstream makes the calls; the deltas come back as ours
            args["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
                }
                for t in req.tools
            ]
            c = req.tool_choice
            args["tool_choice"] = {"type": "function", "function": {"name": c.name}} if c.mode == "function" else c.mode
            if not req.parallel_tool_calls:
                args["parallel_tool_calls"] = False
        if (out := p.output) is not None and req.messages is not None:  # the upstream enforces it
            args["response_format"] = (
                {"type": "json_object"}
                if out.kind == "json_object"
                else {"type": "json_schema", "json_schema": {"name": out.name or "output", "schema": out.schema}}
            )
        return args

    async def _stream(self, req: GenerateRequest) -> AsyncIterator[Event]:
        args = self._args(req)
        reason: str | None = None
        ids: dict[int, str] = {}  # call index -> id (an upstream that sends none gets ours)
        usage = Usage()
        completion_chunks = 0
        want_lps = req.params.logprobs is not None
        try:
            if req.messages is not None:
                msgs = [_wire_message(m) for m in req.messages]
                stream = await self._client.chat.completions.create(messages=msgs, **args)
            else:
                stream = await self._client.completions.create(prompt=req.prompt or "", **args)
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                for choice in chunk.choices:
                    text = choice.delta.content if req.messages is not None else choice.text  # type: ignore[union-attr]
                    lps = _logprobs(choice.logprobs, req.messages is not None) if want_lps else None
                    if text or lps:
                        completion_chunks += 1 if text else 0
                        yield Token(text or "", lps)
                    for tc in (getattr(choice, "delta", None) and choice.delta.tool_calls) or []:  # type: ignore[union-attr]
                        completion_chunks += 1
                        yield _tool_delta(tc, ids)
                    if choice.finish_reason:
                        reason = choice.finish_reason
        except openai.APITimeoutError:
            yield Error(504, f"The remote API at {self.spec.base_url} timed out.", "server_error", "upstream_timeout")
            return
        except openai.APIConnectionError as e:
            yield Error(503, f"Cannot reach {self.spec.base_url}: {e}", "server_error", "connection_error")
            return
        except openai.APIStatusError as e:
            yield upstream_error("The remote API", e.status_code, _message(e))
            return
        if reason is None:
            yield Error(502, "The remote stream ended without a finish reason.", "server_error", "upstream_error")
            return
        if not usage.completion_tokens:
            usage.completion_tokens = completion_chunks
        yield Finish("length" if reason == "length" else "tool_calls" if ids else "stop", usage)


def _wire_message(m: Message) -> dict[str, Any]:
    """An internal message as OpenAI's wire message (with its calls, or the call it answers)."""
    d: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        d["content"] = m.content or None
        d["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    if m.role == "tool":
        d["tool_call_id"] = m.tool_call_id or ""
    return d


def _tool_delta(tc: Any, ids: dict[int, str]) -> ToolCallDelta:
    """An upstream `delta.tool_calls` fragment as ours: the first of each index carries id and name."""
    fn = tc.function
    first = tc.index not in ids
    if first:
        ids[tc.index] = tc.id or "call_" + uuid.uuid4().hex[:24]
    return ToolCallDelta(
        tc.index,
        (fn.arguments if fn else None) or "",
        ids[tc.index] if first else None,
        (fn.name if fn else None) if first else None,
    )


def _logprobs(lp: Any, chat: bool) -> list[TokenLogprob] | None:
    """An upstream chunk's logprobs as ours: chat's `content[]` entries, or completions' parallel lists."""
    if lp is None:
        return None
    if not chat:  # a completion: tokens, token_logprobs, top_logprobs ({token: logprob} each)
        tops = list(lp.top_logprobs or [])
        out = []
        for i, (t, x) in enumerate(zip(lp.tokens or [], lp.token_logprobs or [], strict=False)):
            top = (tops[i] if i < len(tops) else None) or {}
            out.append(TokenLogprob(t, x or 0.0, tuple(sorted(top.items(), key=lambda kv: -kv[1]))))
        return out or None
    entries = []
    for e in lp.content or []:
        top = tuple((_token(t.token, t.bytes), t.logprob) for t in e.top_logprobs or [])
        entries.append(TokenLogprob(_token(e.token, e.bytes), e.logprob, top))
    return entries or None


def _token(token: str, raw: list[int] | None) -> str:
    """A token's text; OpenAI's `bytes:\\xNN` form where its bytes are no whole UTF-8 text (part of a character)."""
    if raw:
        try:
            return bytes(raw).decode("utf-8")
        except (UnicodeDecodeError, ValueError):
            return "bytes:" + "".join(f"\\x{c:02x}" for c in raw)
    return token


def _message(e: openai.APIStatusError) -> str:
    body = e.body if isinstance(e.body, dict) else {}
    err = body.get("error", body) if isinstance(body, dict) else {}
    return str(err.get("message") if isinstance(err, dict) and err.get("message") else e.message)
