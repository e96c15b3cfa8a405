"""Scripted stand-ins for the fast test tier: backends that play back what a test tells them, a fake clock.

    a = ScriptedBackend("a", [crash(), ok("Hi")])       # first call: 503 worker_crashed; then "Hi"
    reg = scripted_registry(settings, {"m": [a, ScriptedBackend("b")]})
    engine = Engine(reg, settings, clock=clock, sleep=clock.sleep)

Each `generate()` call takes the next `Step` of the backend's script (then its `default`, by default `ok()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from appliance.backends.base import Backend, BackendFactory, BackendState, BackendStatus
from appliance.config import ModelsFile, ModelSpec, RemoteBackendSpec, Settings
from appliance.engine.registry import Registry
from appliance.engine.types import (
    Admitted,
    EngineError,
    Error,
    Event,
    Finish,
    GenerateRequest,
    Token,
    ToolCallDelta,
    Usage,
)


@dataclass
class Step:
    """What one generate() call does: raise `error` before any event, else wait `delay` then yield `events`."""

    events: list[Event] = field(default_factory=list)
    error: EngineError | None = None
    delay: float = 0.0  # seconds before the first event (real time: keep it short)
    gap: float = 0.0  # seconds between events
    queued: float = 0.0  # a queueing backend: seconds in its queue before it yields Admitted


def ok(text: str = "Hello", reason: str = "stop", prompt_tokens: int = 3) -> Step:
    words = text.split(" ")
    tokens = [Token(w if i == 0 else " " + w) for i, w in enumerate(words)]
    return Step([*tokens, Finish(reason, Usage(prompt_tokens, len(tokens)))])  # type: ignore[arg-type]


def calls(*calls: tuple[str, dict[str, Any]], prompt_tokens: int = 3) -> Step:
    """A reply that calls tools, streamed as a backend does: per call, a ToolCallDelta with its id and name,
    then its JSON arguments in two pieces; then Finish("tool_calls")."""
    events: list[Event] = []
    for i, (name, args) in enumerate(calls):
        text = json.dumps(args)
        events.append(ToolCallDelta(i, id=f"call_scripted{i}", name=name))
        events += [ToolCallDelta(i, text[:3]), ToolCallDelta(i, text[3:])]
    return Step([*events, Finish("tool_calls", Usage(prompt_tokens, 4 * len(calls)))])


def fail(
    status: int = 503,
    code: str | None = "model_load_failed",
    message: str = "scripted failure",
    type: str = "server_error",
    retry_after: float | None = None,
) -> Step:
    return Step(error=EngineError(Error(status, message, type, code, retry_after=retry_after)))


def crash() -> Step:
    """What a llama.cpp backend raises when its worker died before the first token."""
    return fail(503, "worker_crashed", "The model worker stopped unexpectedly.", retry_after=1.0)


def queue_full() -> Step:
    return fail(503, "queue_full", "at capacity", retry_after=1.0)


def bad_request(param: str = "messages") -> Step:
    return Step(error=EngineError.of(400, "scripted: the request is wrong", code="invalid_value", param=param))


def first_error(status: int = 502, code: str = "upstream_error") -> Step:
    """The backend starts, but its first event is an Error (how HTTP backends report failures)."""
    return Step([Error(status, "scripted upstream failure", "server_error", code)])


def mid_stream_error(text: str = "Hel") -> Step:
    return Step([Token(text), Error(503, "died mid-stream", "server_error", "worker_crashed", retry_after=1.0)])


def slow(seconds: float, then: Step | None = None) -> Step:
    s = then or ok()
    return Step(s.events, s.error, seconds, s.gap)


class ScriptedBackend:
    """Implements the whole `Backend` protocol; records every call."""

    def __init__(
        self,
        name: str = "scripted",
        script: Iterable[Step] = (),
        default: Step | None = None,
        kind: str | None = None,
        can_load: bool = False,
        state: BackendState = BackendState.READY,
        stats: dict[str, Any] | None = None,
        queues: bool = False,
    ):
        self.name = name
        self.kind = kind or name
        self.script: deque[Step] = deque(script)
        self.default = default or ok()
        self.can_load = can_load
        self.queues = queues
        self.pinned = False
        self.state = state
        self._stats = stats
        self.calls: list[GenerateRequest] = []
        self.loads: list[float | None] = []
        self.unloads: list[str] = []
        self.in_flight = 0
        self.started = self.closed = False

    def then(self, *steps: Step) -> ScriptedBackend:
        """Append steps to the script (chainable)."""
        self.script.extend(steps)
        return self

    @property
    def ready(self) -> bool:
        return self.state in (BackendState.READY, BackendState.REMOTE)

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True
        self.state = BackendState.STOPPED

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event | Admitted]:
        self.calls.append(req)
        step = self.script.popleft() if self.script else self.default
        if self.queues:
            await asyncio.sleep(step.queued)
            yield Admitted()
        if step.error is not None:
            raise step.error
        self.in_flight += 1
        try:
            if step.delay:
                await asyncio.sleep(step.delay)
            for i, ev in enumerate(step.events):
                if step.gap and i:
                    await asyncio.sleep(step.gap)
                yield ev
        finally:
            self.in_flight -= 1

    def status(self) -> BackendStatus:
        loaded = self.state in (BackendState.LOADING, BackendState.READY) and self.can_load
        return BackendStatus(
            kind=self.kind,
            state=self.state,
            loaded=loaded,
            serviceable=self.state in (BackendState.READY, BackendState.UNLOADED, BackendState.REMOTE),
            in_flight=self.in_flight,
            slots=4 if self.can_load else None,
        )

    async def load(self, keep_alive: float | None = None) -> None:
        if self.can_load:
            self.loads.append(keep_alive)
            self.state = BackendState.READY

    async def unload(self, reason: str) -> None:
        if self.can_load:
            self.unloads.append(reason)
            self.state = BackendState.UNLOADED

    async def stats(self, timeout: float = 1.0) -> dict[str, Any] | None:
        return self._stats


class FakeClock:
    """A monotonic clock that moves only when told to, and a `sleep` that moves it instead of waiting."""

    def __init__(self, start: float = 1000.0):
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def scripted_factories(backends: Mapping[str, list[Backend]]) -> dict[str, BackendFactory]:
    """Factories for every spec type that hand out each model's backends in order."""
    queues: dict[str, deque[Backend]] = defaultdict(deque, {m: deque(bs) for m, bs in backends.items()})

    def factory(model_id: str, spec: Any) -> Backend:
        return queues[model_id].popleft()

    return {"llamacpp": factory, "ollama": factory, "remote": factory}


def scripted_registry(
    settings: Settings, backends: Mapping[str, list[Backend]], aliases: Mapping[str, list[str]] | None = None
) -> Registry:
    """A registry of models `backends` names, each backend a scripted one (specs are placeholders)."""
    models = ModelsFile(
        models=[
            ModelSpec(
                id=model_id,
                aliases=list((aliases or {}).get(model_id, [])),
                backends=[RemoteBackendSpec(type="remote", base_url="http://scripted.invalid", model=model_id)]
                * len(bs),
            )
            for model_id, bs in backends.items()
        ]
    )
    return Registry(settings, models, scripted_factories(backends))


def settings(**overrides: Any) -> Settings:
    """Settings for fast tests: no .env, no environment surprises, the first model as default."""
    base: dict[str, Any] = {"default_model": "m", "retries": 1, "breaker_failures": 2, "breaker_cooldown": 30.0}
    return Settings(_env_file=None, **{**base, **overrides})  # type: ignore[call-arg]


HELLO: list[Event] = [Token("Hel"), Token("lo"), Finish("stop", Usage(5, 2, 1))]


class Scripted:
    """A loadable llamacpp-like backend for create_app(): plays a script of events, or raises an EngineError
    before the first one; counts unloads."""

    name = "llamacpp"
    pinned = False
    can_load = True
    queues = False

    def __init__(self, script: list[Event] | EngineError | None = None):
        self.script = HELLO if script is None else script
        self.seen: list[GenerateRequest] = []
        self.unloaded = 0

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        self.seen.append(req)
        if isinstance(self.script, EngineError):
            raise self.script
        for ev in self.script:
            yield ev

    def status(self) -> BackendStatus:
        return BackendStatus("llamacpp", BackendState.READY, loaded=True, serviceable=True, path="embedded:smollm2")

    async def load(self, keep_alive: float | None = None) -> None: ...

    async def unload(self, reason: str) -> None:
        self.unloaded += 1

    async def stats(self, timeout: float = 1.0) -> dict[str, Any] | None:
        return None


class FakeEmbedder:
    """One token per word, the same unit vector for every text."""

    id, dimensions, ready, state, scheduled = "all-minilm-l6-v2", 3, True, "ready", False
    error, load_seconds = None, 0.1

    async def embed_with_usage(self, texts: list[str]) -> tuple[list[list[float]], int]:
        return [[1.0, 0.0, 0.0] for _ in texts], sum(len(t.split()) for t in texts)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return (await self.embed_with_usage(texts))[0]

    async def wait_ready(self, timeout: float | None = None) -> None: ...
    def start(self) -> None: ...
    def close(self) -> None: ...


@contextlib.asynccontextmanager
async def app_client(tmp_path: Any, script: Any = None, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The whole app (`create_app`) in process over `httpx.ASGITransport`, its default model played by a
    `Scripted` backend (`client.backend`), no agent and a fake embedder."""
    from appliance.app import create_app

    backend = Scripted(script)
    s = Settings(
        data_dir=tmp_path, agent_enabled=False, embeddings_preload=False, keys_file=tmp_path / "keys.toml", **settings
    )
    app = create_app(s, backend_factories={"llamacpp": lambda model_id, spec: backend}, embeddings=FakeEmbedder())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://appliance") as c:
            c.backend = backend  # type: ignore[attr-defined]
            yield c
