"""The Responses API (POST /v1/responses, GET/DELETE /v1/responses/{id}).

Fast tier: create_app() with a scripted backend through httpx.ASGITransport — shapes checked against
OpenAI's own spec, the stream's event sequence, tool calls, input items, stored responses per key, and the
real `openai` SDK (`responses.create`, `.stream`, `.parse`) over the same transport. Slow tier: the embedded
model over real HTTP with the `openai` SDK and the OpenAI Agents SDK.
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from appliance.app import create_app
from appliance.cli import main
from appliance.config import Settings
from appliance.engine.types import EngineError, Error, Event, Finish, Token, ToolCallDelta, Usage
from tests.fakes import FakeEmbedder, Scripted

TEXT: list[Event] = [Token("Hel"), Token("lo"), Finish("stop", Usage(5, 2, 1))]
CALL: list[Event] = [
    ToolCallDelta(0, id="call_abc", name="get_weather"),
    ToolCallDelta(0, '{"city": '),
    ToolCallDelta(0, '"Paris"}'),
    Finish("tool_calls", Usage(9, 6)),
]
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


class Scripts(Scripted):
    """Plays one script per call (the last one again when they run out)."""

    def __init__(self, *scripts: list[Event] | EngineError):
        super().__init__(scripts[0])
        self.scripts = list(scripts)

    async def generate(self, req):
        self.script = self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]
        async for ev in super().generate(req):
            yield ev


@contextlib.asynccontextmanager
async def client(tmp_path, *scripts: list[Event] | EngineError, **settings: Any):
    backend = Scripts(*(scripts or (TEXT,)))
    s = Settings(
        data_dir=tmp_path, agent_enabled=False, embeddings_preload=False, keys_file=tmp_path / "keys.toml", **settings
    )
    app = create_app(s, backend_factories={"llamacpp": lambda model_id, spec: backend}, embeddings=FakeEmbedder())
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://x") as c:
        c.backend = backend  # type: ignore[attr-defined]
        yield c


def events(text: str) -> list[dict]:
    """`event: <type>` / `data: {json}` pairs; the names must match the payloads' `type`."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(ln.split(": ", 1) for ln in block.splitlines())
        doc = json.loads(lines["data"])
        assert lines["event"] == doc["type"]
        out.append(doc)
    return out


SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "error": "ResponseErrorEvent",
}


def check_events(openai_schema, evs: list[dict]) -> None:
    """Each event against its own schema in OpenAI's spec (the union's errors say nothing useful)."""
    for ev in evs:
        openai_schema(SCHEMAS[ev["type"]], ev)


def add_key(keys_file, name: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        assert main(["keys", "add", name, "--keys-file", str(keys_file), "--role", "user"]) == 0
    return buf.getvalue().strip()


# -- fast: shapes and translations -------------------------------------------------------------------


async def test_text_response_shape(tmp_path, openai_schema) -> None:
    async with client(tmp_path) as c:
        r = await c.post("/v1/responses", json={"model": "default", "input": "hi", "instructions": "Be brief."})
    assert r.status_code == 200, r.text
    doc = r.json()
    openai_schema("Response", doc)
    assert doc["id"].startswith("resp_") and doc["object"] == "response" and doc["status"] == "completed"
    [msg] = doc["output"]
    assert msg["type"] == "message" and msg["role"] == "assistant" and msg["status"] == "completed"
    assert msg["content"] == [{"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}]
    assert doc["usage"]["input_tokens"] == 5 and doc["usage"]["output_tokens"] == 2
    assert doc["usage"]["total_tokens"] == 7 and doc["usage"]["input_tokens_details"]["cached_tokens"] == 1
    assert doc["instructions"] == "Be brief." and doc["store"] is True
    [req] = c.backend.seen
    assert [(m.role, m.content) for m in req.messages] == [("system", "Be brief."), ("user", "hi")]


async def test_stream_event_sequence(tmp_path, openai_schema) -> None:
    async with client(tmp_path) as c:
        r = await c.post("/v1/responses", json={"model": "default", "input": "hi", "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in r.text
    evs = events(r.text)
    check_events(openai_schema, evs)
    assert [e["type"] for e in evs] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    assert evs[2]["item"]["content"] == [] and evs[3]["part"]["text"] == ""  # sent before the text grew
    assert [e["delta"] for e in evs if e["type"].endswith(".delta")] == ["Hel", "lo"]
    assert evs[6]["text"] == "Hello"
    done = evs[-1]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == "Hello"
    assert done["usage"]["output_tokens"] == 2 and done["id"] == evs[0]["response"]["id"]


async def test_function_call_output_and_events(tmp_path, openai_schema) -> None:
    body = {"model": "default", "input": "weather?", "tools": [TOOL], "tool_choice": "required"}
    async with client(tmp_path, CALL, CALL) as c:
        r = await c.post("/v1/responses", json=body)
        s = await c.post("/v1/responses", json={**body, "stream": True})
    doc = r.json()
    openai_schema("Response", doc)
    [call] = doc["output"]
    assert call["type"] == "function_call" and call["call_id"] == "call_abc" and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Paris"} and call["id"].startswith("fc_")
    assert doc["tools"][0]["name"] == "get_weather" and doc["tool_choice"] == "required"
    req = c.backend.seen[0]
    assert req.tool_choice.mode == "required" and req.tools[0].parameters == TOOL["parameters"]
    evs = events(s.text)
    check_events(openai_schema, evs)
    kinds = [e["type"] for e in evs]
    assert kinds[2:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert evs[2]["item"]["arguments"] == "" and evs[-3]["arguments"] == '{"city": "Paris"}'


async def test_input_items_become_tool_turns(tmp_path) -> None:
    items = [
        {"role": "user", "content": "weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "and "}, {"type": "input_text", "text": "so?"}],
        },
    ]
    async with client(tmp_path) as c:
        r = await c.post("/v1/responses", json={"model": "default", "input": items, "tools": [TOOL]})
    assert r.status_code == 200, r.text
    msgs = c.backend.seen[0].messages
    assert [m.role for m in msgs] == ["user", "assistant", "tool", "user"]
    assert msgs[1].tool_calls[0].name == "get_weather" and msgs[1].tool_calls[0].id == "call_1"
    assert (msgs[2].content, msgs[2].tool_call_id, msgs[2].name) == ("sunny", "call_1", "get_weather")
    assert msgs[3].content == "and so?"


async def test_text_format_and_sampling(tmp_path) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    body = {
        "model": "default",
        "input": "n?",
        "text": {"format": {"type": "json_schema", "name": "N", "schema": schema, "strict": True}},
        "max_output_tokens": 20,
        "temperature": 0.2,
        "top_p": 0.5,
    }
    async with client(tmp_path) as c:
        r = await c.post("/v1/responses", json=body)
    assert r.json()["text"]["format"]["name"] == "N"
    p = c.backend.seen[0].params
    assert (p.output.kind, p.output.schema, p.max_tokens, p.temperature, p.top_p) == (
        "json_schema",
        schema,
        20,
        0.2,
        0.5,
    )


async def test_length_is_incomplete(tmp_path, openai_schema) -> None:
    async with client(tmp_path, [Token("Hi"), Finish("length", Usage(3, 1))]) as c:
        r = await c.post("/v1/responses", json={"input": "hi", "max_output_tokens": 1})
        s = await c.post("/v1/responses", json={"input": "hi", "max_output_tokens": 1, "stream": True})
    doc = r.json()
    openai_schema("Response", doc)
    assert doc["status"] == "incomplete" and doc["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events(s.text)[-1]["type"] == "response.incomplete"


async def test_mid_stream_error(tmp_path, openai_schema) -> None:
    script = [Token("Hel"), Error(503, "died", "server_error", "worker_crashed")]
    async with client(tmp_path, script) as c:
        s = await c.post("/v1/responses", json={"input": "hi", "stream": True})
        r = await c.post("/v1/responses", json={"input": "hi"})
    evs = events(s.text)
    check_events(openai_schema, evs)
    assert [e["type"] for e in evs[-2:]] == ["error", "response.failed"]
    assert evs[-1]["response"]["error"] == {"code": "server_error", "message": "died"}
    assert r.status_code == 503 and r.json()["error"]["code"] == "worker_crashed"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "x", "tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input"),
        ({"model": "default"}, "input"),
        ({"input": "x", "temperature": 3}, "temperature"),
    ],
)
async def test_bad_requests_name_the_param(tmp_path, body, param) -> None:
    async with client(tmp_path) as c:
        r = await c.post("/v1/responses", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# -- fast: stored responses -----------------------------------------------------------------------------


async def test_store_chain_get_delete(tmp_path) -> None:
    async with client(tmp_path, TEXT, [Token("Paris"), Finish("stop", Usage(9, 1))]) as c:
        first = (await c.post("/v1/responses", json={"input": "My city is Paris.", "instructions": "I1"})).json()
        second = await c.post(
            "/v1/responses", json={"input": "Which city?", "previous_response_id": first["id"], "stream": True}
        )
        last = events(second.text)[-1]["response"]
        got = await c.get(f"/v1/responses/{first['id']}")
        gone = await c.delete(f"/v1/responses/{first['id']}")
        again = await c.get(f"/v1/responses/{first['id']}")
        chain = await c.post("/v1/responses", json={"input": "x", "previous_response_id": first["id"]})
        unstored = (await c.post("/v1/responses", json={"input": "x", "store": False})).json()
        missing = await c.get(f"/v1/responses/{unstored['id']}")
    msgs = c.backend.seen[1].messages  # instructions are not carried over, the conversation is
    assert [(m.role, m.content) for m in msgs] == [
        ("user", "My city is Paris."),
        ("assistant", "Hello"),
        ("user", "Which city?"),
    ]
    assert last["previous_response_id"] == first["id"]
    assert got.status_code == 200 and got.json() == first
    assert gone.json() == {"id": first["id"], "object": "response", "deleted": True}
    assert again.status_code == 404 and again.json()["error"]["code"] == "response_not_found"
    assert chain.status_code == 404 and chain.json()["error"]["param"] == "previous_response_id"
    assert missing.status_code == 404


async def test_chained_tool_call_keeps_the_call(tmp_path) -> None:
    async with client(tmp_path, CALL, TEXT) as c:
        first = (await c.post("/v1/responses", json={"input": "weather?", "tools": [TOOL]})).json()
        out = {"type": "function_call_output", "call_id": "call_abc", "output": "sunny"}
        r = await c.post("/v1/responses", json={"input": [out], "previous_response_id": first["id"], "tools": [TOOL]})
    assert r.status_code == 200, r.text
    msgs = c.backend.seen[1].messages
    assert [m.role for m in msgs] == ["user", "assistant", "tool"]
    assert msgs[1].tool_calls[0].arguments == '{"city": "Paris"}' and msgs[2].name == "get_weather"


async def test_stored_responses_are_per_key_and_bounded(tmp_path) -> None:
    keys = tmp_path / "keys.toml"
    a, b = add_key(keys, "alice"), add_key(keys, "bob")
    async with client(tmp_path, max_responses_per_key=2) as c:
        ha, hb = {"Authorization": f"Bearer {a}"}, {"Authorization": f"Bearer {b}"}
        ids = [(await c.post("/v1/responses", json={"input": str(i)}, headers=ha)).json()["id"] for i in range(3)]
        theirs = await c.get(f"/v1/responses/{ids[2]}", headers=hb)
        their_delete = await c.delete(f"/v1/responses/{ids[2]}", headers=hb)
        their_chain = await c.post("/v1/responses", json={"input": "x", "previous_response_id": ids[2]}, headers=hb)
        mine = [(await c.get(f"/v1/responses/{i}", headers=ha)).status_code for i in ids]
    assert theirs.status_code == 404 and their_delete.status_code == 404 and their_chain.status_code == 404
    assert mine == [404, 200, 200]  # the oldest went when the third was stored


async def test_input_items_list_the_request_input(tmp_path, openai_schema) -> None:
    """GET /v1/responses/{id}/input_items: this request's input (not the chained context) as OpenAI's items,
    paged with limit/after in either order; the same ids on every read; another key's response is 404."""
    keys = tmp_path / "keys.toml"
    a, b = add_key(keys, "alice"), add_key(keys, "bob")
    ha, hb = {"Authorization": f"Bearer {a}"}, {"Authorization": f"Bearer {b}"}
    async with client(tmp_path, CALL, TEXT) as c:
        first = (await c.post("/v1/responses", json={"input": "weather?", "tools": [TOOL]}, headers=ha)).json()
        items_in = [
            {"role": "user", "content": "and in Rome?"},
            {"type": "function_call", "call_id": "call_r", "name": "get_weather", "arguments": '{"city": "Rome"}'},
            {"type": "function_call_output", "call_id": "call_r", "output": "rain"},
        ]
        body = {"input": items_in, "previous_response_id": first["id"], "tools": [TOOL], "instructions": "be brief"}
        second = (await c.post("/v1/responses", json=body, headers=ha)).json()
        url = f"/v1/responses/{second['id']}/input_items"
        asc = (await c.get(url, params={"order": "asc"}, headers=ha)).json()
        desc = (await c.get(url, headers=ha)).json()
        page1 = (await c.get(url, params={"order": "asc", "limit": 2}, headers=ha)).json()
        page2 = (await c.get(url, params={"order": "asc", "after": page1["last_id"]}, headers=ha)).json()
        theirs = await c.get(url, headers=hb)
        bad = await c.get(url, params={"limit": 0}, headers=ha)
        oc = openai.AsyncOpenAI(base_url="http://x/v1", api_key=a, http_client=c, max_retries=0)
        sdk_items = [item async for item in oc.responses.input_items.list(second["id"], order="asc")]
    openai_schema("ResponseItemList", asc)
    assert [i["type"] for i in asc["data"]] == ["message", "function_call", "function_call_output"]
    assert asc["data"][0]["content"] == [{"type": "input_text", "text": "and in Rome?"}]
    assert asc["data"][1]["call_id"] == "call_r" and asc["data"][2]["output"] == "rain"
    assert desc["data"] == asc["data"][::-1] and not asc["has_more"]
    assert [i["id"] for i in page1["data"] + page2["data"]] == [i["id"] for i in asc["data"]]
    assert page1["has_more"] and not page2["has_more"]
    assert [i.id for i in sdk_items] == [i["id"] for i in asc["data"]]
    assert theirs.status_code == 404 and bad.status_code == 400 and bad.json()["error"]["param"] == "limit"


# -- fast: the openai SDK over the same app ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def sdk(tmp_path, *scripts):
    async with client(tmp_path, *scripts) as c:
        oc = openai.AsyncOpenAI(base_url="http://x/v1", api_key="none", http_client=c, max_retries=0)
        oc.backend = c.backend  # type: ignore[attr-defined]
        yield oc


class City(BaseModel):
    name: str
    population: int


async def test_sdk_create_stream_parse(tmp_path) -> None:
    parsed = [Token('{"name": "Paris", '), Token('"population": 2100000}'), Finish("stop", Usage(4, 2))]
    async with sdk(tmp_path, TEXT, TEXT, parsed, CALL) as oc:
        r = await oc.responses.create(model="default", input="hi")
        async with oc.responses.stream(model="default", input="hi") as stream:
            kinds = [ev.type async for ev in stream]
            final = await stream.get_final_response()
        p = await oc.responses.parse(model="default", input="a city", text_format=City)
        t = await oc.responses.create(model="default", input="weather?", tools=[TOOL], tool_choice="required")
        fmt = oc.backend.seen[2].params.output
    assert r.output_text == "Hello" and r.usage.total_tokens == 7
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and final.output_text == "Hello"
    assert p.output_parsed == City(name="Paris", population=2100000)
    assert fmt.kind == "json_schema" and fmt.schema["required"] == ["name", "population"]
    [call] = t.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}


# -- slow: the embedded model over real HTTP --------------------------------------------------------------


class Pick(BaseModel):
    """Bounded fields, so that a 135M model's answer is complete and parses."""

    city: Literal["Paris", "London", "Rome"]
    capital: bool


WORD = {
    "format": {
        "type": "json_schema",
        "name": "Word",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"word": {"type": "string", "enum": ["hello", "goodbye"]}},
            "required": ["word"],
            "additionalProperties": False,
        },
    }
}


@pytest.mark.slow
def test_real_model_sdk(appliance_server) -> None:
    oc = openai.OpenAI(base_url=f"{appliance_server.base_url}/v1", api_key="none")
    r = oc.responses.create(model="default", input="Say hello.", max_output_tokens=16, temperature=0)
    assert r.status in ("completed", "incomplete") and r.output_text.strip() and r.usage.output_tokens > 0
    with oc.responses.stream(model="default", input="Say hello.", text=WORD, max_output_tokens=32) as s:
        deltas = [ev.delta for ev in s if ev.type == "response.output_text.delta"]
        final = s.get_final_response()
    assert "".join(deltas) == final.output_text and json.loads(final.output_text)["word"] in ("hello", "goodbye")
    p = oc.responses.parse(
        model="default",
        input="Which city is the capital of France?",
        text_format=Pick,
        max_output_tokens=64,
        temperature=0,
    )
    assert p.status == "completed" and isinstance(p.output_parsed, Pick)
    chained = oc.responses.create(
        model="default", input="Repeat that.", previous_response_id=r.id, max_output_tokens=16, temperature=0
    )
    assert chained.previous_response_id == r.id and chained.usage.input_tokens > r.usage.input_tokens
    assert oc.responses.retrieve(r.id).output_text == r.output_text
    oc.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        oc.responses.retrieve(r.id)


@pytest.mark.slow
def test_real_model_forced_tool_call(appliance_server) -> None:
    oc = openai.OpenAI(base_url=f"{appliance_server.base_url}/v1", api_key="none")
    r = oc.responses.create(
        model="default",
        input="What is the weather in Paris?",
        tools=[TOOL],
        tool_choice="required",
        max_output_tokens=64,
        temperature=0,
    )
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and isinstance(json.loads(calls[0].arguments)["city"], str)
    with oc.responses.stream(
        model="default",
        input="Weather in Paris?",
        tools=[TOOL],
        tool_choice="required",
        max_output_tokens=64,
        temperature=0,
    ) as s:
        deltas = "".join(ev.delta for ev in s if ev.type == "response.function_call_arguments.delta")
        final = s.get_final_response()
    assert deltas == next(o for o in final.output if o.type == "function_call").arguments


@pytest.mark.slow
async def test_agents_sdk_one_tool_run(appliance_server) -> None:
    agents = pytest.importorskip("agents")
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"It is sunny in {city}."

    agents.set_default_openai_client(
        openai.AsyncOpenAI(base_url=f"{appliance_server.base_url}/v1", api_key="none"), use_for_tracing=False
    )
    agents.set_default_openai_api("responses")
    agents.set_tracing_disabled(True)
    agent = agents.Agent(
        name="weather",
        instructions="Answer with the tool's result.",
        model="default",
        tools=[get_weather],
        model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=64),
        tool_use_behavior="stop_on_first_tool",
    )
    result = await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=3)
    assert seen and "sunny" in str(result.final_output)
