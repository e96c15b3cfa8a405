"""Long-term memory in Chroma: durable facts and turn summaries, scoped per user.

One `chromadb.PersistentClient` per process at `<data_dir>/memory`. Vectors come from our own embedding
service and are always passed explicitly: Chroma's default embedding function (which downloads a model)
is never used — no call here hands Chroma text without vectors. Every read filters on `scope`, so one
user's memories never reach another's prompts. Chroma calls are blocking; they run on one dedicated
thread, in order (the first job opens the client, so start-up never waits for the import).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("appliance.memory")

COLLECTION = "memories"
KINDS = ("fact", "summary")
MAX_TEXT = 2000


class Embedder(Protocol):
    async def embed(self, texts: list[str]) -> list[list[float]]: ...


@dataclass
class Memory:
    id: str
    text: str
    kind: str
    scope: str
    thread_id: str | None
    created_at: float
    distance: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "object": "memory",
            "text": self.text,
            "kind": self.kind,
            "user": self.scope,
            "thread_id": self.thread_id,
            "created_at": int(self.created_at),
        }
        if self.distance is not None:
            d["score"] = round(1.0 - self.distance, 4)  # cosine similarity
        return d


def memory_id(scope: str, kind: str, text: str) -> str:
    """Deterministic: saving the same fact twice for one user keeps one copy."""
    norm = " ".join(text.lower().split())
    return "mem_" + hashlib.sha256(f"{scope}\0{kind}\0{norm}".encode()).hexdigest()[:24]


def _from_chroma(id_: str, doc: str | None, meta: dict[str, Any] | None, distance: float | None = None) -> Memory:
    meta = meta or {}
    return Memory(
        id=id_,
        text=doc or "",
        kind=str(meta.get("kind", "fact")),
        scope=str(meta.get("scope", "")),
        thread_id=meta.get("thread_id") or None,
        created_at=float(meta.get("created_at", 0.0)),
        distance=distance,
    )


class MemoryStore:
    def __init__(self, path: Path, embedder: Embedder):
        self.path = path
        self.embedder = embedder
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory")
        self._client: Any = None
        self._col: Any = None
        self._opened: Future | None = None
        self.error: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Queue opening the store on the memory thread (returns at once)."""
        if self._opened is None:
            self._opened = self._pool.submit(self._open)

    def _open(self) -> None:
        try:
            import chromadb
            from chromadb.config import Settings as ChromaSettings

            self.path.mkdir(parents=True, exist_ok=True)
            self._client = chromadb.PersistentClient(
                path=str(self.path), settings=ChromaSettings(anonymized_telemetry=False, allow_reset=False)
            )
            self._col = self._client.get_or_create_collection(
                COLLECTION, embedding_function=None, metadata={"hnsw:space": "cosine"}
            )
            log.info("memory store open at %s (%d memories)", self.path, self._col.count())
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.error("memory store at %s failed to open: %s", self.path, self.error)
            raise

    @property
    def ready(self) -> bool:
        return self._col is not None

    async def _run(self, fn, *args: Any) -> Any:
        self.start()
        assert self._opened is not None
        try:
            await asyncio.wrap_future(self._opened)
        except Exception:
            from appliance.engine.types import EngineError

            raise EngineError.of(
                503, f"The memory store failed to open: {self.error}", "server_error", "memory_failed"
            ) from None
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- writes ----------------------------------------------------------------------------------

    async def add(self, scope: str, text: str, kind: str = "fact", thread_id: str | None = None) -> Memory:
        text = " ".join(text.split())[:MAX_TEXT]
        if not text:
            raise ValueError("empty memory")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        [vector] = await self.embedder.embed([text])
        mem = Memory(memory_id(scope, kind, text), text, kind, scope, thread_id, time.time())
        meta = {"scope": scope, "kind": kind, "created_at": mem.created_at, "thread_id": thread_id or ""}
        await self._run(lambda: self._col.upsert(ids=[mem.id], embeddings=[vector], documents=[text], metadatas=[meta]))
        return mem

    async def delete(self, memory_id: str, scope: str | None = None) -> bool:
        """Delete one memory (only if it belongs to `scope`, when given). False if there is no such memory."""
        mem = await self.get(memory_id)
        if mem is None or (scope is not None and mem.scope != scope):
            return False
        await self._run(lambda: self._col.delete(ids=[memory_id]))
        return True

    async def delete_scope(self, scope: str) -> int:
        def run() -> int:
            ids = self._col.get(where={"scope": scope}, include=[])["ids"]
            if ids:
                self._col.delete(ids=ids)
            return len(ids)

        return await self._run(run)

    # -- reads -----------------------------------------------------------------------------------

    async def get(self, memory_id: str) -> Memory | None:
        r = await self._run(lambda: self._col.get(ids=[memory_id], include=["documents", "metadatas"]))
        if not r["ids"]:
            return None
        return _from_chroma(r["ids"][0], r["documents"][0], r["metadatas"][0])

    async def list(self, scope: str, limit: int = 100, offset: int = 0) -> tuple[list[Memory], bool]:
        """Newest first: (page, has_more)."""

        def run() -> list[Memory]:
            r = self._col.get(where={"scope": scope}, include=["documents", "metadatas"])
            return [_from_chroma(i, d, m) for i, d, m in zip(r["ids"], r["documents"], r["metadatas"], strict=True)]

        mems = sorted(await self._run(run), key=lambda m: (m.created_at, m.id), reverse=True)
        return mems[offset : offset + limit], len(mems) > offset + limit

    async def search(
        self, scope: str, query: str, k: int = 4, exclude_thread: str | None = None, max_distance: float | None = None
    ) -> list[Memory]:
        """The `k` memories of `scope` nearest to `query`. With `exclude_thread`, summaries of that thread
        are left out (its history is already in the prompt); its facts are kept."""
        if k <= 0 or not query.strip():
            return []
        [vector] = await self.embedder.embed([query])
        where: dict[str, Any] = {"scope": scope}
        if exclude_thread:
            where = {"$and": [{"scope": scope}, {"$or": [{"kind": "fact"}, {"thread_id": {"$ne": exclude_thread}}]}]}

        def run() -> list[Memory]:
            r = self._col.query(
                query_embeddings=[vector], n_results=k, where=where, include=["documents", "metadatas", "distances"]
            )
            return [
                _from_chroma(i, d, m, dist)
                for i, d, m, dist in zip(
                    r["ids"][0], r["documents"][0], r["metadatas"][0], r["distances"][0], strict=True
                )
            ]

        found = [m for m in await self._run(run) if m.scope == scope]  # `where` isolates; belt and braces
        if max_distance is not None:
            found = [m for m in found if m.distance is not None and m.distance <= max_distance]
        return found

    async def count(self, scope: str | None = None) -> int:
        if scope is None:
            return await self._run(lambda: self._col.count())
        return await self._run(lambda: len(self._col.get(where={"scope": scope}, include=[])["ids"]))
