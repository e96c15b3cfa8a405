"""The agent's pure parts: the safe calculator, what an answer that uses a result contains, prompt folding,
and the engine chat model (tools bound, tool-call deltas joined into calls, tool traffic in the history)."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool

from appliance.agent.chat_model import EngineChatModel, to_engine_messages, to_tool_choice
from appliance.agent.graph import fold, uses_results
from appliance.agent.tools import CalculatorError, all_tools, answer_keys, calculator, now_text, safe_eval
from appliance.engine.types import (
    EngineError,
    Error,
    Finish,
    SamplingParams,
    Token,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    Usage,
)


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("12 * 7", 84),
        ("(3 + 4) * 12", 84),
        ("2 ** 10", 1024),
        ("2^10", 1024),
        ("-3 + +5", 2),
        ("7 % 3", 1),
        ("1 / 4", 0.25),
        ("1.5 * 2", 3.0),
    ],
)
def test_calculator_evaluates_arithmetic(expr: str, value: float) -> None:
    assert safe_eval(expr) == value


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('echo hi')",
        "open('/etc/passwd')",
        "x + 1",
        "[1, 2][0]",
        "(lambda: 1)()",
        "1 if 1 else 2",
        "2 // 3",  # only + - * / ** % are allowed
        "True + 1",
        "1e400 * 1",
        "10 ** 10 ** 10",
        "9 ** 999",
        "1 / 0",
        "5 % 0",
        "0 ** -1",
        "(-8) ** 0.5",
        "1 +" * 100 + "1",
        "",
    ],
)
def test_calculator_refuses_everything_else(expr: str) -> None:
    with pytest.raises(CalculatorError):
        safe_eval(expr)


def test_calculator_tool_reports_errors_as_results() -> None:
    assert calculator.invoke({"expression": "6*7"}) == "6*7 = 42"
    out = calculator.invoke({"expression": "1/0"})
    assert "division by zero" in out


def test_answer_keys() -> None:
    assert answer_keys("calculator", "12 * 7 = 84") == ["84"]
    assert answer_keys("calculator", "1000 * 1234 = 1234000") == ["1234000", "1,234,000"]
    assert answer_keys("calculator", "Error: calculator error: division by zero") == []
    when = dt.datetime(2026, 3, 5, 14, 7, tzinfo=dt.UTC)
    assert now_text(when) == "Today is Thursday, March 5, 2026; the time is 14:07 UTC (2026-03-05T14:07:00+00:00)"
    keys = answer_keys("current_datetime", now_text(when) + ".")
    assert {"2026-03-05", "March 5", "5 March", "Mar 5", "Thursday", "14:07", "2:07"} <= set(keys)
    found = "- The user's name is Alice.\n- The user likes green tea."
    assert answer_keys("search_memory", found, "What is my name?") == ["alice", "likes", "green", "tea"]
    assert answer_keys("search_memory", "Nothing remembered about that.", "What is my name?") == []
    assert answer_keys("save_memory", "Saved to memory: The user likes tea.") == []


def test_uses_results() -> None:
    call = {"name": "calculator", "args": {"expression": "12*7"}, "id": "c1", "type": "tool_call"}

    def state(answer: str, result: str = "12*7 = 84", status: str = "success") -> dict:
        msgs = [
            HumanMessage("What is 12*7?"),
            AIMessage("", tool_calls=[call]),
            ToolMessage(result, name="calculator", tool_call_id="c1", status=status),
            AIMessage(answer),
        ]
        return {"messages": msgs, "memories": []}

    assert uses_results(state("12 times 7 is 84."))
    assert not uses_results(state("The tool cannot do arithmetic."))
    assert not uses_results(state("It is 85."))
    assert uses_results(state("I could not compute that.", "Error: boom", "error"))  # nothing to check
    assert uses_results({"messages": [HumanMessage("hi"), AIMessage("Hello!")], "memories": []})
    assert not uses_results({"messages": [HumanMessage("hi")], "memories": []})


def test_fold_makes_alternating_turns_with_tool_results() -> None:
    call = {"name": "calculator", "args": {"expression": "6*7"}, "id": "c1", "type": "tool_call"}
    history = [
        HumanMessage("hi"),
        AIMessage("hello"),
        HumanMessage("What is 6*7?"),
        AIMessage("", tool_calls=[call]),
        ToolMessage("6*7 = 42", name="calculator", tool_call_id="c1"),
    ]
    out = fold(history)
    assert [type(m).__name__ for m in out] == ["HumanMessage", "AIMessage", "HumanMessage"]
    assert out[-1].content == "What is 6*7?\n\nTool result: calculator: 6*7 = 42"
    out = fold(history, final_note="Use it.")
    assert out[-1].content == "What is 6*7?\n\nTool result: calculator: 6*7 = 42\nUse it."
    # a turn interrupted before its answer (e.g. a crash) leaves two user messages: they merge
    out = fold([HumanMessage("one"), HumanMessage("two"), AIMessage("ok")])
    assert [m.content for m in out] == ["one\n\ntwo", "ok"]


class FakeStream:
    def __init__(self, events):
        self.events, self.closed = events, False
        self.model, self.backend = type("M", (), {"id": "smol"})(), "fake"

    async def __aiter__(self):
        for ev in self.events:
            yield ev

    async def aclose(self):
        self.closed = True


class FakeEngine:
    def __init__(self, events):
        self.events, self.requests, self.streams = events, [], []

    async def open(self, req):
        self.requests.append(req)
        self.streams.append(FakeStream(self.events))
        return self.streams[-1]


async def test_engine_chat_model_streams_the_engine() -> None:
    engine = FakeEngine([Token("Hel"), Token("lo"), Finish("stop", Usage(12, 2, 4))])
    model = EngineChatModel(engine=engine, model="smol", params=SamplingParams(temperature=0), user="u")
    chunks = [c async for c in model.astream([SystemMessage("Be nice."), HumanMessage("Hi")])]
    assert "".join(str(c.content) for c in chunks) == "Hello"
    req = engine.requests[0]
    assert req.model == "smol" and req.user == "u" and req.params.temperature == 0
    assert [(m.role, m.content) for m in req.messages] == [("system", "Be nice."), ("user", "Hi")]
    assert req.tools == [] and req.tool_choice == ToolChoice("auto")
    assert engine.streams[0].closed

    reply = await model.ainvoke([HumanMessage("Hi")])
    assert reply.content == "Hello" and reply.response_metadata["finish_reason"] == "stop"
    assert reply.usage_metadata["input_tokens"] == 12 and reply.usage_metadata["output_tokens"] == 2

    engine.events = [Token("x"), Error(503, "worker crashed", code="worker_crashed")]
    with pytest.raises(EngineError) as e:
        await model.ainvoke([HumanMessage("Hi")])
    assert e.value.error.code == "worker_crashed" and engine.streams[-1].closed


async def test_engine_chat_model_binds_tools_and_returns_calls() -> None:
    @tool
    def weather(city: str, days: int = 1) -> str:
        """The weather forecast for a city."""
        return "sunny"

    engine = FakeEngine(
        [
            ToolCallDelta(0, id="call_a", name="weather"),
            ToolCallDelta(0, '{"city": '),
            ToolCallDelta(0, '"Oslo"}'),
            ToolCallDelta(1, id="call_b", name="calculator"),
            ToolCallDelta(1, '{"expression": "1+1"}'),
            Finish("tool_calls", Usage(30, 9)),
        ]
    )
    model = EngineChatModel(engine=engine, model="smol")
    bound = model.bind_tools([weather, calculator], tool_choice="required")
    reply = await bound.ainvoke([HumanMessage("Weather in Oslo, and 1+1?")])
    assert reply.tool_calls == [
        {"name": "weather", "args": {"city": "Oslo"}, "id": "call_a", "type": "tool_call"},
        {"name": "calculator", "args": {"expression": "1+1"}, "id": "call_b", "type": "tool_call"},
    ]
    assert reply.content == "" and reply.response_metadata["finish_reason"] == "tool_calls"
    req = engine.requests[0]
    assert req.tool_choice == ToolChoice("required")
    w = req.tools[0]
    assert (w.name, w.description) == ("weather", "The weather forecast for a city.")
    assert w.parameters["required"] == ["city"] and w.parameters["properties"]["days"]["type"] == "integer"
    # streamed: the chunks carry the pieces, and join into the same calls
    chunks = [c async for c in bound.astream([HumanMessage("again")])]
    joined = chunks[0]
    for c in chunks[1:]:
        joined += c
    assert joined.tool_calls == reply.tool_calls

    # memory tools take the run's context from LangGraph: the model sees only their own arguments
    engine.events = [Token("ok"), Finish("stop", Usage(1, 1))]
    choice = {"type": "function", "function": {"name": "calculator"}}
    await model.bind_tools(all_tools(memory=object()), tool_choice=choice).ainvoke([HumanMessage("hi")])
    req = engine.requests[-1]
    assert [t.name for t in req.tools] == ["calculator", "current_datetime", "search_memory", "save_memory"]
    assert req.tools[2].parameters["properties"].keys() == {"query"}
    assert req.tools[3].parameters["required"] == ["fact"]
    assert req.tool_choice == ToolChoice("function", "calculator")
    assert [t.name for t in model.bind_tools([Tool("respond")]).kwargs["tools"]] == ["respond"]


def test_tool_choice_spellings() -> None:
    assert to_tool_choice(None) == to_tool_choice("auto") == ToolChoice("auto")
    assert to_tool_choice("any") == to_tool_choice("required") == to_tool_choice(True) == ToolChoice("required")
    assert to_tool_choice("none") == ToolChoice("none")
    assert to_tool_choice("calculator") == ToolChoice("function", "calculator")
    with pytest.raises(ValueError):
        to_tool_choice({"type": "function"})


def test_history_keeps_tool_traffic_for_the_backend() -> None:
    call = {"name": "calculator", "args": {"expression": "6*7"}, "id": "c1", "type": "tool_call"}
    msgs = to_engine_messages(
        [
            HumanMessage("What is 6*7?"),
            AIMessage("", tool_calls=[call]),
            ToolMessage("6*7 = 42", name="calculator", tool_call_id="c1"),
            AIMessage("42."),
        ]
    )
    assert [m.role for m in msgs] == ["user", "assistant", "tool", "assistant"]
    assert msgs[1].tool_calls == [ToolCall("c1", "calculator", json.dumps({"expression": "6*7"}))]
    assert (msgs[2].tool_call_id, msgs[2].name, msgs[2].content) == ("c1", "calculator", "6*7 = 42")
    assert msgs[3].tool_calls is None


def test_own_words_are_endings_that_fit_a_fact() -> None:
    import re

    from appliance.agent.choice import FACT_CHARS, own_words
    from appliance.agent.tools import Fact

    pattern = Fact.__metadata__[0].metadata[0].pattern  # type: ignore[attr-defined]
    facts = own_words('Hi. Please remember that my dog is "Biscuit" \\o/. Thanks!')
    assert facts == [
        "Please remember that my dog is Biscuit o/.",
        "remember that my dog is Biscuit o/.",
        "that my dog is Biscuit o/.",
        "my dog is Biscuit o/.",
        "dog is Biscuit o/.",
        "Thanks.",  # a sentence shorter than MIN_WORDS is offered whole
    ]
    long = own_words("I like " + "very " * 300 + "long walks.")
    assert long and all(len(f) <= FACT_CHARS for f in long)
    assert all(re.fullmatch(pattern, f) for f in facts + long)
    assert own_words("Hi!") == [] and own_words("") == []
