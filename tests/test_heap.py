"""The HTTP process freezes its heap after start (appliance/heap.py); elsewhere nothing is frozen."""

from __future__ import annotations

import gc

from appliance.heap import freeze_heap, refreeze_heap


def test_the_heap_is_refrozen_only_where_it_was_frozen() -> None:
    assert gc.get_freeze_count() == 0  # the test process never froze its heap
    refreeze_heap()  # an app built in a test (the agent opening) freezes nothing
    assert gc.get_freeze_count() == 0
    try:
        frozen = freeze_heap()
        assert frozen == gc.get_freeze_count() > 1000  # the modules imported so far, at least
        kept = [[object()] for _ in range(5000)]  # made after the freeze: still the collector's
        refreeze_heap()
        assert gc.get_freeze_count() >= frozen + 5000 and kept
    finally:
        gc.unfreeze()
