"""Which GGUF models are in memory: unload after keep-alive, evict the least recently used over a budget.

One Residency is shared by every llama.cpp backend (built by the composition root and handed to the
backend factory). It works against the small `Resident` protocol below, not the backend class, so the two
modules do not import each other. Keep-alive runs on timers (`loop.call_later`), one per resident, set
each time a backend notes a use (`touched`): nothing polls. `close()` cancels the timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Protocol

import psutil

from appliance.config import Settings

log = logging.getLogger("appliance.residency")

# Bytes per KV element, by cache type (q8_0: 34 bytes per block of 32; q4_0: 18 per 32).
_KV_ELEMENT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def kv_cache_bytes(path: Path | None, context_size: int, slots: int, kv_type: str) -> int:
    """The KV cache llama.cpp will allocate for `slots` x `context_size` tokens, from the GGUF header
    (0 if the header lacks what it takes). Sliding-window layers are counted as full ones: an upper bound."""
    from appliance.gguf_meta import GGUFError, read_info

    try:
        info = read_info(path) if path is not None else None
    except (OSError, GGUFError):
        return 0
    if info is None:
        return 0
    m, a = info.metadata, info.architecture
    n_layer, n_embd, n_head = (
        m.get(f"{a}.block_count"),
        m.get(f"{a}.embedding_length"),
        m.get(f"{a}.attention.head_count"),
    )
    if not (isinstance(n_layer, int) and isinstance(n_embd, int) and isinstance(n_head, int) and n_head > 0):
        return 0
    n_head_kv = m.get(f"{a}.attention.head_count_kv", n_head)
    n_head_kv = n_head_kv if isinstance(n_head_kv, int) else n_head
    k_len = m.get(f"{a}.attention.key_length", n_embd // n_head)
    v_len = m.get(f"{a}.attention.value_length", n_embd // n_head)
    n_ctx = min(context_size, info.context_length or context_size) * slots
    return int(n_layer * n_ctx * n_head_kv * (k_len + v_len) * _KV_ELEMENT.get(kv_type, 2.0))


class Resident(Protocol):
    """What residency needs of a model that holds memory (LlamaCppBackend)."""

    model_id: str
    last_used: float  # monotonic
    expires_at: float | None  # monotonic; None: never (pinned, keep-alive < 0) or not loaded

    @property
    def ready(self) -> bool: ...

    @property
    def loaded(self) -> bool: ...

    @property
    def busy(self) -> bool: ...

    def memory(self) -> int: ...

    async def unload(self, reason: str) -> None: ...


class Residency:
    def __init__(self, settings: Settings, budget: int | None = None):
        self.budget = budget or settings.memory_budget or int(psutil.virtual_memory().available * 0.8)
        self.residents: list[Resident] = []
        self._lock = asyncio.Lock()
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    def register(self, r: Resident) -> None:
        self.residents.append(r)

    def used(self, exclude: Resident | None = None) -> int:
        return sum(r.memory() for r in self.residents if r is not exclude and r.loaded)

    async def make_room(self, r: Resident, need: int) -> None:
        """Unload least-recently-used idle models until `need` more bytes fit in the budget."""
        async with self._lock:
            used = self.used(exclude=r)
            for victim in sorted((v for v in self.residents if v is not r and v.loaded), key=lambda v: v.last_used):
                if used + need <= self.budget:
                    break
                if victim.busy:
                    continue
                freed = victim.memory()
                log.info(
                    "evicting model %s (%d MiB) to load %s (%d MiB; budget %d MiB)",
                    victim.model_id,
                    freed >> 20,
                    r.model_id,
                    need >> 20,
                    self.budget >> 20,
                )
                await victim.unload("evicted")
                used -= freed
            if used + need > self.budget:
                log.warning(
                    "loading %s goes over the memory budget (%d + %d > %d MiB): the others are busy",
                    r.model_id,
                    used >> 20,
                    need >> 20,
                    self.budget >> 20,
                )

    # -- keep-alive ------------------------------------------------------------------------------------
    def touched(self, r: Resident) -> None:
        """`r` was used and set its `expires_at`: (re)arm its keep-alive timer."""
        old = self._timers.pop(id(r), None)
        if old is not None:
            old.cancel()
        if r.expires_at is None or self._closed:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, r.expires_at - time.monotonic())
        self._timers[id(r)] = loop.call_later(delay, self._expire, r)

    def _expire(self, r: Resident) -> None:
        self._timers.pop(id(r), None)
        # Busy: the request in flight re-arms the timer when it ends.
        if r.busy or r.expires_at is None:
            return
        if not r.ready:  # restarting after a crash: look again once it may be up; unloaded: nothing to do
            if r.loaded:
                self._timers[id(r)] = asyncio.get_running_loop().call_later(1.0, self._expire, r)
            return
        if time.monotonic() < r.expires_at:  # the timer fired a little early (clock resolution)
            self.touched(r)
            return
        task = asyncio.get_running_loop().create_task(r.unload("idle"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        """Nothing runs until a model is used; here for the composition root's symmetry with close()."""
        self._closed = False

    async def close(self) -> None:
        """Cancel the keep-alive timers (the backends themselves are closed by the engine)."""
        self._closed = True
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()
        for t in list(self._tasks):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
