"""Prefix reuse in the llama.cpp worker, on the real embedded model (correctness, not timing).

A prompt starts from the longest prefix any slot holds: in place (the slot's tail is dropped with
llama_memory_seq_rm) or copied from another slot (whole-stream llama_memory_seq_cp, then the tail dropped).
In the batch-invariant setting every such run must give exactly the tokens of a cold run, and no slot's
cache may be disturbed by what is done to another. Cached-token counts must say what was reused.
"""

from __future__ import annotations

import llama_cpp
import openai
import pytest

from appliance.backends.llamacpp.host_cache import HostCache
from appliance.backends.llamacpp.protocol import Failed, Finished, GenRequest, Started, Text
from appliance.backends.llamacpp.worker import _Worker
from appliance.catalog import embedded_smollm2
from appliance.engine.types import Message, SamplingParams
from tests.conftest import Server

pytestmark = pytest.mark.slow

SYSTEM = "You are a careful assistant. " + "Always answer with short, plain sentences about the topic asked. " * 12
QUESTIONS = ["Name a fruit.", "Name a colour.", "Name a river.", "What is the capital of France?"]


def make_worker(parallel: int, invariant: bool = True, prompt_cache_mib: int = 0) -> _Worker:
    return _Worker(
        {
            "path": str(embedded_smollm2()[0]),
            "context_size": 1024,
            "threads": 1,
            "parallel": parallel,
            "batch_size": 512,
            "batch_invariant": invariant,
            "prompt_cache_mib": prompt_cache_mib,
        }
    )


@pytest.fixture(scope="module")
def worker() -> _Worker:
    return make_worker(4)


def gen(rid: str, question: str, system: str = SYSTEM, max_tokens: int = 16) -> GenRequest:
    msgs = [Message("system", system), Message("user", question)]
    return GenRequest(rid, msgs, None, SamplingParams(max_tokens=max_tokens, temperature=0.0), default_max_tokens=64)


def run(w: _Worker, reqs: list[GenRequest]) -> dict[str, dict]:
    """Submit all at once, step until idle: text, Started and Finished per id."""
    out: dict[str, dict] = {r.id: {"text": ""} for r in reqs}
    for r in reqs:
        w.sched.submit(w._job(r))
    steps = 0
    while w.sched.busy:
        for ev in w.sched.step():
            if isinstance(ev, Text):
                out[ev.id]["text"] += ev.text
            elif isinstance(ev, Started):
                out[ev.id]["start"] = ev
            elif isinstance(ev, Finished):
                out[ev.id]["finish"] = ev
            elif isinstance(ev, Failed):
                raise AssertionError(ev.error)
        steps += 1
        assert steps < 3000
    for r in out.values():
        assert r["start"].cached_tokens == r["finish"].usage.cached_tokens
    return out


def wipe(w: _Worker) -> None:
    llama_cpp.llama_memory_clear(w.sched.mem, True)
    for s in w.sched.slots:
        s.tokens.clear()
    if w.sched.host is not None:  # and what was parked in RAM
        w.sched.host = HostCache(w.sched.host.budget)


def cold(w: _Worker, req: GenRequest) -> str:
    wipe(w)
    r = run(w, [req])[req.id]
    assert r["start"].cached_tokens == 0
    return r["text"]


def test_a_repeated_prompt_reuses_its_slot_in_place_and_matches_a_cold_run(worker: _Worker) -> None:
    wipe(worker)
    first = run(worker, [gen("r1", QUESTIONS[3])])["r1"]
    n = first["start"].prompt_tokens
    assert first["start"].cached_tokens == 0 and first["text"]
    again = run(worker, [gen("r2", QUESTIONS[3])])["r2"]
    assert again["start"].cached_tokens == n - 1  # all but the last token, re-decoded for its logits
    assert worker.sched.stats()["prefix_copies"] == 0
    assert again["text"] == first["text"]


def test_a_copied_prefix_matches_a_cold_run_and_leaves_its_source_intact(worker: _Worker) -> None:
    wipe(worker)
    base = run(worker, [gen("s1", QUESTIONS[0])])["s1"]
    holder = next(s for s in worker.sched.slots if s.tokens)
    held = list(holder.tokens)
    shared = len(worker._job(gen("x", QUESTIONS[1])).tokens) - 8  # roughly: all but the question
    copies = worker.sched.stats()["prefix_copies"]
    warm = run(worker, [gen("s2", QUESTIONS[1])])["s2"]
    assert worker.sched.stats()["prefix_copies"] == copies + 1
    assert warm["start"].cached_tokens >= shared  # the system prompt came from the other slot
    assert holder.tokens == held  # the source slot was copied, not truncated
    # The source's cache still answers its own prompt exactly: retry it in place.
    again = run(worker, [gen("s3", QUESTIONS[0])])["s3"]
    assert again["start"].cached_tokens == base["start"].prompt_tokens - 1
    assert again["text"] == base["text"]
    assert warm["text"] == cold(worker, gen("s4", QUESTIONS[1]))


def test_concurrent_requests_sharing_a_system_prompt_compute_it_once(worker: _Worker) -> None:
    alone = {q: cold(worker, gen("c", q)) for q in QUESTIONS}
    wipe(worker)
    copies = worker.sched.stats()["prefix_copies"]
    together = run(worker, [gen(f"t{i}", q) for i, q in enumerate(QUESTIONS)])
    cached = sorted(r["start"].cached_tokens for r in together.values())
    n_system = len(worker._job(gen("x", QUESTIONS[0])).tokens) - 10
    assert cached[0] == 0 and all(c >= n_system for c in cached[1:])  # one prefill, three copies
    assert worker.sched.stats()["prefix_copies"] == copies + 3
    for i, q in enumerate(QUESTIONS):
        assert together[f"t{i}"]["text"] == alone[q], q


def test_a_copy_from_a_running_slot_leaves_the_running_request_unchanged(worker: _Worker) -> None:
    long_q = gen("l", QUESTIONS[2], max_tokens=40)
    alone = cold(worker, long_q)
    solo_new = cold(worker, gen("n", QUESTIONS[3]))
    wipe(worker)
    w = worker
    w.sched.submit(w._job(gen("l2", QUESTIONS[2], max_tokens=40)))
    texts = {"l2": "", "n2": ""}
    started: dict[str, Started] = {}
    steps = 0
    while w.sched.busy:
        if steps == 5:  # the first is decoding now: the newcomer copies its system prompt from it
            w.sched.submit(w._job(gen("n2", QUESTIONS[3])))
        for ev in w.sched.step():
            if isinstance(ev, Text):
                texts[ev.id] += ev.text
            elif isinstance(ev, Started):
                started[ev.id] = ev
        steps += 1
    assert started["n2"].cached_tokens > 100
    assert texts["l2"] == alone and texts["n2"] == solo_new


def test_truncating_a_slot_in_place_never_touches_another_slots_cache() -> None:
    w = make_worker(2)
    food = "You answer about food."
    a = run(w, [gen("a", QUESTIONS[0], system=food)])["a"]
    b = run(w, [gen("b", QUESTIONS[1])])["b"]
    prompt_a = w._job(gen("x", QUESTIONS[0], system=food)).tokens
    slot_a = next(s for s in w.sched.slots if s.tokens[: len(prompt_a)] == prompt_a)
    held_a = list(slot_a.tokens)
    # Both slots hold something: a prompt sharing B's long system prompt truncates B's slot in place.
    c = run(w, [gen("c", QUESTIONS[2])])["c"]
    assert c["start"].cached_tokens > 100
    assert w.sched.stats()["prefix_copies"] == 0  # in place, not copied
    assert slot_a.tokens == held_a
    # A's cache is whole: its prompt again is answered from it, token for token as before.
    a2 = run(w, [gen("a2", QUESTIONS[0], system=food)])["a2"]
    assert a2["start"].cached_tokens == a["start"].prompt_tokens - 1 and a2["text"] == a["text"]
    assert c["text"] == cold(w, gen("c2", QUESTIONS[2]))
    assert b["text"] == cold(w, gen("b2", QUESTIONS[1]))


def test_a_parked_slot_state_comes_back_and_matches_a_cold_run() -> None:
    """More conversations than slots: before a prompt takes a slot, what the slot held is parked in RAM
    (host_cache.py); when that prompt comes back, its state is written back instead of computed. Token for
    token as a cold run, and the request running in the other slot meanwhile is not disturbed."""
    w = make_worker(2, prompt_cache_mib=64)
    food, rivers = "You answer about food.", "You answer about rivers, briefly."
    a = run(w, [gen("a", QUESTIONS[0], system=food)])["a"]
    b = run(w, [gen("b", QUESTIONS[1])])["b"]
    c = run(w, [gen("c", QUESTIONS[2], system=rivers)])["c"]  # takes a's slot (the least recently used)
    assert w.sched.stats()["parked_states"] == 1 and w.sched.stats()["restored_states"] == 0
    # a comes back while d, a new prompt, runs beside it: a's state is written back, d's slot (b's, now
    # parked too) is computed
    both = run(w, [gen("a2", QUESTIONS[0], system=food), gen("d", QUESTIONS[3], max_tokens=32)])
    a2, d = both["a2"], both["d"]
    assert a2["start"].cached_tokens == a["start"].prompt_tokens - 1 and a2["text"] == a["text"]
    stats = w.sched.stats()
    assert stats["restored_states"] == 1 and stats["parked_states"] == 3  # a (kept), b, c
    assert stats["parked_bytes"] > 0
    b2 = run(w, [gen("b2", QUESTIONS[1])])["b2"]
    assert b2["start"].cached_tokens == b["start"].prompt_tokens - 1 and b2["text"] == b["text"]
    assert d["text"] == cold(w, gen("d2", QUESTIONS[3], max_tokens=32))
    assert a["text"] == cold(w, gen("a3", QUESTIONS[0], system=food))
    assert c["text"] == cold(w, gen("c2", QUESTIONS[2], system=rivers))


def test_default_mode_reuses_prefixes_too() -> None:
    """Large compute passes (the default): outputs may differ from a cold run in the last bits, but reuse
    and its counts work the same."""
    w = make_worker(2, invariant=False)
    assert w.info["batch_invariant"] is False
    first = run(w, [gen("d1", QUESTIONS[3])])["d1"]
    again = run(w, [gen("d2", QUESTIONS[3])])["d2"]
    assert again["start"].cached_tokens == first["start"].prompt_tokens - 1
    other = run(w, [gen("d3", QUESTIONS[0])])["d3"]
    assert other["start"].cached_tokens > 100 and other["text"]


def test_cached_tokens_reach_the_openai_usage(appliance_server: Server) -> None:
    client = openai.OpenAI(base_url=f"{appliance_server.base_url}/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a mountain."}]
    first = client.chat.completions.create(model="default", messages=msgs, max_tokens=8, temperature=0)
    second = client.chat.completions.create(model="default", messages=msgs, max_tokens=8, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    assert second.choices[0].message.content == first.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model="default",
            messages=msgs,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == chunks[-1].usage.prompt_tokens - 1
