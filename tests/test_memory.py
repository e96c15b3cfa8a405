"""Long-term memory: the Chroma store (scoping, dedupe, persistence) and the embedding service's waiting."""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import threading
from pathlib import Path

import pytest

from appliance.engine.types import EngineError
from appliance.memory.embeddings import EmbeddingService
from appliance.memory.store import MemoryStore


class WordsEmbedder:
    """Bag-of-words vectors: texts sharing words are near. Stands in for sentence-transformers here."""

    dims = 64

    async def embed(self, texts: list[str]) -> list[list[float]]:
        out = []
        for t in texts:
            v = [0.0] * self.dims
            for w in re.findall(r"\w+", t.lower()):
                v[int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dims] += 1.0
            n = math.sqrt(sum(x * x for x in v)) or 1.0
            out.append([x / n for x in v])
        return out


@pytest.fixture
async def store(tmp_path: Path):
    s = MemoryStore(tmp_path / "memory", WordsEmbedder())
    s.start()
    yield s
    await asyncio.to_thread(s.close)


async def test_memories_are_scoped_per_user(store: MemoryStore) -> None:
    await store.add("alice", "The user's name is Alice.")
    await store.add("alice", "The user likes green tea.")
    await store.add("bob", "The user's name is Bob.")
    found = await store.search("bob", "what is the user's name", k=10)
    assert [m.text for m in found] == ["The user's name is Bob."]
    found = await store.search("alice", "green tea", k=1)
    assert [m.text for m in found] == ["The user likes green tea."]
    assert found[0].to_dict()["score"] > 0.5
    assert await store.search("carol", "name", k=5) == []
    mems, more = await store.list("alice")
    assert {m.text for m in mems} == {"The user's name is Alice.", "The user likes green tea."} and not more
    page, more = await store.list("alice", limit=1)
    assert len(page) == 1 and more


async def test_same_fact_is_kept_once_and_deletes_respect_scope(store: MemoryStore) -> None:
    a = await store.add("alice", "The user likes  green tea.")
    b = await store.add("alice", "the user likes green tea.")
    assert a.id == b.id and await store.count("alice") == 1
    assert not await store.delete(a.id, scope="bob")  # another user's memory: not found for bob
    assert await store.delete(a.id, scope="alice")
    assert not await store.delete(a.id)
    await store.add("bob", "one")
    await store.add("bob", "two")
    assert await store.delete_scope("bob") == 2 and await store.count() == 0


async def test_summaries_of_the_current_thread_are_left_out(store: MemoryStore) -> None:
    await store.add("u", "summary of thread one about cats", kind="summary", thread_id="t1")
    await store.add("u", "summary of thread two about cats", kind="summary", thread_id="t2")
    await store.add("u", "fact about cats", kind="fact", thread_id="t1")
    found = await store.search("u", "cats", k=10, exclude_thread="t1")
    assert {m.text for m in found} == {"summary of thread two about cats", "fact about cats"}


async def test_memories_persist_across_reopen(tmp_path: Path) -> None:
    s = MemoryStore(tmp_path / "memory", WordsEmbedder())
    await s.add("alice", "The user's name is Alice.")
    await asyncio.to_thread(s.close)
    s2 = MemoryStore(tmp_path / "memory", WordsEmbedder())
    try:
        assert [m.text for m in await s2.search("alice", "name", k=3)] == ["The user's name is Alice."]
    finally:
        await asyncio.to_thread(s2.close)


async def test_embedding_service_waits_then_503s_while_loading() -> None:
    gate = threading.Event()

    class Model:
        def encode(self, texts, **kw):
            import numpy as np

            return np.ones((len(texts), 4), dtype="float32") / 2

    def loader():
        gate.wait(10)
        return Model()

    svc = EmbeddingService(wait=0.2, loader=loader)
    svc.start()
    assert svc.state == "loading"
    with pytest.raises(EngineError) as e:
        await svc.embed(["x"])
    assert e.value.error.status == 503 and e.value.error.code == "embeddings_loading"
    gate.set()
    assert await svc.embed(["x", "y"]) == [[0.5] * 4, [0.5] * 4]
    assert svc.state == "ready"
    svc.close()


async def test_embedding_service_reports_a_failed_load() -> None:
    def loader():
        raise RuntimeError("no model here")

    svc = EmbeddingService(wait=5, loader=loader)
    svc.start()
    with pytest.raises(EngineError) as e:
        await svc.embed(["x"])
    assert e.value.error.status == 503 and "no model here" in e.value.error.message
    assert svc.state == "failed"
    svc.close()
