"""The embedding model costs nothing until used: no torch anywhere before the first request that needs a vector.

Fast tier: the loading logic of EmbeddingService (first use starts it, a slow load answers 503
`embeddings_loading`, a failed one 503 `embeddings_failed` with the reason and is retried later) and the
app's lifespan (nothing loads at start unless APPLIANCE_EMBEDDINGS_PRELOAD, which waits for the chat model).
Slow tier: a real server holds no torch process until the first agent turn, which then works.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from appliance.app import create_app
from appliance.config import Settings
from appliance.engine.types import EngineError
from appliance.memory import embeddings as emb
from appliance.memory.embeddings import EMBEDDING_MODEL_ID, EmbeddingService
from tests.conftest import start_server
from tests.fakes import Scripted


class Model:
    def encode_with_usage(self, texts: list[str]) -> tuple[list[list[float]], int]:
        return [[1.0, 0.0] for _ in texts], len(texts)


def counting_loader(calls: list[float], delay: float = 0.0, fail: bool = False):
    def load() -> Model:
        calls.append(time.monotonic())
        time.sleep(delay)
        if fail:
            raise OSError("no space left on device")
        return Model()

    return load


def test_the_default_is_to_load_on_first_use() -> None:
    assert Settings(_env_file=None).embeddings_preload is False


async def test_nothing_loads_until_the_first_request_needs_a_vector() -> None:
    calls: list[float] = []
    svc = EmbeddingService(wait=5, loader=counting_loader(calls))
    await asyncio.sleep(0.05)
    assert calls == [] and svc.state == "idle" and not svc.ready
    assert await svc.embed(["a", "b"]) == [[1.0, 0.0], [1.0, 0.0]]
    assert len(calls) == 1 and svc.state == "ready"
    await svc.embed(["c"])
    assert len(calls) == 1  # loaded once
    svc.close()
    assert svc.state == "stopped"


async def test_a_slow_load_answers_503_loading_and_goes_on() -> None:
    calls: list[float] = []
    svc = EmbeddingService(wait=0.1, loader=counting_loader(calls, delay=0.6))
    with pytest.raises(EngineError) as e:
        await svc.embed(["a"])
    assert e.value.error.status == 503 and e.value.error.code == "embeddings_loading"
    assert e.value.error.retry_after and svc.state == "loading"
    await svc.wait_ready(timeout=5)  # the load went on in the background
    assert await svc.embed(["a"]) == [[1.0, 0.0]] and len(calls) == 1


async def test_a_failed_load_says_why_and_is_retried_later(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []
    loader = counting_loader(calls, fail=True)
    svc = EmbeddingService(wait=5, loader=lambda: loader())
    with pytest.raises(EngineError) as e:
        await svc.embed(["a"])
    assert e.value.error.status == 503 and e.value.error.code == "embeddings_failed"
    assert "no space left on device" in e.value.error.message and svc.state == "failed"
    with pytest.raises(EngineError):  # within RETRY_FAILED_AFTER: the same answer, no new attempt
        await svc.embed(["a"])
    assert len(calls) == 1
    monkeypatch.setattr(emb, "RETRY_FAILED_AFTER", 0.0)
    loader = counting_loader(calls)  # the cause is fixed
    assert await svc.embed(["a"]) == [[1.0, 0.0]] and len(calls) == 2


def _app(tmp_path: Path, svc: EmbeddingService, **kw) -> object:
    s = Settings(_env_file=None, data_dir=tmp_path, keys_file=tmp_path / "keys.toml", **kw)
    return create_app(s, backend_factories={"llamacpp": lambda model_id, spec: Scripted()}, embeddings=svc)


async def test_the_app_starts_without_loading_the_embedding_model_or_opening_the_agent(tmp_path: Path) -> None:
    calls: list[float] = []
    svc = EmbeddingService(wait=5, loader=counting_loader(calls))
    app = _app(tmp_path, svc, agent_enabled=True)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://appliance") as c:
            assert (await c.get("/health")).status_code == 200
            await asyncio.sleep(0.3)
            doc = (await c.get("/health", params={"verbose": 1})).json()
            state = next(m for m in doc["models"] if m["id"] == EMBEDDING_MODEL_ID)["backends"][0]["state"]
            assert state == "idle" and calls == []
            assert app.state.agent.graph is None and not app.state.agent.memory.ready
            r = await c.post("/v1/embeddings", json={"model": EMBEDDING_MODEL_ID, "input": "first use"})
            assert r.status_code == 200 and len(calls) == 1


async def test_preload_loads_in_the_background_once_the_chat_model_is_ready(tmp_path: Path) -> None:
    calls: list[float] = []
    loaded = threading.Event()

    def loader() -> Model:
        calls.append(time.monotonic())
        loaded.set()
        return Model()

    svc = EmbeddingService(wait=5, loader=loader)
    app = _app(tmp_path, svc, agent_enabled=False, embeddings_preload=True)
    async with app.router.lifespan_context(app):
        await asyncio.to_thread(loaded.wait, 5)
        assert len(calls) == 1


def _tree(pid: int) -> list[psutil.Process]:
    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]


def _maps_torch(p: psutil.Process) -> bool:
    try:
        return any("torch" in m.path for m in p.memory_maps())
    except psutil.Error:
        return False


@pytest.mark.slow
def test_a_real_server_holds_no_torch_until_the_first_agent_turn_which_works(tmp_path: Path) -> None:
    # Generous bounds: on a busy 2-core box importing torch can take minutes. (This checks function, not time.)
    env = {
        "APPLIANCE_EMBEDDINGS_WAIT": "400",
        "APPLIANCE_AGENT_TIMEOUT": "400",
        "APPLIANCE_FIRST_TOKEN_TIMEOUT": "400",
        "APPLIANCE_REQUEST_DEADLINE": "500",
    }
    server = start_server(tmp_path, "--context-size", "2048", env=env)
    try:
        procs = _tree(server.proc.pid)
        assert not any(_maps_torch(p) for p in procs)
        workers = [p for p in procs[1:] if "resource_tracker" not in " ".join(p.cmdline())]
        assert len(workers) == 1  # the chat model's worker; no embedding process
        assert procs[0].memory_info().rss < 200 * 2**20  # the API process: no langgraph, Chroma or torch
        assert server.backend(EMBEDDING_MODEL_ID)["state"] == "idle"

        # The first agent turn opens the agent and loads the embedding model (memory search), then answers.
        body = {"model": "agent", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}
        r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=900)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["role"] == "assistant"
        assert server.backend(EMBEDDING_MODEL_ID)["state"] == "ready"

        torch_procs = [p for p in _tree(server.proc.pid) if _maps_torch(p)]
        assert len(torch_procs) == 1 and torch_procs[0].pid != server.proc.pid  # never in the API process
        assert torch_procs[0].nice() >= min(19, procs[0].nice() + 10)  # yields the cores to generation
        r = httpx.post(
            f"{server.base_url}/v1/embeddings", json={"model": EMBEDDING_MODEL_ID, "input": "now"}, timeout=60
        )
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
    finally:
        server.stop()
