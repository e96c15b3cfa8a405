"""The worker's outbox: streamed text is gathered briefly, everything else leaves at once."""

from __future__ import annotations

import pickle
import time

from appliance.backends.llamacpp.protocol import (
    Events,
    Failed,
    Finished,
    FirstToken,
    GenRequest,
    Ready,
    Started,
    Text,
)
from appliance.backends.llamacpp.worker import Outbox, merge_text
from appliance.engine.types import Error, Message, SamplingParams, Usage

FIN = Finished("b", "stop", Usage(1, 2, 0))


class Pipe:
    def __init__(self) -> None:
        self.sent: list[Events] = []

    def send(self, msg: Events) -> None:
        self.sent.append(msg)


def test_merge_joins_each_requests_consecutive_text_in_order() -> None:
    events = [Text("a", "He"), Text("b", "x"), Text("a", "llo"), FIN, Text("a", " world")]
    assert merge_text(events) == [Text("a", "Hello world"), Text("b", "x"), FIN]


def test_text_after_another_event_is_not_merged_across_it() -> None:
    fin = Finished("a", "stop", Usage())
    events = [Text("a", "x"), fin, Text("a", "y")]
    assert merge_text(events) == events


def test_first_token_and_finish_go_at_once_text_waits_for_the_interval() -> None:
    pipe = Pipe()
    box = Outbox(pipe, interval=10.0)  # type: ignore[arg-type]
    box.add([FirstToken("a", 0.1), Text("a", "He")])
    assert pipe.sent == [Events([FirstToken("a", 0.1), Text("a", "He")])]
    box.add([Text("a", "l")])
    box.add([Text("a", "lo")])
    assert len(pipe.sent) == 1  # held
    fin = Finished("a", "stop", Usage())
    box.add([fin])
    assert pipe.sent[1] == Events([Text("a", "llo"), fin])


def test_held_text_leaves_once_the_interval_has_passed() -> None:
    pipe = Pipe()
    box = Outbox(pipe, interval=0.05)  # type: ignore[arg-type]
    box.add([Text("a", "x")])
    assert pipe.sent == []
    time.sleep(0.06)
    box.add([Text("a", "y")])
    assert pipe.sent == [Events([Text("a", "xy")])]


def test_zero_interval_sends_every_step_and_final_flushes() -> None:
    pipe = Pipe()
    box = Outbox(pipe, interval=0.0)  # type: ignore[arg-type]
    box.add([Text("a", "x")])
    assert pipe.sent == [Events([Text("a", "x")])]
    box2 = Outbox(pipe, interval=10.0)  # type: ignore[arg-type]
    box2.add([Text("a", "y")])
    box2.add([], final=True)
    assert pipe.sent[-1] == Events([Text("a", "y")])
    box2.add([], final=True)  # nothing held: nothing sent
    assert len(pipe.sent) == 2


def test_pipe_messages_survive_pickling() -> None:
    msgs = [
        GenRequest("id1", [Message("user", "hi")], None, SamplingParams(stop=["x"]), 64),
        GenRequest("id2", None, "raw", SamplingParams(), 64, require_template=True),
        Ready({"pid": 1, "n_ctx": 512}),
        Events([Started("a", 3, 1), FirstToken("a", 0.5), Text("a", "t"), FIN, Failed("c", Error(400, "no"))]),
    ]
    for m in msgs:
        assert pickle.loads(pickle.dumps(m)) == m
