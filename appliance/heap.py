"""Keep Python's full garbage collections short in the HTTP process.

A full (generation 2) collection walks every tracked object, and most of them are the modules, classes and
functions imported at start: with the app and its clients loaded (~115–200k objects) each one paused the
event loop for 50–80 ms on this 2-core box, and /health's p99 under load was that pause. `gc.freeze()`
moves everything alive at a quiet moment (after start, after the agent's imports) to a generation the
collector never walks; objects made later are collected as before.
"""

from __future__ import annotations

import gc


def freeze_heap() -> int:
    """Collect once, then freeze what is left; the number of objects now out of the collector's reach."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def refreeze_heap() -> None:
    """`freeze_heap` again after a burst of imports, in a process that froze its heap at start (`appliance
    serve`); elsewhere (an app built in a test) nothing."""
    if gc.get_freeze_count():
        freeze_heap()
