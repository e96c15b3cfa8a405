"""The engine: resolves a request's model and opens a stream on the first backend that can serve it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from appliance.engine.registry import ModelEntry, Registry
from appliance.engine.types import EngineError, Error, Event, GenerateRequest


@dataclass
class Stream:
    """A started generation: the backend that took it, its first event, and the rest."""

    model: ModelEntry
    backend: str
    first: Event
    rest: AsyncIterator[Event]

    async def __aiter__(self) -> AsyncIterator[Event]:
        yield self.first
        if isinstance(self.first, Error):
            return
        async for ev in self.rest:
            yield ev

    async def aclose(self) -> None:
        await self.rest.aclose()  # type: ignore[attr-defined]


class Engine:
    def __init__(self, registry: Registry):
        self.registry = registry

    async def start(self) -> None:
        """Begin loading the default model's first backend; others load on first use."""
        await self.registry.default.backends[0].start()

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for m in self.registry for b in m.backends), return_exceptions=True)

    @property
    def ready(self) -> bool:
        return self.registry.default.backends[0].ready

    async def open(self, req: GenerateRequest) -> Stream:
        """Start `req`; raise EngineError when it cannot start (the adapter answers with its status)."""
        entry = self.registry.get(req.model)
        backend = entry.backends[0]
        it = backend.generate(req)
        try:
            first = await anext(it)
        except StopAsyncIteration:  # pragma: no cover - backends always finish with an event
            raise EngineError.of(500, "backend produced no output", type="server_error") from None
        except BaseException:
            await it.aclose()
            raise
        if isinstance(first, Error):
            await it.aclose()
            raise EngineError(first)
        return Stream(entry, backend.name, first, it)
