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
