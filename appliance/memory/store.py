"""Long-term memory in Chroma: durable facts and turn summaries, scoped per user.

One `chromadb.PersistentClient` per process at `<data_dir>/memory`, or, for several boxes sharing memory,
a `chromadb.HttpClient` to a Chroma server (APPLIANCE_MEMORY_URL). Vectors come from our own embedding
service and are always passed explicitly: Chroma's default embedding function (which downloads a model)
is never used — no call here hands Chroma text without vectors. Every read filters on `scope`, so one
user's memories never reach another's prompts. Chroma calls are blocking; they run on one dedicated
thread, in order (the first job opens the client, so start-up never waits for the import).

Quota: with `max_per_scope`, a scope (a key) holding that many memories cannot add another (429
`quota_exceeded`); saving a memory it already has is not a new one. Counts per scope are taken once and
then kept up to date on the memory thread, where every write runs, so the check and the write are atomic.
On a Chroma server other nodes write too, so counts are taken afresh for every check (the quota may then
be overshot by writes racing on two nodes).
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
from urllib.parse import urlsplit

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


def quota_error(limit: int) -> Exception:
    from appliance.engine.types import EngineError, Error

    return EngineError(
        Error(
            429,
            f"Memory quota reached: this key already has {limit} memories, the most it may keep "
            f"(APPLIANCE_MAX_MEMORIES_PER_KEY={limit}). Delete memories it no longer needs "
            "(DELETE /v1/memories/{memory_id}, or DELETE /v1/memories for all of them) to save new ones.",
            "invalid_request_error",
            "quota_exceeded",
        )
    )


class MemoryStore:
    def __init__(self, path: Path, embedder: Embedder, max_per_scope: int | None = None, url: str | None = None):
        self.path = path
        self.url = url  # http(s)://host:port of a Chroma server; None: embedded at `path`
        self.embedder = embedder
        self.max_per_scope = max_per_scope or None  # 0/None: no limit
        self._counts: dict[str, int] = {}  # scope → memories; read and written on the memory thread only
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

            chroma_settings = ChromaSettings(anonymized_telemetry=False, allow_reset=False)
            if self.url is not None:
                u = urlsplit(self.url)
                https = u.scheme == "https"
                self._client = chromadb.HttpClient(
                    host=u.hostname or "127.0.0.1",
                    port=u.port or (443 if https else 8000),
                    ssl=https,
                    settings=chroma_settings,
                )
            else:
                self.path.mkdir(parents=True, exist_ok=True)
                self._client = chromadb.PersistentClient(path=str(self.path), settings=chroma_settings)
            self._col = self._client.get_or_create_collection(
                COLLECTION, embedding_function=None, metadata={"hnsw:space": "cosine"}
            )
            log.info("memory store open at %s (%d memories)", self.where, self._col.count())
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.error("memory store at %s failed to open: %s", self.where, self.error)
            raise

    @property
    def where(self) -> str:
        return self.url or str(self.path)

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
        mem = Memory(memory_id(scope, kind, text), text, kind, scope, thread_id, time.time())
        limit = self.max_per_scope
        if limit and not await self._run(self._has_room, scope, mem.id):
            raise quota_error(limit)  # before the embedding: a full key costs no model time
        [vector] = await self.embedder.embed([text])
        meta = {"scope": scope, "kind": kind, "created_at": mem.created_at, "thread_id": thread_id or ""}

        def run() -> bool:
            is_new = not self._col.get(ids=[mem.id], include=[])["ids"]
            if is_new and limit and self._scope_count(scope) >= limit:
                return False
            self._col.upsert(ids=[mem.id], embeddings=[vector], documents=[text], metadatas=[meta])
            if is_new and scope in self._counts:
                self._counts[scope] += 1
            return True

        if not await self._run(run):
            raise quota_error(limit or 0)
        return mem

    # memory thread only ---------------------------------------------------------------------------

    def _scope_count(self, scope: str) -> int:
        if scope not in self._counts or self.url is not None:  # a server: other nodes write too
            self._counts[scope] = len(self._col.get(where={"scope": scope}, include=[])["ids"])
        return self._counts[scope]

    def _has_room(self, scope: str, memory_id: str) -> bool:
        if self.max_per_scope is None or self._scope_count(scope) < self.max_per_scope:
            return True
        return bool(self._col.get(ids=[memory_id], include=[])["ids"])  # an update of one it has

    async def delete(self, memory_id: str, scope: str | None = None) -> bool:
        """Delete one memory (only if it belongs to `scope`, when given). False if there is no such memory."""
        mem = await self.get(memory_id)
        if mem is None or (scope is not None and mem.scope != scope):
            return False

        def run() -> None:
            self._col.delete(ids=[memory_id])
            self._counts.pop(mem.scope, None)

        await self._run(run)
        return True

    async def delete_scope(self, scope: str) -> int:
        def run() -> int:
            ids = self._col.get(where={"scope": scope}, include=[])["ids"]
            if ids:
                self._col.delete(ids=ids)
            self._counts[scope] = 0
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
        return await self._run(self._scope_count, scope)

    async def scope_counts(self) -> dict[str, int]:
        """scope → number of memories, for every owner."""

        def run() -> dict[str, int]:
            counts: dict[str, int] = {}
            for meta in self._col.get(include=["metadatas"])["metadatas"]:
                scope = str((meta or {}).get("scope", ""))
                counts[scope] = counts.get(scope, 0) + 1
            return counts

        return await self._run(run)

    # -- administration ----------------------------------------------------------------------------

    async def move_scope(self, old: str, new: str, threads: dict[str, str] | None = None) -> int:
        """Give every memory of `old` to `new` (`appliance data assign`), with the ids `new` would have given
        them (a fact both have is kept once) and their thread ids renamed by `threads` (old stored id → new).
        Not subject to the quota. Returns how many memories moved."""
        threads = threads or {}

        def run() -> int:
            r = self._col.get(where={"scope": old}, include=["documents", "metadatas", "embeddings"])
            if not r["ids"]:
                return 0
            ids, docs, metas = [], [], []
            for doc, meta in zip(r["documents"], r["metadatas"], strict=True):
                meta = dict(meta or {})
                kind = str(meta.get("kind", "fact"))
                tid = str(meta.get("thread_id") or "")
                meta.update(scope=new, thread_id=threads.get(tid) or threads.get(f"{old}:{tid}") or tid)
                ids.append(memory_id(new, kind, doc or ""))
                docs.append(doc or "")
                metas.append(meta)
            self._col.upsert(ids=ids, embeddings=list(r["embeddings"]), documents=docs, metadatas=metas)
            kept = set(ids)
            stale = [i for i in r["ids"] if i not in kept]
            if stale:
                self._col.delete(ids=stale)
            self._counts.pop(old, None)
            self._counts.pop(new, None)
            return len(r["ids"])

        return await self._run(run)
