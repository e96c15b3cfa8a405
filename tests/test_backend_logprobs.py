"""logprobs / top_logprobs / logit_bias through the upstream backends (remote OpenAI-compatible, Ollama).

Fast tier: the real `remote` and `ollama` backends (the official `openai` and `ollama` clients) talk over
loopback HTTP to a scripted upstream that records what it was sent. The request fields must reach the
upstream in its own terms, the upstream's logprobs must come back in OpenAI's shapes (stream and whole), and
what a backend cannot honour (logit_bias on Ollama) is a 400 naming the param that never trips the breaker.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from appliance.app import create_app
from appliance.config import Settings
from tests.conftest import sse, streamed_logprobs
from tests.fakes import FakeEmbedder

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def top(token: str, lp: float) -> dict[str, Any]:
    return {"token": token, "logprob": lp, "bytes": list(token.encode())}


# What the upstream generates: "Hel" "lo" "€" (the euro sign split over two tokens, as bytes).
OPENAI_ENTRIES = [
    [{**top("Hel", -0.25), "top_logprobs": [top("Hel", -0.25), top("Hi", -1.5)]}],
    [{**top("lo", -0.5), "top_logprobs": [top("lo", -0.5), top("p", -2.0)]}],
    [
        {"token": "\\xe2\\x82", "logprob": -1.0, "bytes": [226, 130], "top_logprobs": [top("!", -0.75)]},
        {"token": "\\xac", "logprob": -0.125, "bytes": [172], "top_logprobs": [top("?", -0.0625)]},
    ],
]
PIECES = ["Hel", "lo", "€"]


def _openai_chat() -> list[dict]:
    base = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 0, "model": "up"}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    for text, entries in zip(PIECES, OPENAI_ENTRIES, strict=True):
        choice = {"index": 0, "delta": {"content": text}, "logprobs": {"content": entries}, "finish_reason": None}
        chunks.append({**base, "choices": [choice]})
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}})
    return chunks


def _openai_completion() -> list[dict]:
    base = {"id": "cmpl-up", "object": "text_completion", "created": 0, "model": "up"}
    chunks, offset = [], 0
    for text, entries in zip(PIECES, OPENAI_ENTRIES, strict=True):
        lp = {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": [offset] * len(entries),
        }
        offset += len(text)
        chunks.append({**base, "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": None}]})
    chunks.append({**base, "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})
    return chunks


def _ollama(chat: bool) -> list[dict]:
    base = {"model": "up", "created_at": "2026-01-01T00:00:00Z"}
    parts = []
    for text, entries in zip(PIECES, OPENAI_ENTRIES, strict=True):
        body = {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
        parts.append({**base, **body, "done": False, "logprobs": entries})
    last = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
    parts.append({**base, **last, "done": True, "done_reason": "stop", "prompt_eval_count": 5, "eval_count": 4})
    return parts


class Upstream:
    """A scripted OpenAI-compatible + Ollama server on loopback that records every request body."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict]] = []
        up = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                up.seen.append((self.path, body))
                if self.path == "/v1/chat/completions":
                    data = "".join(f"data: {json.dumps(c)}\n\n" for c in _openai_chat()) + "data: [DONE]\n\n"
                    kind = "text/event-stream"
                elif self.path == "/v1/completions":
                    data = "".join(f"data: {json.dumps(c)}\n\n" for c in _openai_completion()) + "data: [DONE]\n\n"
                    kind = "text/event-stream"
                elif self.path in ("/api/chat", "/api/generate"):
                    data = "".join(json.dumps(p) + "\n" for p in _ollama(self.path == "/api/chat"))
                    kind = "application/x-ndjson"
                else:
                    self.send_error(404)
                    return
                raw = data.encode()
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def bodies(self, path: str) -> list[dict]:
        return [b for p, b in self.seen if p == path]


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    yield up
    up.httpd.shutdown()
    up.httpd.server_close()


@contextlib.asynccontextmanager
async def client(tmp_path, upstream: Upstream):
    models = tmp_path / "models.toml"
    models.write_text(
        f"""
[[models]]
id = "up-remote"
[[models.backends]]
type = "remote"
base_url = "{upstream.url}/v1"
model = "up"

[[models]]
id = "up-ollama"
[[models.backends]]
type = "ollama"
base_url = "{upstream.url}"
model = "up"
"""
    )
    s = Settings(
        data_dir=tmp_path,
        models_file=models,
        default_model="up-remote",
        agent_enabled=False,
        embeddings_preload=False,
        keys_file=tmp_path / "keys.toml",
        retries=0,
    )
    app = create_app(s, embeddings=FakeEmbedder())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://appliance", timeout=30) as c:
            c.app = app  # type: ignore[attr-defined]
            yield c


EXPECTED = [  # what the client must get back: OpenAI's shape, the split character as bytes
    ("Hel", -0.25, [72, 101, 108], [("Hel", -0.25), ("Hi", -1.5)]),
    ("lo", -0.5, [108, 111], [("lo", -0.5), ("p", -2.0)]),
    ("bytes:\\xe2\\x82", -1.0, [226, 130], [("!", -0.75)]),
    ("bytes:\\xac", -0.125, [172], [("?", -0.0625)]),
]


def check_chat_entries(entries: list[dict], with_bytes: bool = True) -> None:
    got = [
        (e["token"], e["logprob"], e["bytes"], [(t["token"], t["logprob"]) for t in e["top_logprobs"]]) for e in entries
    ]
    if with_bytes:
        assert got == EXPECTED
    else:  # Ollama's client keeps no `bytes`: the split character's tokens come as the upstream spelled them
        assert [g[1] for g in got] == [e[1] for e in EXPECTED] and got[:2] == EXPECTED[:2]


async def test_remote_chat_forwards_logprobs_and_logit_bias(tmp_path, upstream: Upstream, openai_schema) -> None:
    async with client(tmp_path, upstream) as c:
        body = {**CHAT, "model": "up-remote", "logprobs": True, "top_logprobs": 2, "logit_bias": {"42": -100, "7": 2.5}}
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        sent = upstream.bodies("/v1/chat/completions")[-1]
        assert sent["logprobs"] is True and sent["top_logprobs"] == 2
        assert sent["logit_bias"] == {"42": -100.0, "7": 2.5}
        doc = r.json()
        openai_schema("CreateChatCompletionResponse", doc)
        assert doc["choices"][0]["message"]["content"] == "Hello€"
        content = doc["choices"][0]["logprobs"]["content"]
        check_chat_entries(content)
        assert bytes(b for e in content for b in e["bytes"]).decode() == "Hello€"

        r = await c.post("/v1/chat/completions", json={**body, "stream": True})
        chunks = sse(r.text)
        for ch in chunks:
            openai_schema("CreateChatCompletionStreamResponse", ch)
        streamed = streamed_logprobs(chunks)
        check_chat_entries(streamed)

        plain = await c.post("/v1/chat/completions", json={**CHAT, "model": "up-remote"})
        sent = upstream.bodies("/v1/chat/completions")[-1]
        assert "logprobs" not in sent and "top_logprobs" not in sent and "logit_bias" not in sent
        assert plain.json()["choices"][0]["logprobs"] is None


async def test_remote_completion_forwards_logprobs(tmp_path, upstream: Upstream, openai_schema) -> None:
    async with client(tmp_path, upstream) as c:
        body = {"model": "up-remote", "prompt": "Say", "max_tokens": 8, "logprobs": 2, "logit_bias": {"3": 1}}
        r = await c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        sent = upstream.bodies("/v1/completions")[-1]
        assert sent["logprobs"] == 2 and sent["logit_bias"] == {"3": 1.0} and "top_logprobs" not in sent
        doc = r.json()
        openai_schema("CreateCompletionResponse", doc)
        lp = doc["choices"][0]["logprobs"]
        assert doc["choices"][0]["text"] == "Hello€"
        assert lp["tokens"] == ["Hel", "lo", "\\xe2\\x82", "\\xac"]
        assert lp["token_logprobs"] == [-0.25, -0.5, -1.0, -0.125]
        assert lp["top_logprobs"][0] == {"Hel": -0.25, "Hi": -1.5}
        assert lp["text_offset"][:2] == [0, 3]


async def test_ollama_forwards_logprobs_and_returns_them(tmp_path, upstream: Upstream, openai_schema) -> None:
    async with client(tmp_path, upstream) as c:
        body = {**CHAT, "model": "up-ollama", "logprobs": True, "top_logprobs": 3}
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        sent = upstream.bodies("/api/chat")[-1]
        assert sent["logprobs"] is True and sent["top_logprobs"] == 3
        doc = r.json()
        openai_schema("CreateChatCompletionResponse", doc)
        assert doc["choices"][0]["message"]["content"] == "Hello€"
        check_chat_entries(doc["choices"][0]["logprobs"]["content"], with_bytes=False)

        r = await c.post("/v1/chat/completions", json={**body, "stream": True})
        check_chat_entries(streamed_logprobs(sse(r.text)), with_bytes=False)

        r = await c.post("/v1/completions", json={"model": "up-ollama", "prompt": "Say", "logprobs": 1})
        assert r.status_code == 200, r.text
        assert upstream.bodies("/api/generate")[-1]["top_logprobs"] == 1
        assert r.json()["choices"][0]["logprobs"]["token_logprobs"] == [-0.25, -0.5, -1.0, -0.125]

        await c.post("/v1/chat/completions", json={**CHAT, "model": "up-ollama"})
        sent = upstream.bodies("/api/chat")[-1]
        assert "logprobs" not in sent and "top_logprobs" not in sent


async def test_logit_bias_on_ollama_is_a_400_not_a_backend_failure(tmp_path, upstream: Upstream) -> None:
    async with client(tmp_path, upstream) as c:
        before = len(upstream.seen)
        for _ in range(c.app.state.settings.breaker_failures + 2):
            r = await c.post("/v1/chat/completions", json={**CHAT, "model": "up-ollama", "logit_bias": {"42": -100}})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "logit_bias" and err["type"] == "invalid_request_error", err
            assert "not supported" in err["message"] and "up-ollama" in err["message"]
        assert len(upstream.seen) == before  # refused before anything went upstream
        breakers = c.app.state.engine.breakers.values()
        assert all(b.state == "closed" and b.failures == 0 for b in breakers)
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "up-ollama"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello€"
