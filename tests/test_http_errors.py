"""Client mistakes get OpenAI-shaped errors with the right status, over raw HTTP."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def http(appliance_server: Server):
    with httpx.Client(base_url=appliance_server.base_url, timeout=60) as c:
        yield c


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def test_malformed_json(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions",
        content=b'{"model": "default", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert_error(r, 400)
    assert_error(http.post("/v1/chat/completions", content=b""), 400)
    assert_error(http.post("/v1/chat/completions", json=["not", "an", "object"]), 400)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MSG}, "model"),
        ({"model": "default"}, "messages"),
        ({"model": "default", "messages": []}, "messages"),
        ({"model": "default", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": "default", "messages": MSG, "temperature": 3}, "temperature"),
        ({"model": "default", "messages": MSG, "max_tokens": 0}, "max_tokens"),
        ({"model": "default", "messages": MSG, "max_tokens": "many"}, "max_tokens"),
        ({"model": "default", "messages": MSG, "n": 9}, "n"),  # over the 8 slots
        ({"model": "default", "messages": MSG, "stop": ["a"] * 17}, "stop"),  # over 16 stop strings
        ({"model": "default", "messages": MSG, "top_p": 0}, "top_p"),
    ],
)
def test_invalid_fields_name_the_param(http: httpx.Client, body: dict, param: str) -> None:
    err = assert_error(http.post("/v1/chat/completions", json=body), 400, param=param)
    assert err["type"] == "invalid_request_error"


def test_unsupported_content_part_names_messages(http: httpx.Client) -> None:
    body = {"model": "default", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["param"].startswith("messages[0].content")


def test_unknown_model(http: httpx.Client) -> None:
    err = assert_error(
        http.post("/v1/chat/completions", json={"model": "gpt-9", "messages": MSG}), 404, "model", "model_not_found"
    )
    assert "gpt-9" in err["message"]
    assert_error(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404, "model", "model_not_found")


def test_context_length_exceeded(http: httpx.Client) -> None:
    long = "word " * 5000  # > the 4096-token context of the test server
    err = assert_error(
        http.post("/v1/chat/completions", json={"model": "default", "messages": [{"role": "user", "content": long}]}),
        400,
        "messages",
        "context_length_exceeded",
    )
    assert "4096" in err["message"]
    short = [{"role": "user", "content": "hello " * 100}]
    err = assert_error(
        http.post("/v1/chat/completions", json={"model": "default", "messages": short, "max_tokens": 4090}),
        400,
        "messages",
        "context_length_exceeded",
    )
    assert "4090" in err["message"] and "4096" in err["message"]
    err = assert_error(
        http.post("/v1/completions", json={"model": "default", "prompt": long}),
        400,
        "prompt",
        "context_length_exceeded",
    )


def test_max_tokens_may_go_up_to_the_context(http: httpx.Client) -> None:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4000,
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as r:  # accepted; we leave after the first chunk
        assert r.status_code == 200
        assert next(r.iter_lines()).startswith("data: {")


def test_body_too_large(http: httpx.Client) -> None:
    big = {"model": "default", "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    assert_error(http.post("/v1/chat/completions", json=big), 413)


def test_unknown_route_and_wrong_method(http: httpx.Client) -> None:
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.post("/v1/models"), 405)
    assert_error(http.get("/v1/chat/completions"), 405)


def test_request_id_is_echoed(http: httpx.Client) -> None:
    r = http.get("/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(http.get("/health").headers["x-request-id"]) >= 16
