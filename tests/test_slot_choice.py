"""Which slot a new prompt gets and which cached prefix it starts from (slots.place, slots.in_flight)."""

from __future__ import annotations

from types import SimpleNamespace

from appliance.backends.llamacpp.slots import Slot, common_prefix, in_flight, place, runs


def slots(n: int) -> list[Slot]:
    return [Slot(seq_id=i) for i in range(n)]


def test_common_prefix() -> None:
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix([1, 2, 3], [1, 2]) == 2
    assert common_prefix([2], [1]) == 0
    a = list(range(1000))
    for k in (1, 7, 500, 999):
        b = [*a[:k], -1, *a[k + 1 :]]
        assert common_prefix(a, b) == k


def test_runs_counts_consecutive_groups() -> None:
    assert runs([]) == 0
    assert runs([3]) == 1
    assert runs([0, 1, 2]) == 1
    assert runs([2, 0, 1]) == 1
    assert runs([0, 2, 3, 7]) == 3
    assert runs([1, 3, 5, 7]) == 4


def test_a_continued_conversation_goes_back_to_its_slot() -> None:
    s = slots(4)
    s[3].tokens = [1, 2, 3, 4, 5]
    s[3].last_used = 10.0
    p = place(s, [], busy=[], tokens=[1, 2, 3, 4, 5, 6, 7])
    assert p.slot is s[3] and p.keep == 5 and p.source is None
    # even when that leaves a gap in the batch: the cache saves far more than a compute pass
    assert place(s[2:], [], busy=[0], tokens=[1, 2, 3, 4, 5, 6, 7]).slot is s[3]


def test_a_retry_truncates_the_earlier_answer_in_place() -> None:
    """The same prompt again after a long answer: the slot's cache holds the whole prompt; the old answer
    is dropped (llama_memory_seq_rm of the tail), not kept at the cost of computing the prompt again."""
    s = slots(4)
    prompt = list(range(20))
    s[1].tokens = [*prompt, *range(100, 228)]  # the prompt and a 128-token answer
    p = place(s, [], busy=[], tokens=prompt)
    assert p.slot is s[1] and p.keep == 20 and p.source is None


def test_a_shared_prefix_is_copied_rather_than_evicting_a_long_conversation() -> None:
    s = slots(4)
    system = list(range(200))
    s[0].tokens = [*system, *range(1000, 1600)]  # a long conversation that starts with the system prompt
    p = place(s, [], busy=[], tokens=[*system, 7, 8, 9])
    assert p.slot is not s[0] and p.source is s[0] and p.keep == 200
    assert not p.slot.tokens  # an empty slot took it


def test_a_short_shared_prefix_is_computed_again_rather_than_copied_or_evicting() -> None:
    s = slots(4)
    s[0].tokens = [*range(27), *range(500, 525)]  # another conversation sharing 27 tokens (a template header)
    p = place(s, [], busy=[], tokens=[*range(27), 9, 9, 9])
    assert p.slot is not s[0] and p.source is None and p.keep == 0


def test_a_long_gain_truncates_when_every_slot_holds_something() -> None:
    s = slots(2)
    s[0].tokens = [*range(300), *range(900, 920)]  # shares 300, 20 tokens to lose
    s[1].tokens = list(range(5000, 5400))  # unrelated, 400 tokens
    p = place(s, [], busy=[], tokens=[*range(300), 1, 2])
    assert p.slot is s[0] and p.keep == 300 and p.source is None


def test_a_running_slots_prefix_can_be_copied() -> None:
    s = slots(3)
    s[0].tokens = list(range(400))  # running: cannot be truncated, can be copied
    p = place(s[1:], [s[0]], busy=[0], tokens=[*range(300), 5])
    assert p.slot is s[1] and p.source is s[0] and p.keep == 300  # s[1]: keeps the busy ids contiguous


def test_a_new_prompt_keeps_the_busy_ids_contiguous() -> None:
    s = slots(8)
    for x in s:  # every slot holds some other conversation's cache
        x.tokens = [100 + x.seq_id]
    s[7].last_used, s[4].last_used, s[2].last_used = 1.0, 5.0, 6.0
    free = [x for x in s if x.seq_id not in (3,)]
    # seq 3 is decoding: 2 or 4 keep one run; 4 is the less recently used of the two, though 7 is the LRU
    assert place(free, [s[3]], busy=[3], tokens=[9, 9]).slot is s[4]


def test_with_nothing_running_empty_slots_then_the_least_recently_used() -> None:
    s = slots(3)
    s[0].tokens, s[0].last_used = [5, 6], 1.0
    s[1].tokens, s[1].last_used = [7, 8], 2.0
    assert place(s, [], busy=[], tokens=[1]).slot is s[2]
    assert place(s[:2], [], busy=[], tokens=[1]).slot is s[0]


def test_a_prompt_waits_for_a_prefix_another_slot_is_computing() -> None:
    running = Slot(seq_id=0, tokens=list(range(100)))
    running.seq = SimpleNamespace(pending=list(range(100, 1000)))  # 900 prompt tokens still to compute
    assert in_flight([running], [*range(600), 1], available=0)  # shares 600, 100 of them cached so far
    assert not in_flight([running], [*range(600), 1], available=590)  # 10 more are not worth a copy
    assert not in_flight([running], [*range(50), 1], available=0)  # parts within what is cached
    running.seq = SimpleNamespace(pending=[])
    assert not in_flight([running], [*range(100), 1], available=0)  # nothing more to come: copy it now


# -- slot states parked in RAM (host_cache.HostCache) ------------------------------------------------


def test_host_cache_finds_the_longest_parked_prefix_and_stays_within_its_budget() -> None:
    from appliance.backends.llamacpp.host_cache import HostCache

    h = HostCache(budget_bytes=100)
    assert h.put([1, 2, 3, 4], b"a" * 40) and h.put([1, 2, 9], b"b" * 40)
    entry, n = h.best([1, 2, 3, 4, 5])
    assert entry is not None and entry.tokens == (1, 2, 3, 4) and n == 4
    assert h.best([7]) == (None, 0)
    assert not h.put([1, 2, 3], b"c" * 10)  # [1, 2, 3, 4] holds it already
    assert h.put([1, 2, 3, 4, 5, 6], b"d" * 40)  # extends [1, 2, 3, 4]: replaces it
    assert len(h) == 2 and h.used == 80
    h.touch(h.best([1, 2, 9])[0])  # type: ignore[arg-type]
    assert h.put([5, 5], b"e" * 40)  # over budget: the least recently used ([1..6]) goes
    assert h.best([1, 2, 3, 4, 5, 6])[1] == 2 and h.best([1, 2, 9])[1] == 3 and h.used == 80
    assert not h.put([8], b"f" * 101)  # bigger than the whole budget
    assert (h.parked, h.restored) == (4, 1)
