"""The engine on scripted backends: fallback, retry with back-off, circuit breakers (fake clock), errors.

Fast tier: no model, no sleeps (the back-off sleeps on the fake clock).
"""

from __future__ import annotations

import pytest

from appliance.backends.base import Backend, BackendState
from appliance.config import ConfigError, LlamaCppBackendSpec, ModelsFile, ModelSpec
from appliance.engine.registry import Registry
from appliance.engine.router import CircuitBreaker, Engine, EngineHooks
from appliance.engine.types import EngineError, Error, Finish, GenerateRequest, Message, Token
from tests.fakes import (
    FakeClock,
    ScriptedBackend,
    Step,
    bad_request,
    crash,
    fail,
    first_error,
    mid_stream_error,
    ok,
    queue_full,
    scripted_factories,
    scripted_registry,
    settings,
    slow,
)


class Recorder(EngineHooks):
    def __init__(self) -> None:
        self.fallbacks: list[tuple[str, str]] = []
        self.rejects: list[str] = []
        self.starts: list[str] = []

    def on_fallback(self, model: str, backend: str, reason: str) -> None:
        self.fallbacks.append((backend, reason))

    def on_reject(self, model: str, reason: str) -> None:
        self.rejects.append(reason)

    def on_start(self, model: str, backend: str) -> None:
        self.starts.append(backend)


def req(model: str = "m", text: str = "hi") -> GenerateRequest:
    return GenerateRequest(model=model, messages=[Message("user", text)], request_id="client-id")


def make(*backends: ScriptedBackend, **overrides) -> tuple[Engine, FakeClock, Recorder]:
    s = settings(**overrides)
    clock, hooks = FakeClock(), Recorder()
    engine = Engine(scripted_registry(s, {"m": list(backends)}), s, hooks=hooks, clock=clock, sleep=clock.sleep)
    return engine, clock, hooks


async def collect(engine: Engine, r: GenerateRequest | None = None) -> tuple[str, str, list]:
    """(backend, text, events) of one request run to its end."""
    stream = await engine.open(r or req())
    events = [ev async for ev in stream]
    await stream.aclose()
    text = "".join(ev.text for ev in events if isinstance(ev, Token))
    return stream.backend, text, events


# -- fallback -----------------------------------------------------------------------------------------


async def test_a_backend_that_cannot_load_falls_back_to_the_next() -> None:
    a, b = ScriptedBackend("a", [fail(503, "model_load_failed")]), ScriptedBackend("b", default=ok("from b"))
    engine, clock, hooks = make(a, b)
    backend, text, events = await collect(engine)
    assert (backend, text) == ("b", "from b") and isinstance(events[-1], Finish)
    assert len(a.calls) == 1  # not transient: no retry on the same backend
    assert hooks.fallbacks == [("a", "model_load_failed")] and hooks.starts == ["b"]
    assert clock.slept == []


async def test_an_error_as_first_event_falls_back_like_a_raised_one() -> None:
    a, b = ScriptedBackend("a", [first_error(502, "upstream_error")], default=first_error()), ScriptedBackend("b")
    engine, _, hooks = make(a, b, retries=0)
    backend, _, _ = await collect(engine)
    assert backend == "b" and hooks.fallbacks == [("a", "upstream_error")]


async def test_when_every_backend_fails_the_last_error_is_raised() -> None:
    a = ScriptedBackend("a", default=fail(503, "model_load_failed"))
    b = ScriptedBackend("b", default=first_error(502, "upstream_error"))
    engine, _, hooks = make(a, b, retries=0)
    with pytest.raises(EngineError) as e:
        await engine.open(req())
    assert e.value.error.code == "upstream_error" and e.value.error.status == 502
    assert hooks.rejects == ["upstream_error"]


async def test_no_silent_switch_once_the_stream_has_started() -> None:
    a, b = ScriptedBackend("a", [mid_stream_error("Hel")]), ScriptedBackend("b")
    engine, _, _ = make(a, b)
    backend, text, events = await collect(engine)
    assert backend == "a" and text == "Hel"
    assert isinstance(events[-1], Error) and events[-1].code == "worker_crashed"
    assert b.calls == []


async def test_no_first_token_in_time_falls_back_with_504() -> None:
    a, b = ScriptedBackend("a", [slow(5.0)]), ScriptedBackend("b")
    engine, _, hooks = make(a, b, first_token_timeout=0.02)
    backend, _, _ = await collect(engine)
    assert backend == "b" and hooks.fallbacks == [("a", "first_token_timeout")]
    assert engine.breaker(a).failures == 1


async def test_time_queued_behind_others_is_not_a_slow_first_token() -> None:
    """Waiting for a slot (other clients' work) never reads as a broken backend: the first-token clock
    starts at admission, so a long queue neither falls back nor trips the breaker everyone shares."""
    a = ScriptedBackend("a", [Step(ok().events, queued=0.1, delay=0.01)], queues=True)
    engine, _, hooks = make(a, ScriptedBackend("b"), first_token_timeout=0.05)
    backend, text, _ = await collect(engine)
    assert (backend, text, hooks.fallbacks, engine.breaker(a).failures) == ("a", "Hello", [], 0)


async def test_a_deadline_spent_in_the_queue_is_busy_not_broken() -> None:
    a = ScriptedBackend("a", [Step(ok().events, queued=5.0)], queues=True)
    engine, _, _ = make(a, first_token_timeout=0.05, request_deadline=0.1)
    with pytest.raises(EngineError) as e:
        await collect(engine)
    assert (e.value.error.status, e.value.error.code) == (503, "queue_timeout") and e.value.error.retry_after
    assert engine.breaker(a).failures == 0


async def test_after_admission_a_slow_first_token_still_falls_back_with_504() -> None:
    a = ScriptedBackend("a", [Step(ok().events, queued=0.01, delay=5.0)], queues=True)
    b = ScriptedBackend("b")
    engine, _, hooks = make(a, b, first_token_timeout=0.05)
    backend, _, _ = await collect(engine)
    assert backend == "b" and hooks.fallbacks == [("a", "first_token_timeout")]
    assert engine.breaker(a).failures == 1


# -- retry with back-off ------------------------------------------------------------------------------


async def test_a_transient_failure_is_retried_on_the_same_backend_after_a_back_off() -> None:
    a, b = ScriptedBackend("a", [crash()], default=ok("from a")), ScriptedBackend("b")
    engine, clock, hooks = make(a, b, retries=1)
    backend, text, _ = await collect(engine)
    assert (backend, text) == ("a", "from a") and len(a.calls) == 2 and b.calls == []
    assert len(clock.slept) == 1 and 0 <= clock.slept[0] <= 0.25  # full jitter of 0.25 * 2**0
    assert hooks.fallbacks == []
    assert engine.breaker(a).failures == 0  # the success closed it again


async def test_retries_run_out_then_the_next_backend_serves() -> None:
    a, b = ScriptedBackend("a", default=crash()), ScriptedBackend("b")
    engine, clock, hooks = make(a, b, retries=2, breaker_failures=10)
    backend, _, _ = await collect(engine)
    assert backend == "b" and len(a.calls) == 3 and len(clock.slept) == 2
    assert hooks.fallbacks == [("a", "worker_crashed")]


async def test_the_deadline_bounds_retries() -> None:
    a, b = ScriptedBackend("a", default=crash()), ScriptedBackend("b", default=crash())
    engine, clock, _ = make(a, b, retries=10, breaker_failures=100, request_deadline=0.5)
    clock.slept.clear()
    with pytest.raises(EngineError) as e:
        await engine.open(req())
    assert e.value.error.code == "worker_crashed"
    assert sum(clock.slept) <= 0.5 + 1e-9  # never sleeps past the deadline
    assert len(a.calls) + len(b.calls) < 22


# -- circuit breaker ------------------------------------------------------------------------------------


async def test_breaker_opens_then_half_open_probe_closes_it() -> None:
    a = ScriptedBackend("a", [fail(), fail()], default=ok("a is back"))
    b = ScriptedBackend("b", default=ok("from b"))
    engine, clock, hooks = make(a, b, breaker_failures=2, breaker_cooldown=30.0)
    for _ in range(2):
        assert (await collect(engine))[0] == "b"
    br = engine.breaker(a)
    assert br.state == "open" and len(a.calls) == 2

    assert (await collect(engine))[0] == "b"  # open: a is skipped without being called
    assert len(a.calls) == 2 and hooks.fallbacks[-1] == ("a", "circuit_open")

    clock.advance(29.9)
    assert br.state == "open"
    clock.advance(0.2)
    assert br.state == "half-open"
    backend, text, _ = await collect(engine)  # the probe goes to a, which now answers
    assert (backend, text) == ("a", "a is back") and br.state == "closed" and br.failures == 0


async def test_a_failed_probe_opens_the_breaker_for_another_cool_down() -> None:
    a = ScriptedBackend("a", default=fail())
    b = ScriptedBackend("b")
    engine, clock, _ = make(a, b, breaker_failures=1, breaker_cooldown=10.0)
    await collect(engine)
    br = engine.breaker(a)
    assert br.state == "open"
    clock.advance(10.0)
    assert br.state == "half-open"
    await collect(engine)  # probe fails: open again, from now
    assert len(a.calls) == 2 and br.state == "open"
    clock.advance(9.0)
    await collect(engine)
    assert len(a.calls) == 2  # still cooling down


async def test_a_probe_that_gets_a_client_error_leaves_the_circuit_usable() -> None:
    """The client's own 400 during the half-open probe says nothing about the backend: the next request
    probes again (before, the probe stayed 'in flight' forever and the circuit never closed)."""
    a = ScriptedBackend("a", [fail(), bad_request("logit_bias")], default=ok("a is back"))
    engine, clock, _ = make(a, breaker_failures=1, breaker_cooldown=10.0, retries=0)
    with pytest.raises(EngineError):
        await engine.open(req())
    clock.advance(10.0)
    with pytest.raises(EngineError) as e:
        await engine.open(req())  # the probe: the client's mistake
    assert e.value.error.status == 400
    backend, text, _ = await collect(engine)
    assert (backend, text) == ("a", "a is back") and engine.breaker(a).state == "closed"


def test_half_open_lets_one_probe_through_at_a_time() -> None:
    clock = FakeClock()
    br = CircuitBreaker(1, 5.0, clock)
    br.failure()
    assert not br.allow()
    clock.advance(5.0)
    assert br.allow() and not br.allow()  # one probe; others wait for its outcome
    br.success()
    assert br.state == "closed" and br.allow()


async def test_when_every_breaker_is_open_the_answer_is_503_with_retry_after() -> None:
    a = ScriptedBackend("a", default=fail())
    engine, _, _ = make(a, breaker_failures=1, breaker_cooldown=30.0, retries=0)
    with pytest.raises(EngineError):
        await engine.open(req())
    with pytest.raises(EngineError) as e:
        await engine.open(req())
    assert e.value.error.code == "backend_unavailable" and e.value.error.retry_after == 30.0
    assert len(a.calls) == 1


# -- errors that are not the backend's fault -------------------------------------------------------------


async def test_a_client_error_is_raised_at_once_without_fallback_or_breaker() -> None:
    a, b = ScriptedBackend("a", default=bad_request("messages")), ScriptedBackend("b")
    engine, clock, hooks = make(a, b)
    with pytest.raises(EngineError) as e:
        await engine.open(req())
    assert e.value.error.status == 400 and e.value.error.param == "messages"
    assert len(a.calls) == 1 and b.calls == [] and hooks.fallbacks == [] and clock.slept == []
    assert engine.breaker(a).failures == 0


async def test_queue_full_moves_on_without_tripping_the_breaker() -> None:
    a, b = ScriptedBackend("a", default=queue_full()), ScriptedBackend("b")
    engine, clock, hooks = make(a, b, breaker_failures=1)
    for _ in range(5):
        assert (await collect(engine))[0] == "b"
    assert engine.breaker(a).state == "closed" and engine.breaker(a).failures == 0
    assert len(a.calls) == 5 and clock.slept == []  # busy is not retried either
    assert hooks.fallbacks == [("a", "queue_full")] * 5


async def test_queue_full_everywhere_keeps_its_retry_after() -> None:
    engine, _, _ = make(ScriptedBackend("a", default=queue_full()))
    with pytest.raises(EngineError) as e:
        await engine.open(req())
    assert e.value.error.code == "queue_full" and e.value.error.retry_after == 1.0


# -- registry and readiness --------------------------------------------------------------------------------


async def test_registry_builds_backends_with_the_factories_and_pins_the_default() -> None:
    d1, d2, other = ScriptedBackend("d1"), ScriptedBackend("d2"), ScriptedBackend("o")
    s = settings(default_model="d")
    reg = scripted_registry(s, {"d": [d1, d2], "o": [other]}, aliases={"o": ["oo"]})
    assert reg.get("default").backends == [d1, d2] and reg.get("oo").backends == [other]
    assert d1.pinned and d2.pinned and not other.pinned
    assert all(isinstance(b, Backend) for b in (d1, d2, other))  # the protocol, complete
    with pytest.raises(EngineError) as e:
        reg.get("nope")
    assert e.value.error.status == 404 and e.value.error.code == "model_not_found"


def test_a_spec_type_without_a_factory_is_a_config_error() -> None:
    s = settings(default_model="x")
    models = ModelsFile(models=[ModelSpec(id="x", backends=[LlamaCppBackendSpec(path="x.gguf")])])
    factories = scripted_factories({"x": [ScriptedBackend()]})
    del factories["llamacpp"]
    with pytest.raises(ConfigError, match="llamacpp"):
        Registry(s, models, factories)


async def test_engine_ready_follows_the_default_models_status() -> None:
    a = ScriptedBackend("a", can_load=True, state=BackendState.LOADING)
    engine, _, _ = make(a)
    await engine.start()
    assert a.started and not engine.ready
    a.state = BackendState.READY
    assert engine.ready
    a.state = BackendState.UNLOADED  # reloads on demand: still serviceable
    assert engine.ready
    a.state = BackendState.FAILED
    assert not engine.ready
    await engine.close()
    assert a.closed


async def test_the_backend_sees_the_request_as_sent() -> None:
    a = ScriptedBackend("a")
    engine, _, _ = make(a)
    await collect(engine, req(text="exact words"))
    assert a.calls[0].messages == [Message("user", "exact words")] and a.calls[0].model == "m"
