"""Sending scheduler events over the worker's pipe: streamed text is gathered for up to `interval` seconds
(see protocol.py for why); every other event leaves at once."""

from __future__ import annotations

import time
from multiprocessing.connection import Connection

from appliance.backends.llamacpp.protocol import Events, Text, WorkerEvent


class Outbox:
    """Sends scheduler events over the pipe, gathering streamed text for up to `interval` seconds."""

    def __init__(self, conn: Connection, interval: float):
        self.conn = conn
        self.interval = interval
        self.held: list[WorkerEvent] = []
        self.since = 0.0  # when the oldest held event was produced

    def add(self, events: list[WorkerEvent], final: bool = False) -> None:
        if not events and not self.held:
            return
        now = time.monotonic()
        if not self.held:
            self.since = now
        self.held.extend(events)
        urgent = final or any(not isinstance(ev, Text) for ev in events)
        if urgent or now - self.since >= self.interval:
            self.conn.send(Events(merge_text(self.held)))
            self.held = []


def merge_text(events: list[WorkerEvent]) -> list[WorkerEvent]:
    """Join each generation's consecutive `Text` events into one (order per generation is kept)."""
    out: list[WorkerEvent] = []
    last: dict[str, int] = {}  # generation id -> index of its latest event in `out`
    for ev in events:
        i = last.get(ev.id)
        prev = out[i] if i is not None else None
        if isinstance(ev, Text) and isinstance(prev, Text):
            lps = (prev.logprobs or ()) + (ev.logprobs or ()) if prev.logprobs or ev.logprobs else None
            out[i] = Text(ev.id, prev.text + ev.text, lps)  # type: ignore[index]
        else:
            last[ev.id] = len(out)
            out.append(ev)
    return out
