"""Admission to a model's slots: at most `parallel` generations run, at most `max_queue` wait for one.

A request over the queue bound gets 503 `queue_full` at once; one that waits longer than `queue_timeout`
gets 503 `queue_timeout`; both with Retry-After. The engine treats both as "busy, not broken": it tries
the next backend without tripping this one's circuit breaker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from appliance.engine.types import EngineError, Error


class Admission:
    def __init__(self, model_id: str, parallel: int, max_queue: int, queue_timeout: float):
        self.model_id = model_id
        self.parallel = parallel
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self._slots = asyncio.Semaphore(parallel)
        self.queued = 0  # waiting for a slot
        self.running = 0  # holding a slot

    @property
    def busy(self) -> bool:
        return self.running > 0 or self.queued > 0

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if need be; raise EngineError 503 when full or timed out."""
        if self._slots.locked() and self.queued >= self.max_queue:
            raise EngineError(
                Error(
                    503,
                    f"Model '{self.model_id}' is at capacity ({self.parallel} running, "
                    f"{self.queued} queued); retry shortly.",
                    "server_error",
                    "queue_full",
                    retry_after=1.0,
                )
            )
        self.queued += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.queue_timeout)
        except TimeoutError:
            raise EngineError(
                Error(
                    503,
                    f"Timed out after {self.queue_timeout:g}s waiting for model '{self.model_id}'.",
                    "server_error",
                    "queue_timeout",
                    retry_after=1.0,
                )
            ) from None
        finally:
            self.queued -= 1
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        self._slots.release()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()
