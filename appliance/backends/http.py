"""What the backends reached over HTTP (`ollama`, `remote`) share.

They are always "serviceable": the engine's circuit breaker decides whether they answer. They load
nothing here, so load()/unload() are no-ops, and they describe themselves by URL and upstream model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from appliance.backends.base import BackendState, BackendStatus, NothingToLoad
from appliance.engine.types import Error, Event, GenerateRequest


class HTTPBackend(NothingToLoad):
    name = "http"

    def __init__(self, model_id: str, spec: Any, settings: Any):
        self.model_id = model_id
        self.spec = spec
        self.settings = settings
        self._in_flight = 0

    @property
    def ready(self) -> bool:
        return True

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        self._in_flight += 1
        try:
            async for ev in self._stream(req):
                yield ev
        finally:
            self._in_flight -= 1

    def _stream(self, req: GenerateRequest) -> AsyncIterator[Event]:
        raise NotImplementedError

    def status(self) -> BackendStatus:
        return BackendStatus(
            kind=self.name,
            state=BackendState.REMOTE,
            loaded=False,
            serviceable=True,
            in_flight=self._in_flight,
            url=str(self.spec.base_url),
            upstream_model=self.spec.model,
        )


def upstream_error(who: str, status: int, message: str) -> Error:
    """Classify an upstream HTTP error: 429/5xx are the backend's trouble (fall back), 400 is the request's."""
    if status == 429:
        return Error(429, f"{who} is rate limiting: {message}", "rate_limit_exceeded", "rate_limited", retry_after=1.0)
    if status in (400, 422):
        return Error(400, f"{who} rejected the request: {message}", "invalid_request_error", "upstream_invalid_request")
    # 401/403/404 (a misconfigured backend: wrong key or model name) and 5xx: this backend cannot serve.
    return Error(502, f"{who} answered {status}: {message}", "server_error", "upstream_error")
