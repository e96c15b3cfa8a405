"""Slot caches parked in RAM: what a slot held before another prompt took it, to be restored later.

With more conversations (or repeated prompts) than slots, a slot's KV cache is overwritten by the next prompt
that needs the slot, and the conversation it held pays a full prefill when it comes back. Before that
happens the scheduler copies the slot's state out (`llama_state_seq_get_data`: its KV cells, ~23 KB per
token for SmolLM2-135M, ~0.5 ms for 50 tokens) into this store; a prompt that later shares a longer prefix
with a parked state than with any slot gets it written back into its slot (`llama_state_seq_set_data`, as
fast) instead of computing it (~4 ms a token on 2 cores). llama-server does the same with `--cache-ram`.

The store is bounded in bytes (`APPLIANCE_PROMPT_CACHE_MIB`, 0 turns it off) and forgets the least
recently used states first. A state whose tokens extend another's replaces it; one that another extends is
not stored twice.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from appliance.backends.llamacpp.slots import common_prefix


@dataclass(frozen=True)
class Parked:
    tokens: tuple[int, ...]  # the tokens whose KV `data` holds
    data: bytes  # llama_state_seq_get_data of one sequence


class HostCache:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.used = 0
        self._entries: OrderedDict[tuple[int, ...], Parked] = OrderedDict()  # least recently used first
        self.parked = 0  # states stored
        self.restored = 0  # states written back into a slot

    def __len__(self) -> int:
        return len(self._entries)

    def best(self, tokens: list[int]) -> tuple[Parked | None, int]:
        """The parked state sharing the longest prefix with `tokens`, and that length."""
        found, length = None, 0
        for entry in self._entries.values():
            n = common_prefix(list(entry.tokens), tokens)
            if n > length:
                found, length = entry, n
        return found, length

    def covers(self, tokens: list[int]) -> bool:
        """Whether a parked state already holds all of `tokens` (no need to park them again)."""
        t = tuple(tokens)
        return any(e.tokens[: len(t)] == t for e in self._entries.values())

    def put(self, tokens: list[int], data: bytes) -> bool:
        """Park a state (dropping those it extends, then the least recently used over the budget)."""
        if not tokens or len(data) > self.budget or self.covers(tokens):
            return False
        key = tuple(tokens)
        for k in [k for k in self._entries if key[: len(k)] == k]:
            self._drop(k)
        self._entries[key] = Parked(key, data)
        self.used += len(data)
        self.parked += 1
        while self.used > self.budget:
            self._drop(next(iter(self._entries)))
        return True

    def touch(self, entry: Parked) -> None:
        """Mark `entry` as just used (restored): it is forgotten last."""
        if entry.tokens in self._entries:
            self._entries.move_to_end(entry.tokens)
        self.restored += 1

    def _drop(self, key: tuple[int, ...]) -> None:
        self.used -= len(self._entries.pop(key).data)
