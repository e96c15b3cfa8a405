"""Fallback llama.cpp → Ollama → remote with real protocol peers: a second appliance on loopback serves
as the Ollama server (reached through the real `ollama` client) and as the remote OpenAI-compatible API."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from langchain_ollama import ChatOllama

from appliance.catalog import embedded_smollm2
from tests.conftest import Server, start_server

pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory):
    """The upstream: an appliance that speaks Ollama's API and OpenAI's."""
    s = start_server(tmp_path_factory.mktemp("peer"), "--context-size", "2048", "--parallel", "2")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, peer: Server):
    tmp = tmp_path_factory.mktemp("front")
    corrupt = tmp / "corrupt.gguf"
    shutil.copyfile(embedded_smollm2()[0], corrupt)
    with corrupt.open("r+b") as f:
        f.truncate(40_000_000)
    models = tmp / "models.toml"
    models.write_text(
        f"""
[[models]]
id = "smol"
[[models.backends]]
type = "llamacpp"
path = "embedded:smollm2"
context_size = 2048

[[models]]
id = "via-ollama"
[[models.backends]]
type = "llamacpp"
path = "{tmp / "no-such-file.gguf"}"
[[models.backends]]
type = "ollama"
base_url = "{peer.base_url}"
model = "default"

[[models]]
id = "via-remote"
[[models.backends]]
type = "llamacpp"
path = "{corrupt}"
[[models.backends]]
type = "ollama"
base_url = "http://127.0.0.1:9"
model = "default"
[[models.backends]]
type = "remote"
base_url = "{peer.base_url}/v1"
model = "default"
api_key_env = "PEER_API_KEY"

[[models]]
id = "ollama-only"
[[models.backends]]
type = "ollama"
base_url = "{peer.base_url}"
model = "default"
"""
    )
    s = start_server(
        tmp,
        "--models-file",
        str(models),
        "--default-model",
        "smol",
        env={
            "APPLIANCE_BREAKER_FAILURES": "2",
            "APPLIANCE_BREAKER_COOLDOWN": "600",
            "APPLIANCE_RETRIES": "0",
            "PEER_API_KEY": "sk-peer-secret-value",
        },
    )
    yield s
    s.stop()


def chat(server: Server, model: str, **kw) -> httpx.Response:
    body = {"model": model, "messages": MSG, "max_tokens": 12, "temperature": 0, **kw}
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)


def circuit(server: Server, model: str) -> list[dict]:
    doc = server.health(verbose=True)
    return next(m for m in doc["models"] if m["id"] == model)["backends"]


def test_missing_file_falls_back_to_ollama_and_breaker_opens(front: Server, peer: Server) -> None:
    direct = httpx.post(
        f"{peer.base_url}/v1/chat/completions",
        json={"model": "default", "messages": MSG, "max_tokens": 12, "temperature": 0},
        timeout=60,
    ).json()["choices"][0]["message"]["content"]
    for _ in range(3):
        r = chat(front, "via-ollama")
        assert r.status_code == 200, r.text
        assert r.headers["x-appliance-backend"] == "ollama"
        assert r.json()["choices"][0]["message"]["content"] == direct  # same model, greedy, via Ollama's API
    llama, oll = circuit(front, "via-ollama")
    assert llama["state"] == "failed" and "not found" in llama["error"]
    assert llama["circuit"]["state"] == "open"  # 2 consecutive failures
    assert oll["circuit"]["state"] == "closed"
    failures = llama["circuit"]["consecutive_failures"]
    assert chat(front, "via-ollama", max_tokens=1).status_code == 200
    llama = circuit(front, "via-ollama")[0]
    assert llama["circuit"]["consecutive_failures"] == failures  # the dead backend was not even tried


def test_corrupt_gguf_and_refused_ollama_fall_back_to_remote(front: Server) -> None:
    r = chat(front, "via-remote")
    assert r.status_code == 200, r.text
    assert r.headers["x-appliance-backend"] == "remote"
    assert r.json()["usage"]["completion_tokens"] > 0
    llama, oll, remote = circuit(front, "via-remote")
    assert llama["state"] == "failed"
    assert "corrupt" in llama["error"] or "failed" in llama["error"] or "GGUF" in llama["error"]
    assert oll["circuit"]["consecutive_failures"] >= 1
    assert remote["circuit"]["state"] == "closed"
    assert "sk-peer-secret-value" not in front.log()  # keys stay out of logs and documents
    assert "sk-peer-secret-value" not in json.dumps(front.health(verbose=True))
    # streaming through the fallback, with the real OpenAI SDK
    client = openai.OpenAI(base_url=f"{front.base_url}/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(model="via-remote", messages=MSG, max_tokens=8, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # and plain completions
    r = httpx.post(
        f"{front.base_url}/v1/completions", json={"model": "via-remote", "prompt": "Hello", "max_tokens": 4}, timeout=60
    )
    assert r.status_code == 200 and r.headers["x-appliance-backend"] == "remote"


def test_client_errors_are_not_retried_elsewhere(front: Server) -> None:
    long = [{"role": "user", "content": "word " * 3000}]
    r = httpx.post(
        f"{front.base_url}/v1/chat/completions", json={"model": "smol", "messages": long, "max_tokens": 5}, timeout=60
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_mid_stream_failure_ends_stream_with_error_no_switch(front: Server, peer: Server) -> None:
    events = []
    body = {
        "model": "ollama-only",
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 1500,
        "stream": True,
    }
    with httpx.stream("POST", f"{front.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["x-appliance-backend"] == "ollama"
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 4:
                    os.kill(peer.worker_pid(), signal.SIGKILL)
    assert events[-1] == "[DONE]"
    assert "error" in json.loads(events[-2])
    deadline = time.monotonic() + 60
    while peer.backend()["state"] != "ready" and time.monotonic() < deadline:
        time.sleep(0.2)


def test_ollama_client_against_the_appliance(front: Server) -> None:
    c = ollama.Client(host=front.base_url)
    names = [m.model for m in c.list().models]
    assert {"smol", "via-ollama", "via-remote"} <= set(names)
    smol = next(m for m in c.list().models if m.model == "smol")
    assert smol.details.family == "llama" and smol.details.quantization_level == "Q4_1" and smol.size > 1e7
    r = c.chat(model="smol", messages=MSG, options={"num_predict": 8, "temperature": 0})
    assert r.done and r.message.role == "assistant" and r.message.content
    assert r.eval_count == 8 and r.prompt_eval_count > 0 and r.done_reason == "length"
    parts = list(c.chat(model="smol", messages=MSG, stream=True, options={"num_predict": 8, "temperature": 0}))
    assert "".join(p.message.content for p in parts) == r.message.content
    assert parts[-1].done and not parts[0].done
    g = c.generate(model="smol", prompt="The capital of France is", options={"num_predict": 5})
    assert g.response and g.done
    raw = c.generate(model="smol", prompt="1, 2, 3,", raw=True, options={"num_predict": 4, "temperature": 0})
    assert raw.response
    assert "smol" in [m.model for m in c.ps().models]
    assert c.show("smol").details.family == "llama"
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model="nope", messages=MSG)
    assert e.value.status_code == 404 and "not found" in e.value.error
    v = httpx.get(f"{front.base_url}/api/version").json()
    assert v["version"]
    bad = httpx.post(f"{front.base_url}/api/chat", content=b"{not json")
    assert bad.status_code == 400 and set(bad.json()) == {"error"}


def test_chat_ollama_langchain_client(front: Server) -> None:
    llm = ChatOllama(base_url=front.base_url, model="smol", num_predict=10, temperature=0)
    msg = llm.invoke("Hello!")
    assert msg.content
    streamed = "".join(c.content for c in llm.stream("Hello!"))
    assert streamed == msg.content


def test_breaker_half_open_probe_closes_again(tmp_path: Path, peer: Server) -> None:
    """A backend that comes back is used again after the cool-down (one probe, then closed)."""
    port_file = tmp_path / "models.toml"
    port_file.write_text(
        f"""
[[models]]
id = "smol"
[[models.backends]]
type = "llamacpp"
path = "embedded:smollm2"
context_size = 1024
parallel = 1

[[models]]
id = "flaky"
[[models.backends]]
type = "ollama"
base_url = "{peer.base_url}"
model = "no-such-model-yet"
[[models.backends]]
type = "remote"
base_url = "{peer.base_url}/v1"
model = "default"
"""
    )
    s = start_server(
        tmp_path,
        "--models-file",
        str(port_file),
        "--default-model",
        "smol",
        env={"APPLIANCE_BREAKER_FAILURES": "1", "APPLIANCE_BREAKER_COOLDOWN": "6", "APPLIANCE_RETRIES": "0"},
    )
    try:
        r = chat(s, "flaky", max_tokens=2)
        assert r.headers["x-appliance-backend"] == "remote"
        assert circuit(s, "flaky")[0]["circuit"]["state"] == "open"
        time.sleep(6.2)
        assert circuit(s, "flaky")[0]["circuit"]["state"] == "half-open"
        r = chat(s, "flaky", max_tokens=2)  # the probe fails (model still missing) → open again
        assert r.headers["x-appliance-backend"] == "remote"
        assert circuit(s, "flaky")[0]["circuit"]["state"] == "open"
    finally:
        s.stop()
