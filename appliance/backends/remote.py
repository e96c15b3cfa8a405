"""A model behind any OpenAI-compatible API, through the official `openai` client.

Imported only when a models file configures a `remote` backend (see `appliance.backends.default_factories`),
so the `openai` SDK (~1 s to import) costs nothing at start-up otherwise.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import openai

from appliance.backends.http import HTTPBackend, upstream_error
from appliance.config import RemoteBackendSpec, Settings
from appliance.engine.types import Error, Event, Finish, GenerateRequest, Token, Usage


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
        usage = Usage()
        completion_chunks = 0
        try:
            if req.messages is not None:
                msgs = [{"role": m.role, "content": m.content} for m in req.messages]
                stream = await self._client.chat.completions.create(messages=msgs, **args)
            else:
                stream = await self._client.completions.create(prompt=req.prompt or "", **args)
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                for choice in chunk.choices:
                    text = choice.delta.content if req.messages is not None else choice.text  # type: ignore[union-attr]
                    if text:
                        completion_chunks += 1
                        yield Token(text)
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
        yield Finish("length" if reason == "length" else "stop", usage)


def _message(e: openai.APIStatusError) -> str:
    body = e.body if isinstance(e.body, dict) else {}
    err = body.get("error", body) if isinstance(body, dict) else {}
    return str(err.get("message") if isinstance(err, dict) and err.get("message") else e.message)
