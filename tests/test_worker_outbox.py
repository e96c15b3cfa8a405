"""The worker's outbox: streamed text is gathered briefly, everything else leaves at once."""

from __future__ import annotations

import time

from appliance.backends.llamacpp.worker import Outbox, merge_text


class Pipe:
    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def send(self, msg: tuple) -> None:
        self.sent.append(msg)


def test_merge_joins_each_requests_consecutive_text_in_order() -> None:
    events = [
        ("a", "token", "He"),
        ("b", "token", "x"),
        ("a", "token", "llo"),
        ("b", "finish", {"reason": "stop"}),
        ("a", "token", " world"),
    ]
    assert merge_text(events) == [
        ("a", "token", "Hello world"),
        ("b", "token", "x"),
        ("b", "finish", {"reason": "stop"}),
    ]


def test_text_after_another_event_is_not_merged_across_it() -> None:
    events = [("a", "token", "x"), ("a", "finish", {}), ("a", "token", "y")]
    assert merge_text(events) == events


def test_first_token_and_finish_go_at_once_text_waits_for_the_interval() -> None:
    pipe = Pipe()
    box = Outbox(pipe, interval=10.0)  # type: ignore[arg-type]
    box.add([("a", "first", {"ttft": 0.1}), ("a", "token", "He")])
    assert pipe.sent == [("ev", [("a", "first", {"ttft": 0.1}), ("a", "token", "He")])]
    box.add([("a", "token", "l")])
    box.add([("a", "token", "lo")])
    assert len(pipe.sent) == 1  # held
    box.add([("a", "finish", {"reason": "stop"})])
    assert pipe.sent[1] == ("ev", [("a", "token", "llo"), ("a", "finish", {"reason": "stop"})])


def test_held_text_leaves_once_the_interval_has_passed() -> None:
    pipe = Pipe()
    box = Outbox(pipe, interval=0.05)  # type: ignore[arg-type]
    box.add([("a", "token", "x")])
    assert pipe.sent == []
    time.sleep(0.06)
    box.add([("a", "token", "y")])
    assert pipe.sent == [("ev", [("a", "token", "xy")])]


def test_zero_interval_sends_every_step_and_final_flushes() -> None:
    pipe = Pipe()
    box = Outbox(pipe, interval=0.0)  # type: ignore[arg-type]
    box.add([("a", "token", "x")])
    assert pipe.sent == [("ev", [("a", "token", "x")])]
    box2 = Outbox(pipe, interval=10.0)  # type: ignore[arg-type]
    box2.add([("a", "token", "y")])
    box2.add([], final=True)
    assert pipe.sent[-1] == ("ev", [("a", "token", "y")])
    box2.add([], final=True)  # nothing held: nothing sent
    assert len(pipe.sent) == 2
