"""Tool calling without a model: call parsers, template detection and rendering, the tool grammar, the wire
translations (OpenAI and Ollama, stream and whole) and request validation, through create_app() with a
scripted backend."""

from __future__ import annotations

import codecs
import json
import re

import openai
import pytest

from appliance.api.protocol import ollama as ollama_wire
from appliance.api.protocol import openai as openai_wire
from appliance.backends.llamacpp.backend import LogprobSpans
from appliance.backends.llamacpp.chat_format import ChatFormatter
from appliance.backends.llamacpp.grammar import UnsupportedSchema, tool_gbnf
from appliance.backends.llamacpp.tool_calls import (
    ToolCallParser,
    chat_input,
    detect_format,
    markup_texts,
    template_messages,
)
from appliance.engine.types import (
    Finish,
    Message,
    Token,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    Usage,
    assemble_tool_calls,
)
from tests.fakes import app_client
from tests.tool_templates import LLAMA31, QWEN25

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WEATHER = Tool(
    "get_weather",
    "Weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
HERMES_TWO = (
    'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris}"}}\n</tool_call>\n'
    '<tool_call>\n{"arguments": {"a": [1, {"b": 2}]}, "name": "f"}\n</tool_call>\n'
)


def parse(fmt: str, text: str, step: int) -> list[Token | ToolCallDelta]:
    ids = iter(f"call_{i}" for i in range(100))
    p = ToolCallParser(fmt, new_id=lambda: next(ids))
    out: list[Token | ToolCallDelta] = []
    for i in range(0, len(text), step):
        out += p.feed(text[i : i + step])
    return out + p.close()


def text_of(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, Token))


def calls_of(events: list) -> list[ToolCall]:
    return assemble_tool_calls([e for e in events if isinstance(e, ToolCallDelta)])


# -- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_hermes_calls_parse_the_same_however_the_text_is_chunked(step: int) -> None:
    events = parse("generic", HERMES_TWO, step)
    assert text_of(events) == "Sure."
    calls = calls_of(events)
    assert [(c.id, c.name) for c in calls] == [("call_0", "get_weather"), ("call_1", "f")]
    assert json.loads(calls[0].arguments) == {"city": 'Pa"ris}'}
    assert calls[0].arguments == '{"city": "Pa\\"ris}"}'  # exactly as generated, whatever the chunking
    assert json.loads(calls[1].arguments) == {"a": [1, {"b": 2}]}  # other key order: parsed whole
    # order: each call's first fragment carries id and name (and no arguments), the rest argument pieces
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    assert deltas[0].id == "call_0" and deltas[0].name == "get_weather" and deltas[0].arguments == ""
    assert all(d.id is None and d.name is None for d in deltas[1:] if d.index == 0)


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_plain_text_passes_and_held_prefixes_are_released(step: int) -> None:
    for text in ("Hello <b>world</b>", "a < b and <tool", "trailing space  \n", "<tool_call>not json</tool_call> ok"):
        events = parse("generic", text, step)
        assert not calls_of(events)
        assert text_of(events) == text


def test_text_is_streamed_before_the_end() -> None:
    p = ToolCallParser("generic")
    assert text_of(p.feed("Hello there")) == "Hello there"
    assert text_of(p.feed(" <tool")) == ""  # may be a call: held
    assert text_of(p.feed("box>")) == " <toolbox>"


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_llama3_json_reply(step: int) -> None:
    events = parse("native-llama3", ' {"name": "get_weather", "parameters": {"city": "Oslo"}}', step)
    assert text_of(events) == ""
    (call,) = calls_of(events)
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    assert text_of(parse("native-llama3", "The answer is {4}.", step)) == "The answer is {4}."
    assert text_of(parse("native-llama3", '{"answer": 4}', step)) == '{"answer": 4}'  # JSON, but no call


# -- logprobs through the parser -----------------------------------------------------------------


def parse_lps(fmt: str, tokens: list[str | bytes], lag: bool = False) -> list[Token | ToolCallDelta]:
    """Feed `tokens` as the worker sends them: each token's text with its logprob entry (logprob -i for
    token i; a token that is part of a character as OpenAI's `bytes:` form), through the backend's span
    tracking. `lag`: each entry comes one event after its text (a tail the worker's stop filter held)."""
    spans = LogprobSpans()
    p = ToolCallParser(fmt, new_id=lambda: "call_0", logprobs=spans.take)
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    events: list[tuple[str, list[TokenLogprob]]] = []
    for i, t in enumerate(tokens):
        raw = t if isinstance(t, bytes) else t.encode()
        name = "bytes:" + "".join(f"\\x{c:02x}" for c in raw) if isinstance(t, bytes) else t
        events.append((dec.decode(raw), [TokenLogprob(name, -float(i))]))
    if lag:
        events = [(text, events[i - 1][1] if i else []) for i, (text, _) in enumerate(events)] + [("", events[-1][1])]
    out: list[Token | ToolCallDelta] = []
    for text, entries in events:
        spans.add(entries)
        if late := spans.late():
            out.append(Token("", late))
        out += p.feed(text)
    return out + p.close()


def joined(events: list) -> str:
    """The content's tokens joined back into text (split characters reassembled from their bytes)."""
    raw = b"".join(
        bytes(int(h, 16) for h in re.findall(r"\\x([0-9a-f]{2})", e.token))
        if e.token.startswith("bytes:")
        else e.token.encode()
        for ev in events
        if isinstance(ev, Token)
        for e in ev.logprobs or ()
    )
    return raw.decode()


@pytest.mark.parametrize("lag", [False, True])
def test_content_around_a_call_keeps_its_tokens_logprobs(lag: bool) -> None:
    tokens: list[str | bytes] = ["Sure", ".", "\n<", "tool", "_call", ">\n", '{"name": "f", ', '"arguments": ']
    tokens += ['{"a": 1}}', "\n</tool_call>", "\n", "Done", " ", b"\xe2\x82", b"\xac", "!"]
    events = parse_lps("generic", tokens, lag)
    assert text_of(events) == "Sure.\nDone €!" and calls_of(events)[0].arguments == '{"a": 1}'
    assert joined(events) == text_of(events)  # the call's tokens (and the dropped "\n<") have none
    got = [e.logprob for ev in events if isinstance(ev, Token) for e in ev.logprobs or ()]
    assert got == [-0.0, -1.0, -10.0, -11.0, -12.0, -13.0, -14.0, -15.0]  # each once, in order
    if not lag:  # every entry rides with the text it came from
        assert not any(ev.logprobs for ev in events if isinstance(ev, Token) and not ev.text)


@pytest.mark.parametrize("step", [1, 3, 5])
@pytest.mark.parametrize("lag", [False, True])
def test_plain_text_keeps_every_tokens_logprob(step: int, lag: bool) -> None:
    for text in ("Hello <b>world</b>", "a < b and <tool", "trailing space  \n", "<tool_call>not json</tool_call> ok"):
        tokens: list[str | bytes] = [text[i : i + step] for i in range(0, len(text), step)]
        events = parse_lps("generic", tokens, lag)
        assert text_of(events) == text and joined(events) == text
        got = [e.logprob for ev in events if isinstance(ev, Token) for e in ev.logprobs or ()]
        assert got == [-float(i) for i in range(len(tokens))]
    no_lps = parse("generic", "Sure.", 1)
    assert all(ev.logprobs is None for ev in no_lps)  # none asked for: none attached


# -- templates -----------------------------------------------------------------------------------


def test_format_detection() -> None:
    for template, fmt in ((QWEN25, "native-hermes"), (LLAMA31, "native-llama3"), (SMOLLM2, "generic")):
        assert detect_format(template, ChatFormatter(template, "<s>", "</s>").render) == fmt
    assert detect_format(None, None) == "generic"


HISTORY = [
    Message("user", "Weather in Paris?"),
    Message("assistant", "", tool_calls=[ToolCall("call_1", "get_weather", '{"city": "Paris"}')]),
    Message("tool", "18C and sunny", tool_call_id="call_1", name="get_weather"),
]


def test_native_template_renders_tools_calls_and_results() -> None:
    f = ChatFormatter(QWEN25, "", "<|im_end|>")
    msgs, tools = chat_input(HISTORY, [WEATHER], ToolChoice("auto"), "native-hermes")
    out = f(msgs, tools)
    assert '"name": "get_weather", "description": "Weather in a city"' in out.prompt  # the template's tools
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in out.prompt
    assert "<tool_response>\n18C and sunny\n</tool_response>" in out.prompt
    assert out.parts is not None  # markup and content still told apart (empty assistant content included)
    assert ("18C and sunny", False) in out.parts and ("Weather in Paris?", False) in out.parts
    # tool schemas and calls are rendered as markup: what the worker checks for control-token text
    texts = markup_texts(msgs, tools)
    assert ("tools", json.dumps(tools, ensure_ascii=False)) in texts
    assert any(p == "messages" and "get_weather" in t for p, t in texts)


def test_generic_model_gets_an_instruction_and_plain_turns() -> None:
    msgs, tools = chat_input(HISTORY, [WEATHER], ToolChoice("function", "get_weather"), "generic")
    assert tools is None  # SmolLM2's template would ignore them: they go into the system turn instead
    assert msgs[0]["role"] == "system" and '"name": "get_weather"' in msgs[0]["content"]
    assert "Call the function get_weather now." in msgs[0]["content"]
    assert msgs[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    }
    assert msgs[3] == {"role": "user", "content": "<tool_response>\n18C and sunny\n</tool_response>"}
    assert markup_texts(msgs, tools) == []  # everything the client wrote is content
    prompt = ChatFormatter(SMOLLM2, "", "<|im_end|>")(msgs, tools)
    assert prompt.parts is not None
    assert template_messages([Message("developer", "x")], "generic") == [{"role": "system", "content": "x"}]
    assert template_messages([Message("tool", "r")], "generic") == [{"role": "tool", "content": "r"}]  # no call


# -- grammar -------------------------------------------------------------------------------------


def test_tool_grammar_shapes() -> None:
    other = Tool("f", "", {"type": "object", "properties": {"n": {"type": "integer"}}})
    g = tool_gbnf([WEATHER, other], ToolChoice("required"), True, "generic")
    assert g is not None and "root ::= zz-calls\n" in g + "\n" and "zz-calls ::= zz-one\n" in g + "\n"
    assert '"{\\"name\\": \\"get_weather\\", \\"arguments\\": "' in g and '\\"name\\": \\"f\\"' in g
    named = tool_gbnf([WEATHER, other], ToolChoice("function", "f"), True, "generic")
    assert named is not None and "get_weather" not in named
    auto = tool_gbnf([WEATHER], ToolChoice("auto"), True, "generic")
    assert auto is not None and "root ::= zz-calls | zz-text" in auto
    assert tool_gbnf([WEATHER], ToolChoice("auto"), True, "native-hermes") is None  # the model's own syntax
    assert tool_gbnf([WEATHER], ToolChoice("none"), True, "generic") is None
    hermes = tool_gbnf([WEATHER], ToolChoice("required"), True, "native-hermes")
    assert hermes is not None and "{0,3}" in hermes  # parallel calls where the model is trained for them
    llama = tool_gbnf([WEATHER], ToolChoice("required"), True, "native-llama3")
    assert llama is not None and '\\"parameters\\": ' in llama and "<tool_call>" not in llama


def test_tool_grammar_refuses_what_it_cannot_enforce() -> None:
    bad = Tool("n", "", {"type": "object", "properties": {"x": {"type": "integer", "minimum": 3}}})
    with pytest.raises(UnsupportedSchema) as e:
        tool_gbnf([bad], ToolChoice("required"), True, "generic")
    assert e.value.param == "tools" and "minimum" in str(e.value) and "tools[0]" in str(e.value)


# -- the OpenAI wire -----------------------------------------------------------------------------


def client(tmp_path, script: list | None = None):
    return app_client(tmp_path, script)


CALL = [
    ToolCallDelta(0, "", "call_abc", "get_weather"),
    ToolCallDelta(0, '{"city":'),
    ToolCallDelta(0, ' "Paris"}'),
    Finish("tool_calls", Usage(20, 9)),
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER.parameters}}]
ASK = {"model": "default", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS}


async def test_tool_call_response_and_request(tmp_path, openai_schema) -> None:
    async with client(tmp_path, CALL) as c:
        body = {**ASK, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
        r = await c.post("/v1/chat/completions", json={**body, "parallel_tool_calls": False})
        req = c.backend.seen[0]
    assert r.status_code == 200, r.text
    doc = r.json()
    openai_schema("CreateChatCompletionResponse", doc)
    choice = doc["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]
    assert req.tools == [WEATHER.__class__("get_weather", "", WEATHER.parameters)]
    assert req.tool_choice == ToolChoice("function", "get_weather") and req.parallel_tool_calls is False


async def test_streamed_fragments_reassemble_in_the_sdk(tmp_path, openai_schema) -> None:
    async with client(tmp_path, CALL) as c:
        r = await c.post("/v1/chat/completions", json={**ASK, "stream": True})
        chunks = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
        for ch in chunks:
            openai_schema("CreateChatCompletionStreamResponse", ch)
        frags = [
            ch["choices"][0]["delta"]["tool_calls"][0] for ch in chunks if "tool_calls" in ch["choices"][0]["delta"]
        ]
        assert frags[0] == {
            "index": 0,
            "id": "call_abc",
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        }
        assert frags[1:] == [
            {"index": 0, "function": {"arguments": '{"city":'}},
            {"index": 0, "function": {"arguments": ' "Paris"}'}},
        ]
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

        sdk = openai.AsyncOpenAI(base_url="http://appliance/v1", api_key="x", http_client=c)
        async with sdk.chat.completions.stream(model="default", messages=ASK["messages"], tools=TOOLS) as s:
            done = [ev async for ev in s if ev.type == "tool_calls.function.arguments.done"]
            final = await s.get_final_completion()
    assert done[0].name == "get_weather" and done[0].arguments == '{"city": "Paris"}'
    (call,) = final.choices[0].message.tool_calls
    assert (call.id, call.function.name, call.function.arguments) == ("call_abc", "get_weather", '{"city": "Paris"}')


async def test_history_with_calls_and_results_reaches_the_backend(tmp_path) -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]  # fmt: skip
    async with client(tmp_path) as c:
        r = await c.post("/v1/chat/completions", json={**ASK, "messages": history})
        req = c.backend.seen[0]
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "Hello", "refusal": None}
    assert req.messages[1] == Message("assistant", "", [ToolCall("call_1", "get_weather", '{"city": "Paris"}')])
    assert req.messages[2] == Message("tool", "18C", tool_call_id="call_1", name="get_weather")


BAD_TOOLS = [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required", "tools": []}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tools": "get_weather"}, "tools"),
        ({"tools": TOOLS * 2}, "tools"),  # the same name twice
        ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"x": "y" * 70_000}}}]},
         "tools[0].function.parameters"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
]  # fmt: skip


async def test_bad_tools_are_400_naming_the_param(tmp_path) -> None:
    async with client(tmp_path) as c:
        for change, param in BAD_TOOLS:
            r = await c.post("/v1/chat/completions", json={**ASK, **change})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param, change
        assert c.backend.seen == []


async def test_models_show_the_tool_format(tmp_path) -> None:
    async with client(tmp_path) as c:
        doc = (await c.get("/v1/models/default")).json()
    assert "tool_format" in doc  # Scripted reports no details: null until a llama.cpp worker says


# -- the Ollama wire -----------------------------------------------------------------------------


async def test_ollama_chat_tools(tmp_path) -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ]},
        {"role": "tool", "content": "18C", "tool_name": "get_weather"},
        {"role": "user", "content": "And in Oslo?"},
    ]  # fmt: skip
    async with client(tmp_path, CALL) as c:
        body = {"model": "default", "messages": history, "tools": TOOLS, "stream": False}
        whole = (await c.post("/api/chat", json=body)).json()
        c.backend.script = CALL
        lines = [json.loads(ln) for ln in (await c.post("/api/chat", json={**body, "stream": True})).text.splitlines()]
        req = c.backend.seen[0]
    expected = [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert whole["message"]["tool_calls"] == expected and whole["done_reason"] == "stop"
    assert lines[-2]["message"]["tool_calls"] == expected and not lines[-2]["done"] and lines[-1]["done"]
    assert req.tools[0].name == "get_weather" and req.tool_choice.mode == "auto"
    call_id = req.messages[1].tool_calls[0].id
    assert req.messages[1].tool_calls[0].arguments == '{"city": "Paris"}'
    assert req.messages[2] == Message("tool", "18C", tool_call_id=call_id, name="get_weather")


async def test_ollama_tool_choice_extension(tmp_path) -> None:
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "stream": False}
    async with client(tmp_path, CALL) as c:
        ok = await c.post("/api/chat", json={**body, "options": {"tool_choice": "get_weather", "temperature": 0}})
        bad = await c.post("/api/chat", json={**body, "options": {"tool_choice": "nope"}})
        req = c.backend.seen[0]
    assert ok.status_code == 200 and req.tool_choice == ToolChoice("function", "get_weather")
    assert req.params.temperature == 0
    assert bad.status_code == 400 and "nope" in bad.json()["error"]


def test_translations_are_pure() -> None:
    msgs = [openai_wire.ChatMessage(role="tool", content="x", tool_call_id="c9")]
    assert openai_wire.messages_of(msgs) == [Message("tool", "x", tool_call_id="c9")]
    assert ollama_wire.calls_out([ToolCall("i", "f", "not json")])[0].function.arguments == {}


# -- upstream backends ---------------------------------------------------------------------------


def test_remote_and_ollama_backends_translate_calls() -> None:
    from types import SimpleNamespace as NS

    from appliance.backends import ollama as ob
    from appliance.backends import remote as rb

    ids: dict[int, str] = {}
    first = rb._tool_delta(NS(index=0, id="up_1", function=NS(name="f", arguments="")), ids)
    rest = rb._tool_delta(NS(index=0, id=None, function=NS(name=None, arguments='{"a": 1}')), ids)
    assert (first.id, first.name, rest.id, rest.arguments) == ("up_1", "f", None, '{"a": 1}')
    noid = rb._tool_delta(NS(index=1, id=None, function=NS(name="g", arguments="{}")), ids)
    assert noid.id.startswith("call_") and noid.name == "g"
    call = Message("assistant", "", [ToolCall("c1", "f", '{"a": 1}')])
    assert rb._wire_message(call)["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert rb._wire_message(Message("tool", "r", tool_call_id="c1")) == {
        "role": "tool",
        "content": "r",
        "tool_call_id": "c1",
    }
    assert ob._message(call)["tool_calls"] == [{"function": {"name": "f", "arguments": {"a": 1}}}]
    assert ob._message(Message("tool", "r", name="f"))["tool_name"] == "f"
