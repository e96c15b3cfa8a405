"""Which slot a new prompt gets: its own cache, else one that keeps the batch contiguous, else empty/LRU."""

from __future__ import annotations

from appliance.backends.llamacpp.scheduler import _Slot, pick_slot, runs


def slots(n: int) -> list[_Slot]:
    return [_Slot(seq_id=i) for i in range(n)]


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
    assert pick_slot(s, busy=[], tokens=[1, 2, 3, 4, 5, 6, 7]) is s[3]
    # even when that leaves a gap in the batch: the cache saves far more than a compute pass
    assert pick_slot(s[2:], busy=[0], tokens=[1, 2, 3, 4, 5, 6, 7]) is s[3]


def test_a_new_prompt_keeps_the_busy_ids_contiguous() -> None:
    s = slots(8)
    for x in s:  # every slot holds some other conversation's cache
        x.tokens = [100 + x.seq_id]
    s[7].last_used, s[4].last_used, s[2].last_used = 1.0, 5.0, 6.0
    free = [x for x in s if x.seq_id not in (3,)]
    # seq 3 is decoding: 2 or 4 keep one run; 4 is the less recently used of the two, though 7 is the LRU
    assert pick_slot(free, busy=[3], tokens=[9, 9]) is s[4]


def test_with_nothing_running_empty_slots_then_the_least_recently_used() -> None:
    s = slots(3)
    s[0].tokens, s[0].last_used = [5, 6], 1.0
    s[1].tokens, s[1].last_used = [7, 8], 2.0
    assert pick_slot(s, busy=[], tokens=[1]) is s[2]
    assert pick_slot(s[:2], busy=[], tokens=[1]) is s[0]
