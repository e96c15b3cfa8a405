"""POST /v1/embeddings: validation and encoding (with a stand-in model), then end to end with the real
sentence-transformers model through the `openai` SDK."""

from __future__ import annotations

import base64
import math
import struct
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from starlette.applications import Starlette

from appliance.api import embeddings as embeddings_api
from appliance.api.errors import engine_error_handler
from appliance.engine.types import EngineError
from appliance.memory.embeddings import EMBEDDING_MODEL_ID
from tests.conftest import Server

# -- the adapter, with a stand-in model ------------------------------------------------------------


class StubEmbeddings:
    id = EMBEDDING_MODEL_ID
    dimensions = 384

    async def embed_with_usage(self, texts: list[str]) -> tuple[list[list[float]], int]:
        return [[float(len(t))] + [0.5] * 383 for t in texts], sum(len(t.split()) + 2 for t in texts)


class StubRegistry:
    def get(self, name: str):
        kinds = {EMBEDDING_MODEL_ID: "embedding", "smol": "chat"}
        if name not in kinds:
            raise EngineError.of(404, f"The model '{name}' does not exist.", code="model_not_found", param="model")
        return SimpleNamespace(id=name, kind=kinds[name])


@pytest.fixture
def http() -> httpx.AsyncClient:
    app = Starlette(routes=embeddings_api.routes, exception_handlers={EngineError: engine_error_handler})
    app.state.embeddings = StubEmbeddings()
    app.state.engine = SimpleNamespace(registry=StubRegistry())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_float_and_base64_shapes(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL_ID, "input": ["ab", "abcd"]})
    doc = r.json()
    assert r.status_code == 200 and doc["object"] == "list" and doc["model"] == EMBEDDING_MODEL_ID
    assert [d["index"] for d in doc["data"]] == [0, 1] and doc["data"][1]["embedding"][0] == 4.0
    assert doc["usage"] == {"prompt_tokens": 6, "total_tokens": 6}
    r = await http.post(
        "/v1/embeddings", json={"model": EMBEDDING_MODEL_ID, "input": "abc", "encoding_format": "base64"}
    )
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert len(raw) == 384 * 4 and struct.unpack("<384f", raw)[:2] == (3.0, 0.5)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": EMBEDDING_MODEL_ID, "input": ""}, 400, "input"),
        ({"model": EMBEDDING_MODEL_ID, "input": []}, 400, "input"),
        ({"model": EMBEDDING_MODEL_ID, "input": ["ok", "  "]}, 400, "input[1]"),
        ({"model": EMBEDDING_MODEL_ID, "input": [1, 2, 3]}, 400, "input"),
        ({"model": EMBEDDING_MODEL_ID, "input": {"a": 1}}, 400, "input"),
        ({"model": EMBEDDING_MODEL_ID}, 400, "input"),
        ({"input": "x"}, 400, "model"),
        ({"model": "smol", "input": "x"}, 400, "model"),
        ({"model": "nope", "input": "x"}, 404, "model"),
        ({"model": EMBEDDING_MODEL_ID, "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"model": EMBEDDING_MODEL_ID, "input": "x", "dimensions": 128}, 400, "dimensions"),
    ],
)
async def test_errors_are_openai_shaped(http: httpx.AsyncClient, body: dict, status: int, param: str) -> None:
    r = await http.post("/v1/embeddings", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


# -- end to end: the real model through the openai SDK -----------------------------------------------


def wait_for_embeddings(server: Server, timeout: float = 180) -> None:
    """Wait until the server's embedding model is loaded (starting it, if the server does not preload it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = server.health(verbose=True)
        entry = next(m for m in doc["models"] if m["id"] == EMBEDDING_MODEL_ID)
        state = entry["backends"][0]["state"]
        if state == "ready":
            return
        assert state != "failed", entry
        if state in ("idle", "stopped"):  # not preloaded: the first request starts the loading
            body = {"model": EMBEDDING_MODEL_ID, "input": "warm up"}
            httpx.post(f"{server.base_url}/v1/embeddings", json=body, timeout=timeout)
        time.sleep(0.25)
    raise TimeoutError("the embedding model did not load")


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.fixture(scope="module")
def client(appliance_server: Server) -> openai.OpenAI:
    wait_for_embeddings(appliance_server)
    return openai.OpenAI(base_url=f"{appliance_server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.mark.slow
def test_embeddings_with_the_openai_sdk(client: openai.OpenAI) -> None:
    texts = ["The cat sat on the mat.", "A kitten is resting on the rug.", "Quarterly tax filing deadlines."]
    r = client.embeddings.create(model=EMBEDDING_MODEL_ID, input=texts, encoding_format="float")
    assert r.model == EMBEDDING_MODEL_ID and [d.index for d in r.data] == [0, 1, 2]
    vecs = [d.embedding for d in r.data]
    assert all(len(v) == 384 for v in vecs)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vecs)
    assert cosine(vecs[0], vecs[1]) > cosine(vecs[0], vecs[2]) + 0.2
    assert r.usage.prompt_tokens > len(texts) and r.usage.total_tokens == r.usage.prompt_tokens

    # the SDK's default asks for base64 and decodes it; explicit base64 comes back as the raw string
    implicit = client.embeddings.create(model=EMBEDDING_MODEL_ID, input=texts)
    assert all(
        max(abs(x - y) for x, y in zip(d.embedding, v, strict=True)) < 1e-6
        for d, v in zip(implicit.data, vecs, strict=True)
    )
    explicit = client.embeddings.create(model=EMBEDDING_MODEL_ID, input=texts[0], encoding_format="base64")
    decoded = struct.unpack("<384f", base64.b64decode(explicit.data[0].embedding))
    assert max(abs(x - y) for x, y in zip(decoded, vecs[0], strict=True)) < 1e-6

    t0 = time.monotonic()
    client.embeddings.create(model=EMBEDDING_MODEL_ID, input="How long does one short sentence take?")
    print(f"\none embedding round trip: {1000 * (time.monotonic() - t0):.0f} ms")


@pytest.mark.slow
def test_embedding_errors_with_the_openai_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMBEDDING_MODEL_ID, input="")
    assert e.value.param == "input"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=EMBEDDING_MODEL_ID, messages=[{"role": "user", "content": "hi"}])
    assert e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="default", input="hi")
    assert e.value.param == "model"
    assert EMBEDDING_MODEL_ID in [m.id for m in client.models.list().data]


@pytest.mark.slow
def test_ollama_embed_counts_tokens_like_the_openai_route(client: openai.OpenAI, appliance_server: Server) -> None:
    texts = ["Tokenizers split unfamiliar words: antidisestablishmentarianism.", "Two words"]
    usage = client.embeddings.create(model=EMBEDDING_MODEL_ID, input=texts).usage
    r = httpx.post(
        f"{appliance_server.base_url}/api/embed", json={"model": EMBEDDING_MODEL_ID, "input": texts}, timeout=60
    )
    assert r.status_code == 200
    doc = r.json()
    assert len(doc["embeddings"]) == 2 and len(doc["embeddings"][0]) == 384
    assert doc["prompt_eval_count"] == usage.prompt_tokens > sum(len(t.split()) for t in texts)
