"""The worker's continuous-batching scheduler, in process, on the real embedded model (correctness, not timing).

Slow tier: the real model generates in every test (~20 s in all on 2 cores)."""

from __future__ import annotations

import pytest

from appliance.backends.llamacpp.protocol import Failed, Finished, FirstToken, GenRequest, Started, Text
from appliance.backends.llamacpp.scheduler import Job
from appliance.backends.llamacpp.worker import _Worker
from appliance.catalog import embedded_smollm2
from appliance.engine.types import Message, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "Name three colours.",
    "What is the capital of Italy?",
    "Write a haiku about the sea.",
    "Count from one to five in words.",
]


@pytest.fixture(scope="module")
def worker() -> _Worker:
    return _Worker(
        {
            "path": str(embedded_smollm2()[0]),
            "context_size": 1024,
            "threads": 1,  # on a loaded 2-core machine, 2 spinning llama.cpp threads can run 20x slower
            "parallel": 4,
            "batch_size": 512,
            "batch_invariant": True,  # these tests compare outputs across batching and caching
        }
    )


def gen(rid: str, messages: list[Message], **params) -> GenRequest:
    sampling = SamplingParams(**{"max_tokens": 24, "temperature": 0.0, **params})
    return GenRequest(rid, messages, None, sampling, default_max_tokens=64)


def job(w: _Worker, rid: str, content: str, **params) -> Job:
    return w._job(gen(rid, [Message("user", content)], **params))


def run(w: _Worker, jobs: list[Job], cancel_after: dict[str, int] | None = None) -> dict[str, dict]:
    """Submit jobs, step until idle; returns text, finish and usage per request id."""
    out: dict[str, dict] = {j.req_id: {"text": "", "tokens": 0} for j in jobs}
    for j in jobs:
        w.sched.submit(j)
    steps = 0
    while w.sched.busy:
        for ev in w.sched.step():
            if isinstance(ev, Text):
                out[ev.id]["text"] += ev.text
                out[ev.id]["tokens"] += 1
            elif isinstance(ev, Finished):
                out[ev.id]["finish"] = ev
            elif isinstance(ev, Started):
                out[ev.id]["start"] = ev
            elif isinstance(ev, Failed):
                out[ev.id]["error"] = ev.error
        steps += 1
        for rid, n in (cancel_after or {}).items():
            if out[rid]["tokens"] >= n and "cancelled" not in out[rid]:
                out[rid]["cancelled"] = w.sched.cancel(rid)
        assert steps < 2000
    return out


def test_batched_equals_unbatched_at_temperature_zero(worker: _Worker) -> None:
    alone = {}
    for i, p in enumerate(PROMPTS):
        alone.update(run(worker, [job(worker, f"a{i}", p)]))
    together = run(worker, [job(worker, f"b{i}", p) for i, p in enumerate(PROMPTS)])
    for i in range(len(PROMPTS)):
        assert together[f"b{i}"]["text"] == alone[f"a{i}"]["text"], PROMPTS[i]
        t, a = together[f"b{i}"]["finish"].usage, alone[f"a{i}"]["finish"].usage
        assert (t.prompt_tokens, t.completion_tokens) == (a.prompt_tokens, a.completion_tokens)


def test_same_seed_same_output_when_batched(worker: _Worker) -> None:
    a = run(worker, [job(worker, "s1", PROMPTS[2], temperature=1.0, seed=7)])
    b = run(
        worker,
        [
            job(worker, "s2", PROMPTS[2], temperature=1.0, seed=7),
            job(worker, "x", PROMPTS[0], temperature=1.0, seed=99),
        ],
    )
    assert a["s1"]["text"] == b["s2"]["text"]


def test_slot_reuse_matches_a_cold_run(worker: _Worker) -> None:
    convo = [Message("user", "Tell me about cats.")]
    first = run(worker, [job(worker, "t1", "Tell me about cats.")])["t1"]
    follow = [*convo, Message("assistant", first["text"]), Message("user", "And dogs?")]
    warm = run(worker, [worker._job(gen("t2", follow))])["t2"]
    assert warm["start"].cached_tokens > 20  # the first turn came from the slot's cache
    for slot in worker.sched.slots:  # wipe every cache: a cold run of the same prompt
        slot.tokens.clear()
    import llama_cpp

    llama_cpp.llama_memory_clear(worker.sched.mem, True)
    cold = run(worker, [worker._job(gen("t3", follow))])["t3"]
    assert cold["start"].cached_tokens == 0
    assert warm["text"] == cold["text"]


def test_interleaved_conversations_each_keep_their_slot(worker: _Worker) -> None:
    topics = ["cats", "the moon", "pizza", "rivers"]
    histories = {t: [Message("user", f"Tell me about {t}.")] for t in topics}
    previous: dict[str, int] = {}
    for turn in range(2):
        for t in topics:  # one request at a time, round-robin: each must land in its own slot
            r = run(worker, [worker._job(gen(f"{t}{turn}", list(histories[t]), max_tokens=16))])[f"{t}{turn}"]
            if turn == 1:  # the whole previous prompt (and most of the answer) came from this slot's cache
                assert r["start"].cached_tokens >= previous[t] + 8, t
            previous[t] = r["start"].prompt_tokens
            histories[t] += [Message("assistant", r["text"]), Message("user", "More.")]


def test_cancel_and_stop_of_one_leave_the_others_unchanged(worker: _Worker) -> None:
    base = run(worker, [job(worker, f"c{i}", p) for i, p in enumerate(PROMPTS[:3])])
    words = base["c1"]["text"].split()
    assert len(words) > 4
    stop = words[3]  # a stop string that the unstopped run reaches mid-way
    mixed = run(
        worker,
        [
            job(worker, "d0", PROMPTS[0]),
            job(worker, "d1", PROMPTS[1], stop=[stop]),
            job(worker, "d2", PROMPTS[2]),
        ],
        cancel_after={"d0": 3},
    )
    assert mixed["d0"]["cancelled"] is True and "finish" not in mixed["d0"]
    assert mixed["d2"]["text"] == base["c2"]["text"]
    assert mixed["d1"]["text"] == base["c1"]["text"][: base["c1"]["text"].index(stop)]
    assert mixed["d1"]["finish"].reason == "stop"
    assert not worker.sched.busy and all(s.seq is None for s in worker.sched.slots)


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(worker: _Worker) -> None:
    long_prompt = "Summarise: " + "the quick brown fox jumps over the lazy dog. " * 40  # ~400 tokens, batch 64
    w = worker
    w.sched.submit(job(w, "short", PROMPTS[0], max_tokens=40))
    for _ in range(3):
        w.sched.step()
    w.sched.submit(job(w, "long", long_prompt, max_tokens=4))
    short_tokens_during_prefill = 0
    long_started = False
    while w.sched.busy:
        for ev in w.sched.step():
            if ev.id == "long" and isinstance(ev, FirstToken):
                long_started = True
            if ev.id == "short" and isinstance(ev, Text) and not long_started:
                short_tokens_during_prefill += 1
    assert short_tokens_during_prefill >= 3  # the running stream kept flowing while the newcomer prefilled
