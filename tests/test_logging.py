"""Structured logs: JSON lines, one access line per request (streams included), no prompts or secrets."""

from __future__ import annotations

import io
import json
import logging
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from appliance.api.middleware import RequestIdMiddleware
from appliance.observability import logging as applog
from appliance.observability.access import AccessMiddleware
from appliance.observability.logging import JsonFormatter, setup_logging
from tests.conftest import Server

SECRET_PROMPT = "zebra-violet-4242 is my secret"


def test_json_formatter() -> None:
    rec = logging.LogRecord("appliance.x", logging.WARNING, __file__, 1, "hello %s", ("world",), None)
    rec.fields = {"a": 1, "b": "two"}
    doc = json.loads(JsonFormatter().format(rec))
    assert doc["level"] == "warning" and doc["logger"] == "appliance.x" and doc["msg"] == "hello world"
    assert doc["a"] == 1 and doc["b"] == "two" and doc["ts"].endswith("Z")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    doc = json.loads(JsonFormatter().format(rec))
    assert "ValueError: boom" in doc["exc"]


def test_setup_logging_writes_json_lines_from_a_thread() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging("info", stream=out)
        logging.getLogger("appliance.test").info("one %d", 1, extra={"fields": {"k": "v"}})
        logging.getLogger("appliance.test").debug("not shown")
        applog._stop()  # flushes the queue
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines == [{"ts": lines[0]["ts"], "level": "info", "logger": "appliance.test", "msg": "one 1", "k": "v"}]


def _app(log_prompts: bool) -> Starlette:
    async def chat(request: Request):
        await request.body()

        async def gen():
            try:
                yield b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n'
                yield b'data: {"choices": [{"delta": {"content": "lo"}}]}\n\n'
                yield b"data: [DONE]\n\n"
            finally:
                st = request.state
                st.model, st.backend, st.ttft = "m", "llamacpp", 0.0123
                st.prompt_tokens, st.completion_tokens = 7, 2
                if getattr(st, "capture", False):  # what api/streaming.py leaves from the internal events
                    st.prompt, st.completion = SECRET_PROMPT, "Hello"

        return StreamingResponse(gen(), media_type="text/event-stream")

    async def item(request: Request):
        return JSONResponse({"id": request.path_params["item_id"]})

    app = Starlette(routes=[Route("/v1/chat", chat, methods=["POST"]), Route("/items/{item_id}", item)])
    app.add_middleware(AccessMiddleware, metrics=None, log_prompts=log_prompts)
    app.add_middleware(RequestIdMiddleware)
    return app


def _access_records(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [r.fields for r in caplog.records if r.name == "appliance.access"]


@pytest.mark.parametrize("log_prompts", [False, True])
async def test_access_line_for_a_stream(caplog: pytest.LogCaptureFixture, log_prompts: bool) -> None:
    caplog.set_level(logging.INFO, "appliance.access")
    transport = httpx.ASGITransport(app=_app(log_prompts))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.post(
            "/v1/chat",
            json={"messages": [{"role": "user", "content": SECRET_PROMPT}]},
            headers={"X-Request-Id": "req-123", "Authorization": "Bearer sk-app-topsecret"},
        )
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-123"
        await c.get("/items/abc")
    (stream, item) = _access_records(caplog)
    assert stream["request_id"] == "req-123" and stream["route"] == "/v1/chat" and stream["status"] == 200
    assert stream["model"] == "m" and stream["backend"] == "llamacpp"
    assert stream["prompt_tokens"] == 7 and stream["completion_tokens"] == 2 and stream["ttft_ms"] == 12.3
    assert stream["duration_ms"] >= 0 and stream["bytes_sent"] > 0
    assert item["route"] == "/items/{item_id}" and item["path"] == "/items/abc"
    text = json.dumps(_access_records(caplog)) + caplog.text
    assert "sk-app-topsecret" not in text
    if log_prompts:
        assert SECRET_PROMPT in stream["prompt"] and stream["completion"] == "Hello"
    else:
        assert SECRET_PROMPT not in text and "prompt" not in stream and "completion" not in stream


@pytest.mark.slow
def test_server_logs_json_access_lines_without_prompts(appliance_server: Server) -> None:
    url = appliance_server.base_url
    body = {"model": "default", "messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 4}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"X-Request-Id": "log-test-1"}, timeout=60)
    assert r.status_code == 200
    completion = r.json()["choices"][0]["message"]["content"]
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={**body, "stream": True},
        headers={"X-Request-Id": "log-test-2"},
        timeout=60,
    ) as s:
        s.read()
    time.sleep(0.5)
    log = appliance_server.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(doc) for doc in lines)
    access = {doc.get("request_id"): doc for doc in lines if doc["logger"] == "appliance.access"}
    for rid in ("log-test-1", "log-test-2"):
        doc = access[rid]
        assert doc["status"] == 200 and doc["route"] == "/v1/chat/completions" and doc["method"] == "POST"
        assert doc["model"] == "smollm2-135m-instruct" and doc["backend"] == "llamacpp"
        assert doc["prompt_tokens"] > 0 and doc["completion_tokens"] > 0
        assert doc["ttft_ms"] > 0 and doc["duration_ms"] >= doc["ttft_ms"]
    assert SECRET_PROMPT not in log
    assert len(completion) < 4 or completion not in log
