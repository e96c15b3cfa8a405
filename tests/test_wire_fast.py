"""The wire layer without a model: create_app() with scripted backends, driven through httpx.ASGITransport.

Response, chunk and error shapes (OpenAI and Ollama), Retry-After everywhere, request bounds, the
generated OpenAPI document, and what the access log gets from the internal events. Fast tier: no
processes, no model, no sleeps.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from appliance.api.openapi import document
from appliance.api.protocol.common import MAX_STOPS
from appliance.api.protocol.ollama import parse_keep_alive
from appliance.engine.types import EngineError, Error, Event, Token
from tests.conftest import sse
from tests.fakes import HELLO, app_client


def client(tmp_path, script: list[Event] | EngineError = HELLO, **settings: Any):
    return app_client(tmp_path, script, **settings)


CHAT = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}


def error_shape(doc: dict) -> dict:
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}
    return doc["error"]


async def test_chat_completion_shape(tmp_path, openai_schema) -> None:
    async with client(tmp_path) as c:
        r = await c.post("/v1/chat/completions", json=CHAT, headers={"X-Thread-Id": "t1"})
    assert r.status_code == 200, r.text
    doc = r.json()
    openai_schema("CreateChatCompletionResponse", doc)
    assert doc["choices"][0]["message"] == {"role": "assistant", "content": "Hello", "refusal": None}
    assert doc["choices"][0]["finish_reason"] == "stop"
    assert doc["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 1},
    }
    assert r.headers["x-appliance-backend"] == "llamacpp"
    assert "x-thread-id" not in r.headers  # only the agent has threads: a plain model echoes none


async def test_chat_stream_chunks(tmp_path, openai_schema) -> None:
    async with client(tmp_path) as c:
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r.text)
    for ch in chunks:
        openai_schema("CreateChatCompletionStreamResponse", ch)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"]) == "Hello"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-2]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 7
    assert "usage" not in chunks[0]
    assert len({ch["id"] for ch in chunks}) == 1


async def test_completion_shapes(tmp_path, openai_schema) -> None:
    async with client(tmp_path) as c:
        r = await c.post("/v1/completions", json={"model": "default", "prompt": "Say", "echo": True})
        openai_schema("CreateCompletionResponse", r.json())
        assert r.json()["choices"][0]["text"] == "SayHello"
        r = await c.post("/v1/completions", json={"model": "default", "prompt": ["Say"], "stream": True})
        chunks = sse(r.text)
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == "Hello"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert c.backend.seen[-1].prompt == "Say"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"{not json", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"),
        (b"", None, "invalid_json"),
        (json.dumps({"messages": CHAT["messages"]}).encode(), "model", None),
        (json.dumps({**CHAT, "temperature": "1"}).encode(), "temperature", "invalid_value"),
        (json.dumps({**CHAT, "max_tokens": 2.0}).encode(), "max_tokens", "invalid_value"),
        (json.dumps({**CHAT, "stop": ["a"] * 17}).encode(), "stop", "invalid_value"),
        (json.dumps({**CHAT, "stop": ["a" * 257]}).encode(), "stop", "invalid_value"),
        (json.dumps({**CHAT, "n": 65}).encode(), "n", "invalid_value"),
        (json.dumps({**CHAT, "messages": [{"role": "robot", "content": "x"}]}).encode(), "messages[0].role", None),
        (json.dumps({**CHAT, "temperature": float("nan")}).encode(), "temperature", "invalid_value"),
        (b'{"model": "default", "max_tokens": ' + b"9" * 5000 + b"}", None, None),
        (b'{"model": "default", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", None, None),
    ],
)
async def test_bad_requests_get_400_naming_the_param(tmp_path, body: bytes, param, code) -> None:
    async with client(tmp_path) as c:
        r = await c.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = error_shape(r.json())
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    assert c.backend.seen == []


async def test_unknown_model_route_and_method(tmp_path) -> None:
    async with client(tmp_path) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
        assert r.status_code == 404 and error_shape(r.json())["code"] == "model_not_found"
        r = await c.get("/v1/nothing")
        assert r.status_code == 404 and "Unknown route" in error_shape(r.json())["message"]
        r = await c.get("/v1/chat/completions")
        assert r.status_code == 405
        error_shape(r.json())
        r = await c.post("/api/chat", json={**CHAT, "model": "nope"})
        assert r.status_code == 404 and set(r.json()) == {"error"}


async def test_body_limit_renders_the_same_error(tmp_path) -> None:
    async with client(tmp_path, max_body_bytes=2048) as c:
        r = await c.post("/v1/chat/completions", content=b"x" * 4096)
        assert r.status_code == 413 and error_shape(r.json())["code"] == "request_too_large"
        r = await c.post("/api/chat", content=b"x" * 4096)
        assert r.status_code == 413 and isinstance(r.json()["error"], str)


BUSY = EngineError(Error(503, "busy", "server_error", "queue_full", retry_after=2.0))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
async def test_retry_after_before_the_stream(tmp_path, path: str) -> None:
    async with client(tmp_path, script=BUSY) as c:
        r = await c.post(path, json={**CHAT, "stream": True})
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    if path.startswith("/api/"):
        assert r.json() == {"error": "busy"}
    else:
        assert error_shape(r.json())["code"] == "queue_full"


MIDWAY: list[Event] = [Token("Hel"), Error(503, "worker died", "server_error", "worker_crashed", retry_after=1.0)]


async def test_errors_mid_stream_in_each_dialect(tmp_path) -> None:
    async with client(tmp_path, script=MIDWAY) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
        chunks = sse(r.text)
        assert error_shape(chunks[-1])["code"] == "worker_crashed"
        r = await c.post("/api/chat", json={**CHAT, "stream": True})
        lines = [json.loads(ln) for ln in r.text.splitlines()]
        assert lines[0]["message"]["content"] == "Hel" and lines[-1] == {"error": "worker died"}
        r = await c.post("/v1/chat/completions", json=CHAT)  # not streamed: the error is the response
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        r = await c.post("/api/chat", json={**CHAT, "stream": False})
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json() == {"error": "worker died"}


async def test_ollama_shapes(tmp_path) -> None:
    async with client(tmp_path) as c:
        r = await c.post("/api/chat", json={**CHAT, "stream": False, "options": {"temperature": 0, "seed": 3}})
        doc = r.json()
        assert doc["message"] == {"role": "assistant", "content": "Hello"} and doc["done"] is True
        assert doc["done_reason"] == "stop" and doc["prompt_eval_count"] == 5 and doc["eval_count"] == 2
        assert doc["created_at"].endswith("Z") and doc["model"] == "smollm2-135m-instruct"
        assert c.backend.seen[-1].params.temperature == 0 and c.backend.seen[-1].params.seed == 3
        r = await c.post("/api/generate", json={"model": "default", "prompt": "Say", "raw": True})
        lines = [json.loads(ln) for ln in r.text.splitlines()]
        assert [ln["response"] for ln in lines] == ["Hel", "lo", ""] and lines[-1]["done"] is True
        assert [ln["done"] for ln in lines[:-1]] == [False, False] and "eval_count" not in lines[0]
        r = await c.get("/api/version")
        assert set(r.json()) == {"version", "appliance"}
        r = await c.get("/api/tags")
        tag = r.json()["models"][0]
        assert tag["name"] == "smollm2-135m-instruct" and tag["details"]["format"] == "gguf"
        r = await c.post("/api/show", json={"model": "default"})
        assert r.json()["capabilities"] == ["completion", "tools"]
        r = await c.post("/api/show", json={})
        assert r.status_code == 400 and r.json() == {"error": "model is required"}
        r = await c.get("/api/ps")
        assert r.json()["models"][0]["name"] == "smollm2-135m-instruct"
        r = await c.post("/api/embed", json={"model": "all-minilm-l6-v2", "input": ["a b", "c"]})
        assert r.json()["embeddings"] == [[1.0, 0.0, 0.0]] * 2 and r.json()["prompt_eval_count"] == 3


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": -1},
        {"temperature": 1e9},
        {"repeat_penalty": 0},
        {"top_p": 0},
        {"stop": ["x"] * 17},
        {"stop": "x" * 257},
        {"num_predict": "8"},
    ],
)
async def test_ollama_sampler_options_are_bounded(tmp_path, options: dict) -> None:
    async with client(tmp_path) as c:
        r = await c.post("/api/generate", json={"model": "default", "prompt": "x", "options": options})
    assert r.status_code == 400 and "options" in r.json()["error"]


async def test_ollama_unload_and_keep_alive(tmp_path) -> None:
    async with client(tmp_path) as c:
        r = await c.post("/api/generate", json={"model": "default", "prompt": "", "keep_alive": 0})
        assert r.json()["done_reason"] == "unload" and c.backend.unloaded == 1
        r = await c.post("/api/generate", json={"model": "default", "keep_alive": "bogus"})
        assert r.status_code == 400 and "keep_alive" in r.json()["error"]


def test_keep_alive_parsing() -> None:
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400 and parse_keep_alive(10) == 10
    assert parse_keep_alive("-1") == -1 and parse_keep_alive(None) is None and parse_keep_alive("250ms") == 0.25
    assert parse_keep_alive(1e300) == -1  # beyond ten years is forever
    for bad in ("5x", "m5", "1e999", "nan"):
        with pytest.raises(EngineError):
            parse_keep_alive(bad)


async def test_embeddings_shapes(tmp_path, openai_schema) -> None:
    async with client(tmp_path) as c:
        r = await c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": ["a", "b c"]})
        openai_schema("CreateEmbeddingResponse", r.json())
        r = await c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": [1, 2]})
        assert r.status_code == 400 and "Token arrays" in error_shape(r.json())["message"]
        r = await c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": ["x"] * 2049})
        assert r.status_code == 400 and error_shape(r.json())["param"] == "input"
        r = await c.post("/api/embed", json={"model": "all-minilm-l6-v2", "input": ["x"] * 2049})
        assert r.status_code == 400


async def test_openapi_document_is_generated_and_served(tmp_path) -> None:
    import schemathesis

    doc = document()
    schemathesis.openapi.from_dict(doc)  # a valid OpenAPI 3.1 document with resolvable references
    req = doc["components"]["schemas"]["ChatCompletionRequest"]
    stop_list = next(s for s in req["properties"]["stop"]["anyOf"] if s.get("type") == "array")
    assert stop_list["maxItems"] == MAX_STOPS  # from the model, not typed by hand
    assert "user" in doc["components"]["schemas"]["EmbeddingRequest"]["properties"]
    async with client(tmp_path) as c:
        served = (await c.get("/openapi.json")).json()
    assert "/v1/threads" not in served["paths"]  # the agent is off here: only served routes are listed
    assert "/v1/chat/completions" in served["paths"] and "/api/chat" in served["paths"]


async def test_access_log_takes_prompt_and_completion_from_events(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "appliance.access")
    async with client(tmp_path, log_prompts=True) as c:
        await c.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers={"X-Request-Id": "rid-1"})
    line = next(r.fields for r in caplog.records if r.name == "appliance.access")
    assert line["request_id"] == "rid-1" and line["completion"] == "Hello" and "hi" in line["prompt"]
    assert line["prompt_tokens"] == 5 and line["completion_tokens"] == 2 and line["model"] == "smollm2-135m-instruct"
