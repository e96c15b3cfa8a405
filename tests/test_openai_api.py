"""The OpenAI-compatible API, driven by the real `openai` SDK against a real server and model."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


@pytest.fixture(scope="module")
def client(appliance_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{appliance_server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def aclient(appliance_server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{appliance_server.base_url}/v1", api_key="unused", max_retries=0)


def test_chat_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="default", messages=HELLO, max_tokens=24, temperature=0)
    assert r.object == "chat.completion"
    assert r.model == "smollm2-135m-instruct"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Write a long story about a dragon and a castle."}]
    r = client.chat.completions.create(model="default", messages=msgs, max_completion_tokens=7, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7


def test_deterministic_at_temperature_zero_and_with_seed(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Name three fruits."}]
    a = client.chat.completions.create(model="default", messages=msgs, max_tokens=30, temperature=0)
    b = client.chat.completions.create(model="default", messages=msgs, max_tokens=30, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    s1 = client.chat.completions.create(model="default", messages=msgs, max_tokens=30, temperature=1.0, seed=42)
    s2 = client.chat.completions.create(model="default", messages=msgs, max_tokens=30, temperature=1.0, seed=42)
    assert s1.choices[0].message.content == s2.choices[0].message.content
    outs = {
        client.chat.completions.create(model="default", messages=msgs, max_tokens=30, temperature=1.5, seed=s)
        .choices[0]
        .message.content
        for s in (1, 2, 3, 4)
    }
    assert len(outs) > 1, "different seeds at high temperature should not all agree"


def test_stop_sequence_is_honoured(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    full = client.chat.completions.create(model="default", messages=msgs, max_tokens=40, temperature=0)
    text = full.choices[0].message.content
    assert "4" in text, text
    r = client.chat.completions.create(model="default", messages=msgs, max_tokens=40, temperature=0, stop=["4"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[: text.index("4")]
    r2 = client.chat.completions.create(model="default", messages=msgs, max_tokens=40, temperature=0, stop="4")
    assert r2.choices[0].message.content == r.choices[0].message.content


def test_stream_matches_non_stream_and_reports_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="default", messages=HELLO, max_tokens=20, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="default",
            messages=HELLO,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_stream_arrives_in_pieces_as_it_is_generated(client: openai.OpenAI) -> None:
    # APPLIANCE_STREAM_INTERVAL (25 ms) may put a few tokens in one chunk, but text keeps flowing:
    # ~1.5 s of generation arrives in many chunks spread over that time, not at the end.
    stream = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Write a very long essay about the sea."}],
        max_tokens=128,
        temperature=0,
        stream=True,
    )
    arrivals = [time.monotonic() for c in stream if c.choices and c.choices[0].delta.content]
    assert len(arrivals) >= 16
    assert arrivals[len(arrivals) // 2] - arrivals[0] > 0.25 * (arrivals[-1] - arrivals[0])


def test_stream_without_usage_option_has_no_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="default", messages=HELLO, max_tokens=5, stream=True))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason is not None


async def test_async_client(aclient: openai.AsyncOpenAI) -> None:
    r = await aclient.chat.completions.create(model="default", messages=HELLO, max_tokens=10, temperature=0)
    assert r.choices[0].message.content
    stream = await aclient.chat.completions.create(
        model="smollm2-135m-instruct", messages=HELLO, max_tokens=10, temperature=0, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == r.choices[0].message.content


def test_roles_and_text_parts(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="default",
        messages=[
            {"role": "developer", "content": "You answer in one word."},
            {"role": "user", "content": [{"type": "text", "text": "What colour is the sky?"}]},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "And grass?"},
        ],
        max_tokens=10,
        user="alice",
        presence_penalty=0.5,
        frequency_penalty=0.5,
        top_p=0.9,
    )
    assert r.choices[0].message.content is not None


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model="default", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text
    assert r.usage.completion_tokens <= 8
    parts = list(
        client.completions.create(
            model="default", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(p.choices[0].text for p in parts) == r.choices[0].text


def test_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert "smollm2-135m-instruct" in ids
    m = client.models.retrieve("default")
    assert m.id == "smollm2-135m-instruct"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"


def test_shapes_follow_openai_spec(appliance_server: Server, openai_schema) -> None:
    base = appliance_server.base_url
    body = {"model": "default", "messages": HELLO, "max_tokens": 5}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    openai_schema("CreateChatCompletionResponse", r.json())
    assert "system_fingerprint" not in r.json()
    with httpx.stream(
        "POST",
        f"{base}/v1/chat/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
        timeout=60,
    ) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    import json

    for ln in lines[:-1]:
        openai_schema("CreateChatCompletionStreamResponse", json.loads(ln[6:]))
    r = httpx.post(f"{base}/v1/completions", json={"model": "default", "prompt": "Hi", "max_tokens": 3}, timeout=60)
    openai_schema("CreateCompletionResponse", r.json())
    openai_schema("ListModelsResponse", httpx.get(f"{base}/v1/models").json())
    openai_schema("Model", httpx.get(f"{base}/v1/models/default").json())
    openai_schema("ErrorResponse", httpx.post(f"{base}/v1/chat/completions", json={"model": "x"}).json())
