"""The one interface every backend implements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from appliance.engine.types import Event, GenerateRequest


class Backend(Protocol):
    """Streams events for a request. Raises EngineError if it cannot start the request."""

    name: str  # e.g. "llamacpp", shown in X-Appliance-Backend

    async def start(self) -> None:
        """Begin loading (may return before the backend is ready)."""

    async def close(self) -> None: ...

    @property
    def ready(self) -> bool: ...

    def generate(self, req: GenerateRequest) -> AsyncIterator[Event]: ...

    def describe(self) -> dict[str, Any]:
        """State for /health?verbose=1 and metrics."""
        ...


class HTTPBackend:
    """What the backends reached over HTTP (`ollama`, `remote`) share: always "ready", the circuit breaker
    decides whether they are usable; they describe themselves by URL and upstream model."""

    name = "http"

    def __init__(self, model_id: str, spec: Any, settings: Any):
        self.model_id = model_id
        self.spec = spec
        self.settings = settings
        self.state = "remote"

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"type": self.name, "state": self.state, "base_url": self.spec.base_url, "model": self.spec.model}
