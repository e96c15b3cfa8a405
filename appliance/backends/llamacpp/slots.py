"""Where a new prompt goes: which free slot, and which cached prefix it starts from.

Each slot is one llama.cpp sequence with its own KV stream (`kv_unified=False`) and remembers the tokens
its cache holds. A prompt can start from a cached prefix in two ways:

- **in place**: the slot's cache shares a prefix with the prompt; the rest of the cache is dropped
  (`llama_memory_seq_rm` of the tail) and only the prompt's remainder is computed. This covers a continued
  conversation and also a retry, a regenerate, or the same question asked again after a long answer.
- **by copy**: another slot (idle or running) holds a longer shared prefix; its whole stream is copied
  into the chosen slot (`llama_memory_seq_cp(src, dst, -1, -1)`: with one stream per sequence llama.cpp
  copies only whole streams) and the copy's tail is dropped. N requests sharing a long system prompt
  then compute it once. The copy is a memory copy of one stream (n_ctx_slot x bytes per token of KV:
  180 MiB, some tens of ms, for SmolLM2 at 8,192 tokens), worth `copy_cost` prompt tokens of compute.

The rule, in prompt tokens (a token of prefill is the unit of cost):

    score(slot) = saved - 2 x lost - gap_cost x extra_runs

- `saved`: prompt tokens taken from a cache: the slot's own shared prefix, or the longest prefix any other
  slot shares with the prompt less `copy_cost`, whichever is larger.
- `lost`: tokens of the slot's cache that do not belong to the prompt and are destroyed: another
  conversation's state, which costs that conversation as much to compute again when it comes back. It
  counts double: a request should not take another conversation's cache to save about what it destroys
  (two conversations sharing a system prompt would otherwise evict each other turn after turn). When the
  cache holds the whole prompt, what follows it is an earlier answer to this same prompt (a retry, a
  regenerate, the same question again), superseded by the new one: nothing is lost.
- `extra_runs`: with one stream per sequence, llama.cpp computes each run of consecutive busy sequence
  ids in its own pass, so a slot that leaves a gap among the running ones costs every running request an
  extra compute pass per token.

The free slot with the highest score wins; ties go to the least recently used. So a slot whose cache is
useless (empty, or unrelated and short) takes a new prompt, a long cached conversation is truncated only
when that saves more than twice what it destroys, and a prefix that sits in a valuable cache is copied
out of it instead. The scheduler also holds a prompt back (`in_flight`) while another slot is still
computing a prefix it shares, then copies it: the shared part is computed once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # tokens whose KV is in the cache
    last_used: float = 0.0
    seq: Any = None  # the running generation (scheduler._Seq), None when free


@dataclass(frozen=True)
class SlotPolicy:
    copy_cost: int = 32  # a whole-stream copy, in prompt tokens of compute
    gap_cost: int = 64  # one more compute pass per decode step for the running requests, in prompt tokens
    lost_weight: int = 2  # a token of another conversation's cache, destroyed, in prompt tokens
    restore_cost: int = 8  # a parked state written back into a slot (host_cache.py), in prompt tokens


@dataclass(frozen=True)
class Placement:
    slot: Slot
    keep: int  # prompt tokens that come from a cache (before re-decoding the last one, see Scheduler)
    source: Slot | None = None  # copy this slot's stream first; None: keep the slot's own prefix


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n and a[0] != b[0]:
        return 0
    if a[:n] == b[:n]:  # the common case for a continued conversation: one C-level comparison
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]: bisect with slice comparisons (C speed)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def runs(seq_ids: list[int]) -> int:
    """How many runs of consecutive ids: [0, 1, 2] -> 1, [0, 2, 3] -> 2."""
    ids = sorted(set(seq_ids))
    return sum(1 for i, x in enumerate(ids) if i == 0 or x != ids[i - 1] + 1)


def place(
    free: list[Slot], others: list[Slot], busy: list[int], tokens: list[int], policy: SlotPolicy = SlotPolicy()
) -> Placement:
    """The free slot for a prompt and the cached prefix it starts from (see the module docstring).

    `others` are the slots that are not free (running); their caches can be copied, not truncated.
    """
    shared = {id(s): common_prefix(s.tokens, tokens) for s in [*free, *others]}
    min_runs = min(runs([*busy, s.seq_id]) for s in free)
    best: tuple[float, float] | None = None
    choice = Placement(free[0], 0)
    for slot in free:
        own = shared[id(slot)]
        source, copied = None, 0
        for s in [*free, *others]:
            if s is not slot and shared[id(s)] > copied:
                source, copied = s, shared[id(s)]
        if source is not None and copied - policy.copy_cost > own:
            saved, placement = copied - policy.copy_cost, Placement(slot, copied, source)
        else:
            saved, placement = own, Placement(slot, own)
        lost = 0 if own == len(tokens) else len(slot.tokens) - own
        score = saved - policy.lost_weight * lost - policy.gap_cost * (runs([*busy, slot.seq_id]) - min_runs)
        key = (score, -slot.last_used)
        if best is None or key > best:
            best, choice = key, placement
    return choice


def in_flight(running: list[Slot], tokens: list[int], available: int, policy: SlotPolicy = SlotPolicy()) -> bool:
    """Whether a running slot is computing a prefix of `tokens` that is worth waiting for: longer by more
    than a copy costs than the `available` one, and not yet all in its cache."""
    for s in running:
        pending = s.seq.pending if s.seq is not None else []
        if not pending:
            continue
        done = common_prefix(s.tokens, tokens)
        if done < len(s.tokens):  # they part in what is already cached: nothing more to come
            continue
        soon = done + common_prefix(pending, tokens[done:])
        if soon > done and soon - policy.copy_cost > available:
            return True
    return False
