"""The parts of the llama.cpp backend without a model: admission, residency, and the backend's routing of
worker events to generations (by its own ids, never the client's X-Request-Id). Fast tier."""

from __future__ import annotations

import asyncio

import pytest

from appliance.backends.base import BackendState
from appliance.backends.llamacpp.admission import Admission
from appliance.backends.llamacpp.backend import LlamaCppBackend
from appliance.backends.llamacpp.protocol import Cancel, Events, Finished, FirstToken, GenRequest, Started, Text
from appliance.backends.llamacpp.residency import Residency
from appliance.config import LlamaCppBackendSpec
from appliance.engine.types import Admitted, EngineError, Error, Finish, GenerateRequest, Message, Token, Usage
from tests.fakes import settings

# -- admission -----------------------------------------------------------------------------------------


async def test_admission_queues_up_to_its_bound_then_answers_queue_full() -> None:
    adm = Admission("m", parallel=1, max_queue=1, queue_timeout=5.0)
    await adm.acquire()
    waiter = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    assert (adm.running, adm.queued) == (1, 1)
    with pytest.raises(EngineError) as e:
        await adm.acquire()
    assert e.value.error.code == "queue_full" and e.value.error.status == 503 and e.value.error.retry_after == 1.0
    adm.release()
    await waiter
    assert (adm.running, adm.queued) == (1, 0)
    adm.release()
    assert not adm.busy


async def test_admission_times_out_with_queue_timeout() -> None:
    adm = Admission("m", parallel=1, max_queue=4, queue_timeout=0.01)
    async with adm.slot():
        with pytest.raises(EngineError) as e:
            await adm.acquire()
    assert e.value.error.code == "queue_timeout" and e.value.error.retry_after == 1.0
    assert not adm.busy


# -- residency -----------------------------------------------------------------------------------------


class Resident:
    def __init__(self, model_id: str, memory: int, last_used: float, busy: bool = False):
        self.model_id, self._memory, self.last_used, self.busy = model_id, memory, last_used, busy
        self.expires_at: float | None = None
        self.state = BackendState.READY
        self.unloads: list[str] = []

    @property
    def ready(self) -> bool:
        return self.state is BackendState.READY

    @property
    def loaded(self) -> bool:
        return self.state is BackendState.READY

    def memory(self) -> int:
        return self._memory

    async def unload(self, reason: str) -> None:
        self.unloads.append(reason)
        self.state = BackendState.UNLOADED


async def test_make_room_evicts_the_least_recently_used_idle_models() -> None:
    res = Residency(settings(), budget=100)
    old, busy_old, recent, new = (
        Resident("old", 40, 1.0),
        Resident("busy", 40, 0.5, busy=True),
        Resident("recent", 10, 5.0),
        Resident("new", 0, 9.0),
    )
    for r in (old, busy_old, recent, new):
        res.register(r)
    await res.make_room(new, 50)  # used 90, need 50: free 40, skipping the busy one
    assert old.unloads == ["evicted"] and busy_old.unloads == [] and recent.unloads == []


async def test_keep_alive_timer_unloads_when_idle_and_rearms_when_busy() -> None:
    loop = asyncio.get_running_loop()
    res = Residency(settings(), budget=1 << 40)
    r = Resident("m", 1, 0.0, busy=True)
    res.register(r)
    r.expires_at = loop.time() + 0.01
    res.touched(r)
    await asyncio.sleep(0.03)
    assert r.unloads == []  # busy when it fired: the request's end re-arms it
    r.busy = False
    res.touched(r)
    await asyncio.sleep(0.01)
    assert r.unloads == ["idle"]
    r.state = BackendState.READY
    r.expires_at = None  # pinned / keep_alive < 0: never
    res.touched(r)
    await asyncio.sleep(0.02)
    assert r.unloads == ["idle"]
    r.expires_at = loop.time() + 0.01
    res.touched(r)
    await res.close()  # cancels the timers
    await asyncio.sleep(0.02)
    assert r.unloads == ["idle"]


# -- the backend's routing, on a fake supervisor -------------------------------------------------------


class FakeSupervisor:
    """Stands in for the worker: records what is sent; the test plays the worker's events back."""

    def __init__(self) -> None:
        self.state = BackendState.READY
        self.sent: list = []
        self.pid = 4242
        self.restarts, self.error, self.path, self.info = 0, None, None, {"n_ctx": 512}
        self.stopped: list[str] = []

    @property
    def loaded(self) -> bool:
        return True

    def memory(self) -> int:
        return 123

    def estimate(self) -> int:
        return 123

    async def wait_ready(self, timeout: float) -> None:
        return None

    def send(self, msg) -> bool:
        self.sent.append(msg)
        return True

    async def stop(self, reason: str) -> None:
        self.stopped.append(reason)
        self.state = BackendState.UNLOADED


def backend() -> tuple[LlamaCppBackend, FakeSupervisor]:
    b = LlamaCppBackend("m", LlamaCppBackendSpec(path="x.gguf"), settings())
    fake = FakeSupervisor()
    b.supervisor = fake  # type: ignore[assignment]
    return b, fake


def chat(text: str, request_id: str = "same-id") -> GenerateRequest:
    return GenerateRequest(model="m", messages=[Message("user", text)], request_id=request_id)


async def drain(it) -> list:
    """The events after Admitted, which a llama.cpp backend yields first (when it gets a slot)."""
    events = [ev async for ev in it]
    assert events[0] == Admitted(), events[:1]
    return events[1:]


async def test_two_generations_with_the_same_request_id_each_get_their_own_events() -> None:
    b, sup = backend()
    one, two = asyncio.create_task(drain(b.generate(chat("one")))), asyncio.create_task(drain(b.generate(chat("two"))))
    while len(sup.sent) < 2:
        await asyncio.sleep(0)
    g1, g2 = sup.sent
    assert isinstance(g1, GenRequest) and isinstance(g2, GenRequest)
    assert g1.id != g2.id and "same-id" not in (g1.id, g2.id) and len(g1.id) == 32  # uuid4 hex
    assert g1.messages == [Message("user", "one")] and g2.messages == [Message("user", "two")]
    u = Usage(3, 1)
    b._on_events(Events([Started(g2.id, 3, 0), FirstToken(g2.id, 0.1), Text(g2.id, "B"), Text(g1.id, "A")]))
    b._on_events(Events([Finished(g1.id, "stop", u), Finished(g2.id, "length", u)]))
    assert await one == [Token("A"), Finish("stop", u)]
    assert await two == [Token("B"), Finish("length", u)]
    assert not b.busy


async def test_a_closed_stream_cancels_only_its_own_generation() -> None:
    b, sup = backend()
    it = b.generate(chat("one"))
    assert await anext(it) == Admitted()
    task = asyncio.create_task(anext(it))
    while not sup.sent:
        await asyncio.sleep(0)
    b._on_events(Events([Text(sup.sent[0].id, "x")]))
    assert await task == Token("x")
    await it.aclose()  # the client went away
    assert sup.sent[-1] == Cancel(sup.sent[0].id)


async def test_unload_ends_generations_in_flight_with_a_clean_error() -> None:
    b, sup = backend()
    task = asyncio.create_task(drain(b.generate(chat("one"))))
    while not sup.sent:
        await asyncio.sleep(0)
    b._on_lost(Error(503, "unloaded", "server_error", "model_unloaded", retry_after=1.0))
    events = await task
    assert isinstance(events[-1], Error) and events[-1].code == "model_unloaded"
    await b.unload("keep_alive 0")
    assert sup.stopped == ["keep_alive 0"] and b.expires_at is None


async def test_status_is_typed_and_keep_alive_shows_as_expires_in() -> None:
    b, _ = backend()
    await drain_one(b, keep_alive=60)
    st = b.status()
    assert st.kind == "llamacpp" and st.state is BackendState.READY and st.loaded and st.serviceable
    assert (
        st.pid == 4242
        and st.context_length == 512
        and st.slots == b.parallel == settings().parallel
        and st.memory_bytes == 123
    )
    assert st.expires_in is not None and 59 <= st.expires_in <= 60
    d = st.as_dict()
    assert d["state"] == "ready" and d["type"] == "llamacpp" and d["in_flight"] == 0
    b.pinned = True
    await drain_one(b, keep_alive=None)
    assert b.status().expires_in is None  # the default model stays


async def drain_one(b: LlamaCppBackend, keep_alive: float | None) -> None:
    sup = b.supervisor
    r = chat("x")
    r.keep_alive = keep_alive
    task = asyncio.create_task(drain(b.generate(r)))
    n = len(sup.sent)  # type: ignore[attr-defined]
    while len(sup.sent) == n:  # type: ignore[attr-defined]
        await asyncio.sleep(0)
    b._on_events(Events([Finished(sup.sent[-1].id, "stop", Usage())]))  # type: ignore[attr-defined]
    await task
