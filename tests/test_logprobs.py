"""logprobs / top_logprobs and logit_bias on the OpenAI API.

Fast tier: request validation (400 naming the param) and OpenAI's exact shapes, with a scripted backend.
Slow tier: the real model over HTTP with the `openai` SDK: the values are real log-probabilities (finite,
<= 0, alternatives sorted, the greedy token is the top one), stream and non-stream agree, and logit_bias
changes what greedy decoding picks.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import openai
import pytest

from appliance.engine.types import Event, Finish, Token, TokenLogprob, Usage
from tests.conftest import Server, sse, streamed_logprobs
from tests.fakes import app_client

CHAT = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
LP = [
    TokenLogprob("Hel", -0.25, (("Hel", -0.25), ("Hi", -1.5))),
    TokenLogprob("lo", -0.5, (("lo", -0.5), ("p", -2.0))),
    TokenLogprob("bytes:\\xe2\\x82", -1.0, (("bytes:\\xe2\\x82", -1.0), ("!", -3.0))),
    TokenLogprob("bytes:\\xac", -0.125, (("bytes:\\xac", -0.125), ("?", -4.0))),
]
SCRIPT: list[Event] = [Token("Hel", LP[:1]), Token("lo", LP[1:2]), Token("€", LP[2:]), Finish("stop", Usage(5, 4))]


def client(tmp_path, script: list[Event] = SCRIPT):
    return app_client(tmp_path, script)


# -- fast: validation ------------------------------------------------------------------------------------


BAD_BIASES: list[Any] = [
    "x",
    [1, 2],
    {"abc": 1},
    {"-5": 1},
    {"1.5": 1},
    {"12": "5"},
    {"12": True},
    {"12": 101},
    {"12": -100.5},
    {"12": None},
    {str(i): 1 for i in range(301)},
]


async def test_a_malformed_logit_bias_is_a_400_naming_it(tmp_path) -> None:
    async with client(tmp_path) as c:
        for bias in BAD_BIASES:
            for path, body in (
                ("/v1/chat/completions", CHAT),
                ("/v1/completions", {"model": "default", "prompt": "x"}),
            ):
                r = await c.post(path, json={**body, "logit_bias": bias})
                assert r.status_code == 400, (bias, r.text)
                err = r.json()["error"]
                assert err["param"] == "logit_bias" and err["type"] == "invalid_request_error", err
        assert c.backend.seen == []


async def test_logit_bias_and_logprobs_reach_the_engine(tmp_path) -> None:
    async with client(tmp_path) as c:
        body = {**CHAT, "logit_bias": {"42": -100, "7": 2.5}, "logprobs": True, "top_logprobs": 3}
        assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
        p = c.backend.seen[-1].params
        assert p.logit_bias == {42: -100.0, 7: 2.5} and p.logprobs == 3
        assert (await c.post("/v1/chat/completions", json={**CHAT, "logprobs": True})).status_code == 200
        assert c.backend.seen[-1].params.logprobs == 0
        assert (await c.post("/v1/chat/completions", json={**CHAT, "logprobs": False})).status_code == 200
        assert c.backend.seen[-1].params.logprobs is None and c.backend.seen[-1].params.logit_bias == {}
        r = await c.post("/v1/completions", json={"model": "default", "prompt": "x", "logprobs": 5})
        assert r.status_code == 200 and c.backend.seen[-1].params.logprobs == 5


OUT_OF_RANGE = [
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
]


async def test_out_of_range_logprobs_are_a_400(tmp_path) -> None:
    async with client(tmp_path) as c:
        for path, extra, param in OUT_OF_RANGE:
            body = CHAT if path == "/v1/chat/completions" else {"model": "default", "prompt": "x"}
            r = await c.post(path, json={**body, **extra})
            assert r.status_code == 400, (extra, r.text)
            assert r.json()["error"]["param"] == param


# -- fast: shapes ----------------------------------------------------------------------------------------


async def test_chat_logprobs_shapes(tmp_path, openai_schema) -> None:
    async with client(tmp_path) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2})
        doc = r.json()
        openai_schema("CreateChatCompletionResponse", doc)
        content = doc["choices"][0]["logprobs"]["content"]
        assert [e["token"] for e in content] == [e.token for e in LP]
        assert content[0] == {
            "token": "Hel",
            "logprob": -0.25,
            "bytes": [72, 101, 108],
            "top_logprobs": [
                {"token": "Hel", "logprob": -0.25, "bytes": [72, 101, 108]},
                {"token": "Hi", "logprob": -1.5, "bytes": [72, 105]},
            ],
        }
        assert bytes(content[2]["bytes"] + content[3]["bytes"]).decode() == "€"  # a character split in two tokens
        plain = (await c.post("/v1/chat/completions", json=CHAT)).json()
        assert plain["choices"][0]["logprobs"] is None

        r = await c.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "stream": True})
        chunks = sse(r.text)
    for ch in chunks:
        openai_schema("CreateChatCompletionStreamResponse", ch)
    streamed = streamed_logprobs(chunks)
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert chunks[0]["choices"][0]["logprobs"] is None  # the role chunk


async def test_completion_logprobs_shapes(tmp_path, openai_schema) -> None:
    async with client(tmp_path) as c:
        r = await c.post("/v1/completions", json={"model": "default", "prompt": "Say", "logprobs": 1, "echo": True})
        doc = r.json()
        openai_schema("CreateCompletionResponse", doc)
        lp = doc["choices"][0]["logprobs"]
        assert lp["tokens"] == [e.token for e in LP]
        assert lp["token_logprobs"] == [e.logprob for e in LP]
        assert lp["top_logprobs"][1] == {"lo": -0.5, "p": -2.0}
        assert lp["text_offset"] == [3, 6, 8, 8]  # after the echoed prompt; the split character starts at 8
        text = doc["choices"][0]["text"]
        assert text == "SayHello€" and text[lp["text_offset"][1] :].startswith("lo")
        r = await c.post("/v1/completions", json={"model": "default", "prompt": "Say", "logprobs": 0, "stream": True})
        chunks = sse(r.text)
    offsets = [o for ch in chunks if ch["choices"][0]["logprobs"] for o in ch["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == [0, 3, 5, 5]


# -- slow: the real model --------------------------------------------------------------------------------

MSGS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def oai(appliance_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{appliance_server.base_url}/v1", api_key="unused", max_retries=0)


def check_entries(entries: list[Any], k: int) -> None:
    assert entries
    for e in entries:
        assert math.isfinite(e.logprob) and e.logprob <= 0
        assert len(e.top_logprobs) == k
        tops = [t.logprob for t in e.top_logprobs]
        assert all(math.isfinite(x) and x <= 0 for x in tops)
        assert tops == sorted(tops, reverse=True)
        # temperature 0: the chosen token is the most likely one, with the same log-probability
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert sum(math.exp(x) for x in tops) <= 1 + 1e-6
        assert bytes(e.bytes) == e.token.encode() if not e.token.startswith("bytes:") else True


async def test_ollama_logprobs_shapes(tmp_path) -> None:
    """/api/chat and /api/generate take Ollama's `logprobs` / `top_logprobs` (0.12.11) and put each line's
    tokens in its `logprobs`; the whole answer carries them all; without the field, no `logprobs` key."""
    msgs = [{"role": "user", "content": "hi"}]
    async with client(tmp_path) as c:
        body = {"model": "default", "messages": msgs, "stream": False, "logprobs": True, "top_logprobs": 2}
        whole = (await c.post("/api/chat", json=body)).json()
        lines = (await c.post("/api/chat", json={**body, "stream": True})).text.splitlines()
        gen = (await c.post("/api/generate", json={"model": "default", "prompt": "x", "logprobs": True})).text
        plain = (await c.post("/api/chat", json={"model": "default", "messages": msgs, "stream": False})).json()
        bad = await c.post("/api/chat", json={**body, "top_logprobs": 21})
        seen = c.backend.seen  # type: ignore[attr-defined]
    assert [e["token"] for e in whole["logprobs"]] == [e.token for e in LP]
    assert whole["logprobs"][0] == {
        "token": "Hel",
        "logprob": -0.25,
        "bytes": [72, 101, 108],
        "top_logprobs": [
            {"token": "Hel", "logprob": -0.25, "bytes": [72, 101, 108]},
            {"token": "Hi", "logprob": -1.5, "bytes": [72, 105]},
        ],
    }
    streamed = [e for ln in lines for e in json.loads(ln).get("logprobs") or []]
    assert streamed == whole["logprobs"]
    assert [e["token"] for ln in gen.splitlines() for e in json.loads(ln).get("logprobs") or []] == [
        e.token for e in LP
    ]
    assert "logprobs" not in plain and bad.status_code == 400
    assert [r.params.logprobs for r in seen[:4]] == [2, 2, 0, None]


@pytest.mark.slow
def test_ollama_client_logprobs_from_the_model(appliance_server: Server) -> None:
    import ollama

    oc = ollama.Client(host=appliance_server.base_url)
    opts = {"temperature": 0, "num_predict": 8}
    r = oc.chat(model="default", messages=MSGS, options=opts, logprobs=True, top_logprobs=3)
    assert r.logprobs and len(r.logprobs) == r.eval_count
    assert "".join(e.token for e in r.logprobs) == r.message.content
    for e in r.logprobs:
        assert math.isfinite(e.logprob) and e.logprob <= 0 and e.top_logprobs and len(e.top_logprobs) <= 3
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)  # greedy: the chosen one is the most likely


@pytest.mark.slow
def test_chat_logprobs_from_the_model_stream_and_non_stream(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(
        model="default", messages=MSGS, max_tokens=12, temperature=0, logprobs=True, top_logprobs=5
    )
    entries = r.choices[0].logprobs.content
    check_entries(entries, 5)
    assert len(entries) == r.usage.completion_tokens
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    chunks = list(
        oai.chat.completions.create(
            model="default", messages=MSGS, max_tokens=12, temperature=0, logprobs=True, top_logprobs=5, stream=True
        )
    )
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    plain = oai.chat.completions.create(model="default", messages=MSGS, max_tokens=12, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


@pytest.mark.slow
def test_completion_logprobs_from_the_model(oai: openai.OpenAI) -> None:
    r = oai.completions.create(
        model="default", prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    text = r.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    for tok, x, top, off in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset, strict=True):
        assert math.isfinite(x) and x <= 0 and len(top) <= 3
        assert max(top.values()) == pytest.approx(x)  # greedy: the chosen one is the most likely
        assert text[off:].startswith(tok)


@pytest.mark.slow
def test_logit_bias_bans_and_forces_tokens(oai: openai.OpenAI, appliance_server: Server) -> None:
    import llama_cpp

    from appliance.catalog import embedded_smollm2

    vocab = llama_cpp.Llama(model_path=str(embedded_smollm2()[0]), vocab_only=True, verbose=False)

    def token_id(text: str) -> int:
        ids = vocab.tokenize(text.encode(), add_bos=False, special=False)
        assert len(ids) == 1 and vocab.detokenize(ids).decode() == text, (text, ids)
        return ids[0]

    def first(**kw: Any) -> Any:
        r = oai.chat.completions.create(
            model="default", messages=MSGS, max_tokens=3, temperature=0, logprobs=True, **kw
        )
        return r.choices[0].logprobs.content[0]

    greedy = first()
    banned = first(logit_bias={str(token_id(greedy.token)): -100})
    assert banned.token != greedy.token
    forced = first(logit_bias={str(token_id(" banana")): 100})
    assert forced.token == " banana"
    assert forced.logprob < greedy.logprob  # logprobs are the model's own, before the bias
    # A token id the model does not have: 400 from the worker, naming logit_bias.
    r = httpx.post(
        f"{appliance_server.base_url}/v1/chat/completions", json={**CHAT, "logit_bias": {"99999999": 1}}, timeout=60
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}},
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["none", "auto"])
def test_chat_logprobs_with_tools_and_a_text_answer(oai: openai.OpenAI, choice: str) -> None:
    """With tools, the text goes through the tool-call parser (`auto`) or not (`none`): either way the
    content's tokens keep their log-probabilities, and they join back into the content."""
    kw: dict[str, Any] = dict(
        model="default", messages=MSGS, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2
    )
    r = oai.chat.completions.create(tools=[WEATHER_TOOL], tool_choice=choice, **kw)  # type: ignore[arg-type]
    msg = r.choices[0].message
    assert not msg.tool_calls and msg.content, msg  # a plain answer: the capital of France needs no weather
    entries = r.choices[0].logprobs.content
    check_entries(entries, 2)
    assert bytes(b for e in entries for b in e.bytes).decode() == msg.content
    chunks = list(oai.chat.completions.create(tools=[WEATHER_TOOL], tool_choice=choice, stream=True, **kw))  # type: ignore[arg-type]
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == msg.content
