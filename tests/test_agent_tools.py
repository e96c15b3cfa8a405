"""The agent's pure parts: the safe calculator, intent rules, tool-call parsing, prompt folding."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from appliance.agent.graph import could_be_tool_call, fold, parse_tool_calls
from appliance.agent.intents import detect, find_arithmetic, find_facts
from appliance.agent.runner import AnswerFilter
from appliance.agent.tools import CalculatorError, calculator, safe_eval


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


def test_intents() -> None:
    assert [i.name for i in detect("What is 12 * 7?")] == ["calculator"]
    assert find_arithmetic("what is 3 plus 4 times 2") == "3 + 4 * 2"
    assert find_arithmetic("I have 2 cats and 3 dogs") is None
    assert find_arithmetic("we met on 2024-01-05") is None
    assert [i.name for i in detect("What time is it?")] == ["current_datetime"]
    assert [i.name for i in detect("what's today's date")] == ["current_datetime"]
    assert find_facts("My name is Alice and I like green tea.") == [
        "The user's name is Alice.",
        "The user likes green tea.",
    ]
    assert find_facts("Remember that my birthday is May 3") == ["The user's birthday is May 3."]
    assert find_facts("Do I like tea?") == []
    assert find_facts("What is my name?") == []
    recall = detect("What is my name?")
    assert [(i.name, i.args) for i in recall] == [("search_memory", {"query": "the user's name"})]
    assert detect("What is my name?", memory=False) == []
    assert detect("Tell me a story about a fox.") == []


def test_parse_tool_calls_only_known_tools_at_the_start() -> None:
    names = ["calculator", "current_datetime"]
    calls = parse_tool_calls('<tool_call>{"name": "calculator", "arguments": {"expression": "2+2"}}</tool_call>', names)
    assert [(c["name"], c["args"]) for c in calls] == [("calculator", {"expression": "2+2"})]
    calls = parse_tool_calls(' {"name": "current_datetime", "arguments": "{}"}', names)
    assert [c["name"] for c in calls] == ["current_datetime"]
    assert parse_tool_calls('{"name": "rm_rf", "arguments": {}}', names) == []
    assert parse_tool_calls("Sure! 2+2 is 4.", names) == []
    assert parse_tool_calls("{not json", names) == []


def test_answer_filter_holds_back_tool_calls() -> None:
    f = AnswerFilter()
    assert f.feed("  ") == ""
    assert f.feed("Hel") == "  Hel"
    assert f.feed("lo") == "lo"
    assert f.end(False) == ""
    f = AnswerFilter()
    assert f.feed("<tool") == "" and f.feed('_call>{"name"') == ""
    assert f.end(True) == ""
    f = AnswerFilter()
    assert f.feed("{") == ""
    assert f.end(False) == "{"  # not a tool call after all: released at the end
    assert could_be_tool_call("<to") and not could_be_tool_call("<b>")


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
    assert "What is 6*7?" in out[-1].content and "calculator: 6*7 = 42" in out[-1].content
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
    from langchain_core.messages import SystemMessage

    from appliance.agent.chat_model import EngineChatModel
    from appliance.engine.types import EngineError, Error, Finish, SamplingParams, Token, Usage

    engine = FakeEngine([Token("Hel"), Token("lo"), Finish("stop", Usage(12, 2, 4))])
    model = EngineChatModel(engine=engine, model="smol", params=SamplingParams(temperature=0), user="u")
    chunks = [c async for c in model.astream([SystemMessage("Be nice."), HumanMessage("Hi")])]
    assert "".join(str(c.content) for c in chunks) == "Hello"
    req = engine.requests[0]
    assert req.model == "smol" and req.user == "u" and req.params.temperature == 0
    assert [(m.role, m.content) for m in req.messages] == [("system", "Be nice."), ("user", "Hi")]
    assert engine.streams[0].closed

    reply = await model.ainvoke([HumanMessage("Hi")])
    assert reply.content == "Hello" and reply.response_metadata["finish_reason"] == "stop"
    assert reply.usage_metadata["input_tokens"] == 12 and reply.usage_metadata["output_tokens"] == 2

    engine.events = [Token("x"), Error(503, "worker crashed", code="worker_crashed")]
    with pytest.raises(EngineError) as e:
        await model.ainvoke([HumanMessage("Hi")])
    assert e.value.error.code == "worker_crashed" and engine.streams[-1].closed
