"""The engine: resolves a request's model and opens a stream on the first backend that can serve it.

A model lists backends in order. A request moves down the list when a backend cannot start it
(load failure, missing file, crashed worker, connection refused, no first token in time, 429/5xx).
Transient failures are retried on the same backend with exponential back-off and jitter, all within
a per-request deadline. A per-backend circuit breaker skips a backend that keeps failing. Once the
first event has reached the caller there is no silent switch: a later failure is an Error event.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from appliance.config import Settings
from appliance.engine.registry import ModelEntry, Registry
from appliance.engine.types import Admitted, EngineError, Error, Event, Finish, GenerateRequest, Token, ToolCallDelta

# Errors that say "this backend cannot serve now" (fall back) rather than "this request is wrong".
_TRANSIENT_CODES = {
    "worker_crashed",
    "worker_unavailable",
    "model_unloaded",
    "connection_error",
    "upstream_error",
    "rate_limited",
}
Clock = Callable[[], float]


def is_backend_failure(err: Error) -> bool:
    """5xx or an upstream's 429; a client's own quota (429 quota_exceeded) is not the backend's fault."""
    return err.status >= 500 or (err.status == 429 and err.code != "quota_exceeded")


class EngineHooks:
    """Observation points (metrics, logs). The default does nothing."""

    def on_start(self, model: str, backend: str) -> None: ...
    def on_first_token(self, model: str, backend: str, ttft: float) -> None: ...
    def on_finish(self, model: str, backend: str, finish: Finish, duration: float, decode_time: float) -> None: ...
    def on_error(self, model: str, backend: str, error: Error) -> None: ...
    def on_fallback(self, model: str, backend: str, reason: str) -> None: ...
    def on_reject(self, model: str, reason: str) -> None: ...


class CircuitBreaker:
    """closed → (N consecutive failures) → open → (cool-down) → half-open: one probe → closed or open."""

    def __init__(self, failures: int, cooldown: float, clock: Clock = time.monotonic):
        self.threshold, self.cooldown = failures, cooldown
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.cooldown else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self.failures, self.opened_at, self._probing = 0, None, False

    def release(self) -> None:
        """The request ended neither way (the client's own 400): a half-open probe may go again."""
        self._probing = False

    def failure(self) -> None:
        self.failures += 1
        self._probing = False
        if self.failures >= self.threshold or self.opened_at is not None:
            self.opened_at = self.clock()

    def describe(self) -> dict:
        return {"state": self.state, "consecutive_failures": self.failures}


@dataclass
class Stream:
    """A started generation: the backend that took it, its first event, and the rest."""

    model: ModelEntry
    backend: str
    first: Event
    rest: AsyncIterator[Event]
    hooks: EngineHooks
    started: float = field(default_factory=time.monotonic)
    ttft: float | None = None
    finish: Finish | None = None
    _closed: bool = False

    async def __aiter__(self) -> AsyncIterator[Event]:
        yield self._observe(self.first)
        if isinstance(self.first, Error | Finish):
            return
        async for ev in self.rest:
            yield self._observe(ev)

    def _observe(self, ev: Event) -> Event:
        now = time.monotonic()
        if self.ttft is None and isinstance(ev, Token | ToolCallDelta | Finish):
            self.ttft = now - self.started
            self.hooks.on_first_token(self.model.id, self.backend, self.ttft)
        if isinstance(ev, Finish):
            self.finish = ev
            self.hooks.on_finish(self.model.id, self.backend, ev, now - self.started, now - self.started - self.ttft)
        elif isinstance(ev, Error):
            self.hooks.on_error(self.model.id, self.backend, ev)
        return ev

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self.rest.aclose()  # type: ignore[attr-defined]


class Engine:
    """`clock` (monotonic seconds) drives deadlines and breakers and `sleep` the retry back-off: tests
    inject a fake pair and need no real waits."""

    def __init__(
        self,
        registry: Registry,
        settings: Settings,
        hooks: EngineHooks | None = None,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.registry = registry
        self.settings = settings
        self.hooks = hooks or EngineHooks()
        self.clock = clock
        self.sleep = sleep
        self.breakers: dict[int, CircuitBreaker] = {}

    def breaker(self, backend: object) -> CircuitBreaker:
        key = id(backend)
        if key not in self.breakers:
            s = self.settings
            self.breakers[key] = CircuitBreaker(s.breaker_failures, s.breaker_cooldown, self.clock)
        return self.breakers[key]

    async def start(self) -> None:
        """Begin loading the default model's first backend; others load on first use."""
        await self.registry.default.backends[0].start()

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for m in self.registry for b in m.backends), return_exceptions=True)

    @property
    def ready(self) -> bool:
        """The default model can serve (a loaded model, one that reloads on demand, or a remote backend)."""
        return any(b.status().serviceable for b in self.registry.default.backends)

    async def open(self, req: GenerateRequest) -> Stream:
        """Start `req` on the first backend that can; raise EngineError when none can."""
        entry = self.registry.get(req.model)
        s = self.settings
        deadline = self.clock() + s.request_deadline
        last: Error | None = None
        for backend in entry.backends:
            breaker = self.breaker(backend)
            if not breaker.allow():
                self.hooks.on_fallback(entry.id, backend.name, "circuit_open")
                last = last or Error(
                    503,
                    f"Backend {backend.name} of '{entry.id}' is unavailable (circuit open).",
                    "server_error",
                    "backend_unavailable",
                    retry_after=s.breaker_cooldown,
                )
                continue
            for attempt in range(s.retries + 1):
                left = deadline - self.clock()
                if left <= 0:
                    break
                started = time.monotonic()
                try:
                    first, it = await self._first_event(backend, req, left)
                except TimeoutError:
                    breaker.failure()
                    last = Error(
                        504,
                        f"Backend {backend.name} of '{entry.id}' gave no first token in time.",
                        "server_error",
                        "first_token_timeout",
                        retry_after=1.0,
                    )
                    break
                except EngineError as e:
                    if not is_backend_failure(e.error):
                        breaker.release()  # else a probe that got a client error leaves the circuit stuck open
                        raise  # the request itself is wrong: no other backend will like it better
                    last = e.error
                    if e.error.code in ("queue_full", "queue_timeout"):
                        break  # busy, not broken: try the next backend, don't trip the breaker
                    if e.error.code != "model_unloaded":  # someone unloaded it: not the backend's fault
                        breaker.failure()
                    if e.error.code in _TRANSIENT_CODES and attempt < s.retries and breaker.allow():
                        await self.sleep(max(0.0, min(deadline - self.clock(), _backoff(attempt))))
                        continue
                    break
                breaker.success()
                self.hooks.on_start(entry.id, backend.name)
                return Stream(entry, backend.name, first, it, self.hooks, started=started)
            self.hooks.on_fallback(entry.id, backend.name, (last.code or "error") if last else "deadline")
        assert last is not None or not entry.backends
        err = last or Error(503, f"No backend could serve '{entry.id}'.", "server_error", "no_backend")
        self.hooks.on_reject(entry.id, err.code or "error")
        raise EngineError(err)

    async def _first_event(self, backend, req: GenerateRequest, left: float) -> tuple[Event, AsyncIterator[Event]]:
        """The backend's first event within `first_token_timeout`, counted from admission for a queueing
        backend (see engine.types.Admitted): the queue wait is bounded by `left` and the backend's own
        queue_timeout, and running out of `left` while queued is "busy" (503), never a breaker failure."""
        it = backend.generate(req)
        ftt = self.settings.first_token_timeout
        try:
            if backend.queues:
                end = self.clock() + left
                try:
                    admitted = await asyncio.wait_for(anext(it), left)
                except TimeoutError:
                    raise EngineError(
                        Error(
                            503,
                            f"The model '{req.model}' is busy: the request's deadline passed while it waited "
                            "for a slot.",
                            "server_error",
                            "queue_timeout",
                            retry_after=1.0,
                        )
                    ) from None
                assert isinstance(admitted, Admitted), admitted
                left = end - self.clock()
            first = await asyncio.wait_for(anext(it), min(left, ftt))
        except StopAsyncIteration:
            raise EngineError.of(
                502, f"Backend {backend.name} returned no output.", "server_error", "upstream_error"
            ) from None
        except BaseException:
            await it.aclose()
            raise
        if isinstance(first, Error):
            await it.aclose()
            raise EngineError(first)
        return first, it


def _backoff(attempt: int, base: float = 0.25, cap: float = 4.0) -> float:
    """Exponential back-off with full jitter."""
    return random.uniform(0, min(cap, base * 2**attempt))
