"""Which GGUF models are in memory: load on first use, unload after keep-alive, evict LRU over a budget."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import psutil

from appliance.config import Settings

if TYPE_CHECKING:
    from appliance.backends.llamacpp.client import LlamaCppBackend

log = logging.getLogger("appliance.residency")


class Residency:
    def __init__(self, settings: Settings):
        self.budget = settings.memory_budget or int(psutil.virtual_memory().available * 0.8)
        self.backends: list[LlamaCppBackend] = []
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    def register(self, backend: LlamaCppBackend) -> None:
        self.backends.append(backend)

    def used(self, exclude: LlamaCppBackend | None = None) -> int:
        return sum(b.memory() for b in self.backends if b is not exclude and b.loaded)

    async def make_room(self, backend: LlamaCppBackend, need: int) -> None:
        """Unload least-recently-used idle models until `need` more bytes fit in the budget."""
        async with self._lock:
            used = self.used(exclude=backend)
            for victim in sorted(
                (b for b in self.backends if b is not backend and b.loaded), key=lambda b: b.last_used
            ):
                if used + need <= self.budget:
                    break
                if victim.busy:
                    continue
                freed = victim.memory()
                log.info(
                    "evicting model %s (%d MiB) to load %s (%d MiB; budget %d MiB)",
                    victim.model_id,
                    freed >> 20,
                    backend.model_id,
                    need >> 20,
                    self.budget >> 20,
                )
                await victim.unload("evicted")
                used -= freed
            if used + need > self.budget:
                log.warning(
                    "loading %s goes over the memory budget (%d + %d > %d MiB): the others are busy",
                    backend.model_id,
                    used >> 20,
                    need >> 20,
                    self.budget >> 20,
                )

    async def start(self) -> None:
        self._task = asyncio.create_task(self._reap())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _reap(self, every: float = 0.5) -> None:
        """Unload models whose keep-alive has run out."""
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            for b in self.backends:
                if b.state == "ready" and not b.busy and b.expires_at is not None and now >= b.expires_at:
                    await b.unload("idle")
