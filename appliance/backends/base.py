"""The one interface every backend implements, and the typed status it reports.

The engine, the API handlers, metrics and /health use only what is declared here: no getattr/hasattr
on concrete backends. Backends are built by factories (`BackendFactory`) that the composition root hands
to the registry, so nothing above this floor imports a concrete backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from appliance.engine.types import Admitted, Event, GenerateRequest


class BackendState(StrEnum):
    IDLE = "idle"  # never started (loads on first use)
    LOADING = "loading"  # a worker is starting (or restarting after a crash)
    READY = "ready"  # serving
    UNLOADED = "unloaded"  # was loaded, let go (keep-alive, eviction, unload request); loads on demand
    FAILED = "failed"  # could not load (missing file, bad GGUF, out of memory); retried after a pause
    STOPPED = "stopped"  # shut down with the appliance
    REMOTE = "remote"  # reached over HTTP: always usable, its circuit breaker says whether it answers


@dataclass(frozen=True, slots=True)
class BackendStatus:
    """What a backend is doing now: for /health?verbose=1, /api/ps, metrics and readiness."""

    kind: str  # "llamacpp" | "ollama" | "remote" | "agent" | "embedding"
    state: BackendState
    loaded: bool  # holds memory now (a worker process exists)
    serviceable: bool  # can serve now, or will load on demand
    in_flight: int = 0
    queued: int = 0
    slots: int | None = None
    memory_bytes: int = 0
    expires_in: float | None = None  # seconds until the keep-alive unload; None: never, or not loaded
    restarts: int = 0
    error: str | None = None
    pid: int | None = None
    path: str | None = None  # the local model file
    url: str | None = None  # HTTP backends
    upstream_model: str | None = None
    context_length: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)  # architecture, parameters, size, ...

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: every field (None as null), the state as its string, details nested."""
        return {
            "type": self.kind,
            "state": self.state.value,
            "loaded": self.loaded,
            "serviceable": self.serviceable,
            "in_flight": self.in_flight,
            "queued": self.queued,
            "slots": self.slots,
            "memory_bytes": self.memory_bytes,
            "expires_in": self.expires_in,
            "restarts": self.restarts,
            "error": self.error,
            "pid": self.pid,
            "path": self.path,
            "url": self.url,
            "upstream_model": self.upstream_model,
            "context_length": self.context_length,
            "details": dict(self.details),
        }


@runtime_checkable
class Backend(Protocol):
    """Streams events for a request. `generate` raises EngineError if it cannot start the request."""

    name: str  # e.g. "llamacpp", shown in X-Appliance-Backend
    pinned: bool  # the default model's backends: never unloaded for idleness
    can_load: bool  # load()/unload() do something (llamacpp); HTTP backends: False
    queues: bool  # generate() waits for a slot first, then yields engine.types.Admitted before any event

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None:
        """Begin loading (may return before the backend is ready)."""

    async def close(self) -> None: ...

    def generate(self, req: GenerateRequest) -> AsyncIterator[Event | Admitted]: ...

    def status(self) -> BackendStatus: ...

    async def load(self, keep_alive: float | None = None) -> None:
        """Load now and start the keep-alive clock (Ollama's empty generate). No-op where not supported."""

    async def unload(self, reason: str) -> None:
        """Let go of the model's memory now. No-op where not supported."""

    async def stats(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """The scheduler's figures (slots, KV cache); None where there are none."""


@runtime_checkable
class Tokenizes(Protocol):
    """A backend that tokenizes with its model's own vocabulary (llama.cpp): /tokenize and /detokenize."""

    async def tokenize(self, text: str, add_special: bool = False) -> list[int]: ...

    async def detokenize(self, tokens: list[int]) -> str: ...


class NothingToLoad:
    """For backends with no model memory of their own (HTTP, agent, embeddings): load, unload and stats
    do nothing, start and close too unless overridden."""

    pinned = False
    can_load = False
    queues = False

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def load(self, keep_alive: float | None = None) -> None:
        return None

    async def unload(self, reason: str) -> None:
        return None

    async def stats(self, timeout: float = 1.0) -> dict[str, Any] | None:
        return None


# model id, backend spec (one of appliance.config's *BackendSpec) -> a backend
BackendFactory = Callable[[str, Any], Backend]
