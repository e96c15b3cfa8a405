"""Tool calling and structured outputs end to end: the embedded SmolLM2 over real HTTP, driven by the real
clients (`openai` SDK, LangChain's ChatOpenAI, the `ollama` client). The grammar makes a 135M model's calls
valid; temperature 0 makes them repeatable."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a timezone",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 24}}},
        },
    },
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class GetWeather(BaseModel):
    """Weather in a city."""

    city: str = Field(max_length=24)
    unit: str = Field(max_length=12)


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=300, max_retries=0)


def test_forced_calls_validate_against_their_schema(appliance_server) -> None:
    assert httpx.get(f"{appliance_server.base_url}/v1/models/default").json()["tool_format"] == "generic"
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        body = {"model": "default", "messages": ASK, "tools": TOOLS, "tool_choice": choice, "temperature": 0}
        r = httpx.post(f"{appliance_server.base_url}/v1/chat/completions", json={**body, "max_tokens": 80}, timeout=300)
        assert r.status_code == 200, r.text
        choice_out = r.json()["choices"][0]
        assert choice_out["finish_reason"] == "tool_calls", choice_out
        (call,) = choice_out["message"]["tool_calls"]
        assert call["id"].startswith("call_") and call["type"] == "function"
        schema = WEATHER if call["function"]["name"] == "get_weather" else TOOLS[1]["function"]["parameters"]
        if choice is named:
            assert call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), schema)


def test_streamed_call_is_the_non_stream_call(appliance_server) -> None:
    client = sdk(appliance_server)
    args = dict(
        model="default",
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=80,
    )
    whole = client.chat.completions.create(**args)  # type: ignore[call-overload]
    with client.chat.completions.stream(**args) as s:  # type: ignore[arg-type]
        done = [ev for ev in s if ev.type == "tool_calls.function.arguments.done"]
        streamed = s.get_final_completion()
    (a,) = whole.choices[0].message.tool_calls or []
    (b,) = streamed.choices[0].message.tool_calls or []
    assert (a.function.name, a.function.arguments) == (b.function.name, b.function.arguments)
    assert done[0].arguments == a.function.arguments
    assert streamed.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(a.function.arguments), WEATHER)


def test_history_with_calls_and_results_is_answered(appliance_server) -> None:
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18, "sky": "sunny"}'},
    ]
    r = sdk(appliance_server).chat.completions.create(
        model="default",
        messages=history,
        tools=TOOLS,
        temperature=0,
        max_tokens=24,  # type: ignore[arg-type]
    )
    msg = r.choices[0].message
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert (msg.content or "").strip() or msg.tool_calls  # it answered (text, or another call)


def test_openai_sdk_parse_and_pydantic_tools(appliance_server) -> None:
    client = sdk(appliance_server)
    city = client.chat.completions.parse(
        model="default",
        messages=[{"role": "user", "content": "Name a city in France."}],
        response_format=City,
        temperature=0,
        max_tokens=60,
    )
    assert isinstance(city.choices[0].message.parsed, City)
    called = client.chat.completions.parse(
        model="default",
        messages=ASK,
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice={"type": "function", "function": {"name": "GetWeather"}},
        temperature=0,
        max_tokens=80,
    )
    (call,) = called.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_langchain_bind_tools_and_structured_output(appliance_server) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Weather in a city."""
        return "sunny"

    llm = ChatOpenAI(
        base_url=f"{appliance_server.base_url}/v1", api_key="unused", model="default", temperature=0, max_tokens=80
    )
    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert isinstance(msg.tool_calls[0]["args"]["city"], str)
    city = llm.with_structured_output(City, method="json_schema").invoke("Name a city in France.")
    assert isinstance(city, City)


def test_ollama_client_tools(appliance_server) -> None:
    import ollama

    def add_two_numbers(a: int, b: int) -> int:
        """
        Add two numbers

        Args:
          a: The first integer number
          b: The second integer number
        """
        return a + b

    client = ollama.Client(host=appliance_server.base_url, timeout=300)
    ask = [{"role": "user", "content": "What is 3 plus 4?"}]
    # Ollama has no tool_choice; the appliance takes one in `options` (a 135M model rarely calls on its own)
    opts = {"temperature": 0, "num_predict": 60, "tool_choice": "required"}
    r = client.chat(model="default", messages=ask, tools=[add_two_numbers], options=opts)
    (call,) = r.message.tool_calls or []
    assert call.function.name == "add_two_numbers"
    assert set(call.function.arguments) == {"a", "b"} and all(
        isinstance(v, int) for v in call.function.arguments.values()
    )
    result = add_two_numbers(**call.function.arguments)
    follow = [*ask, r.message, {"role": "tool", "content": str(result), "tool_name": "add_two_numbers"}]
    answer = client.chat(
        model="default", messages=follow, tools=[add_two_numbers], options={"temperature": 0, "num_predict": 24}
    )
    assert answer.message.content or answer.message.tool_calls
