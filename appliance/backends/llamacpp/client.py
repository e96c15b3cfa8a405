"""The API-process side of a llama.cpp model: spawns, supervises and talks to its worker process.

A reader thread turns pipe messages into per-request asyncio queues. If the worker dies, every
in-flight request ends with a 503 and a fresh worker is started (with back-off on crash loops).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing as mp
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil

from appliance.backends.llamacpp import worker as worker_mod
from appliance.catalog import ModelFileError, resolve_model_path
from appliance.config import LlamaCppBackendSpec, Settings
from appliance.engine.residency import Residency
from appliance.engine.types import EngineError, Error, Event, Finish, GenerateRequest, Token, Usage

log = logging.getLogger("appliance.llamacpp")
_SPAWN = mp.get_context("spawn")


class WorkerProcess:
    """One worker process and the thread that reads its pipe."""

    def __init__(self, spec: dict[str, Any], loop: asyncio.AbstractEventLoop, on_message, on_exit):
        self.loop = loop
        self._on_message = on_message
        self._on_exit = on_exit
        self.conn, child = _SPAWN.Pipe()
        self.proc = _SPAWN.Process(target=worker_mod.main, args=(child, spec), daemon=True)
        self.proc.start()
        child.close()
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read, name=f"worker-reader-{self.proc.pid}", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def send(self, msg: tuple) -> bool:
        try:
            with self._send_lock:
                self.conn.send(msg)
            return True
        except (OSError, ValueError):
            return False

    def _read(self) -> None:
        try:
            while True:
                msg = self.conn.recv()
                self._call(self._on_message, self, msg)
        except (EOFError, OSError):
            pass
        self.proc.join()
        self._call(self._on_exit, self, self.proc.exitcode)

    def _call(self, fn, *args) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are shutting down
            self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit; kill it if it does not."""
        self.send(("stop",))
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2)
        with contextlib.suppress(OSError):
            self.conn.close()


class LlamaCppBackend:
    """A GGUF model served by a supervised worker process, with a bounded admission queue."""

    name = "llamacpp"

    def __init__(
        self, model_id: str, spec: LlamaCppBackendSpec, settings: Settings, residency: Residency | None = None
    ):
        self.model_id = model_id
        self.spec = spec
        self.settings = settings
        self.residency = residency
        if residency is not None:
            residency.register(self)
        self.parallel = spec.parallel or settings.parallel
        self.state = "idle"  # idle | loading | ready | unloaded | failed | stopped
        self.pinned = False  # the default model: never unloaded for idleness (eviction still may)
        self.last_used = time.monotonic()
        self.expires_at: float | None = None  # when keep-alive runs out (monotonic); None: never
        self._rss_seen = 0
        self.last_error: str | None = None
        self.info: dict[str, Any] = {}
        self.restarts = 0
        self.path: Path | None = None
        self._worker: WorkerProcess | None = None
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._pending: dict[str, asyncio.Queue] = {}
        self._stats_waiters: list[asyncio.Future] = []
        self._slots = asyncio.Semaphore(self.parallel)
        self._waiting = 0
        self._in_flight = 0
        self._closing = False
        self._crashes: list[float] = []
        self._failed_at = 0.0
        self._start_task: asyncio.Task | None = None

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def serviceable(self) -> bool:
        """Ready, or unloaded and able to load again on the next request."""
        return self.state in ("ready", "unloaded")

    @property
    def loaded(self) -> bool:
        return self.state in ("loading", "ready") and self._worker is not None

    @property
    def busy(self) -> bool:
        return self._in_flight > 0 or self._waiting > 0

    def memory(self) -> int:
        """Bytes the worker uses now (RSS), or an estimate while it loads."""
        w = self._worker
        if w is not None and w.pid is not None and self.state == "ready":
            with contextlib.suppress(psutil.Error):
                self._rss_seen = psutil.Process(w.pid).memory_info().rss
                return self._rss_seen
        return self.estimate()

    def estimate(self) -> int:
        """What loading this model will take: what it took last time, else 1.5x the file plus KV room."""
        if self._rss_seen:
            return self._rss_seen
        size = self.path.stat().st_size if self.path and self.path.exists() else 0
        return int(size * 1.5) + (64 << 20)

    async def unload(self, reason: str) -> None:
        w, self._worker = self._worker, None
        self.state = "unloaded"
        self._ready.clear()
        if w is not None:
            log.info("model %s: unloading (%s), worker pid %s", self.model_id, reason, w.pid)
            await asyncio.to_thread(w.stop)

    async def start(self) -> None:
        if self.state in ("loading", "ready") or self._closing:
            return
        self.state = "loading"
        self.expires_at = None  # a stale keep-alive must not unload the model we are loading now
        self._ready.clear()
        self._start_task = asyncio.create_task(self._spawn())

    async def _spawn(self, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        if self._closing:
            return
        try:
            self.path = await asyncio.to_thread(
                resolve_model_path, self.spec.path, self.settings.models_dir, sys.stderr.isatty()
            )
            await asyncio.to_thread(worker_mod.check_gguf, str(self.path))
        except (ModelFileError, ValueError) as e:
            self._fail(str(e))
            return
        if self.residency is not None:
            await self.residency.make_room(self, self.estimate())
        if self._closing or self.state != "loading":
            return
        s, spec = self.settings, self.spec
        wspec = {
            "path": str(self.path),
            "context_size": spec.context_size or s.context_size,
            "threads": spec.threads or s.threads,
            "gpu_layers": spec.gpu_layers if spec.gpu_layers is not None else s.gpu_layers,
            "parallel": self.parallel,
            "batch_size": spec.batch_size or s.batch_size,
            "ubatch_size": spec.ubatch_size or s.ubatch_size,
            "chat_template": spec.chat_template,
            "stream_interval": s.stream_interval,
            "verbose": s.log_level == "debug",
        }
        self._worker = WorkerProcess(wspec, asyncio.get_running_loop(), self._on_message, self._on_exit)
        log.info("model %s: worker pid %s loading %s", self.model_id, self._worker.pid, self.path)

    def _fail(self, message: str) -> None:
        log.error("model %s failed to load: %s", self.model_id, message)
        self.state, self.last_error, self._failed_at = "failed", message, time.monotonic()
        self._changed.set()
        self._changed = asyncio.Event()

    async def close(self) -> None:
        self._closing = True
        self.state = "stopped"
        if self._start_task is not None:
            self._start_task.cancel()
        w, self._worker = self._worker, None
        if w is not None:
            await asyncio.to_thread(w.stop)
        self._fail_pending("the appliance is shutting down")

    # -- pipe callbacks (event loop thread) -------------------------------------------------
    def _on_message(self, w: WorkerProcess, msg: tuple) -> None:
        if w is not self._worker:
            return
        kind = msg[0]
        if kind == "ev":
            for req_id, ev_kind, data in msg[1]:
                q = self._pending.get(req_id)
                if q is not None:
                    q.put_nowait((ev_kind, data))
        elif kind == "ready":
            self.info = msg[1]
            self.state, self.last_error = "ready", None
            self._ready.set()
            self._changed.set()
            self._changed = asyncio.Event()
            log.info(
                "model %s ready (pid %s, %s slots x %s ctx)",
                self.model_id,
                w.pid,
                self.info.get("slots"),
                self.info.get("n_ctx"),
            )
        elif kind == "fatal":
            self._worker = None
            self._fail(msg[1])
        elif kind == "stats":
            waiters, self._stats_waiters = self._stats_waiters, []
            for f in waiters:
                if not f.done():
                    f.set_result(msg[1])

    def _on_exit(self, w: WorkerProcess, exitcode: int | None) -> None:
        if w is not self._worker:
            return
        self._worker = None
        self._ready.clear()
        if self._closing:
            return
        log.error("model %s: worker pid %s died (exit code %s)", self.model_id, w.pid, exitcode)
        self._fail_pending("The model worker stopped unexpectedly; the request was not completed.")
        now = time.monotonic()
        self._crashes = [t for t in self._crashes if now - t < 60] + [now]
        delay = min(30.0, 0.5 * 2 ** (len(self._crashes) - 1)) if len(self._crashes) > 1 else 0.0
        self.restarts += 1
        self.state = "loading"
        self._start_task = asyncio.get_running_loop().create_task(self._spawn(delay))

    def _fail_pending(self, message: str) -> None:
        for q in self._pending.values():
            q.put_nowait(("died", message))

    # -- serving ----------------------------------------------------------------------------
    async def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.state != "ready":
            if self.state == "failed":
                if time.monotonic() - self._failed_at < 10:
                    raise EngineError.of(
                        503,
                        f"Model '{self.model_id}' failed to load: {self.last_error}",
                        type="server_error",
                        code="model_load_failed",
                    )
                self.state = "idle"
            if self.state in ("idle", "unloaded") and not self._closing:
                await self.start()
            left = deadline - time.monotonic()
            if left <= 0 or self._closing:
                raise EngineError.of(
                    503,
                    f"Model '{self.model_id}' is still loading; retry shortly.",
                    type="server_error",
                    code="model_loading",
                )
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(left, 1.0))

    async def _admit(self) -> None:
        s = self.settings
        if self._slots.locked() and self._waiting >= s.max_queue:
            raise EngineError(
                Error(
                    503,
                    f"Model '{self.model_id}' is at capacity ({self.parallel} running, "
                    f"{self._waiting} queued); retry shortly.",
                    "server_error",
                    "queue_full",
                    retry_after=1.0,
                )
            )
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), s.queue_timeout)
        except TimeoutError:
            raise EngineError(
                Error(
                    503,
                    f"Timed out after {s.queue_timeout:g}s waiting for model '{self.model_id}'.",
                    "server_error",
                    "queue_timeout",
                    retry_after=1.0,
                )
            ) from None
        finally:
            self._waiting -= 1

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        await self._admit()
        self._in_flight += 1
        try:
            await self._wait_ready(self.settings.worker_start_timeout)
            async for ev in self._run(req):
                yield ev
        finally:
            self._in_flight -= 1
            self._slots.release()
            self._touch(req.keep_alive)

    async def load(self, keep_alive: float | None = None) -> None:
        """Load now (Ollama's empty generate request) and start the keep-alive clock."""
        self._in_flight += 1  # busy while it loads: the keep-alive reaper leaves it alone
        try:
            await self._wait_ready(self.settings.worker_start_timeout)
        finally:
            self._in_flight -= 1
        self._touch(keep_alive)

    def _touch(self, keep_alive: float | None) -> None:
        """Note a use; restart the keep-alive clock (Ollama semantics: < 0 forever, 0 unload now)."""
        now = time.monotonic()
        self.last_used = now
        ka = self.settings.keep_alive if keep_alive is None else keep_alive
        if keep_alive is None and self.pinned:
            ka = -1
        self.expires_at = None if ka < 0 else now + ka

    async def _run(self, req: GenerateRequest) -> AsyncIterator[Event]:
        req_id = req.request_id or uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        self._pending[req_id] = q
        w = self._worker
        done = False
        try:
            params = dataclasses.asdict(req.params)
            payload = {
                "messages": [{"role": m.role, "content": m.content} for m in req.messages]
                if req.messages is not None
                else None,
                "prompt": req.prompt,
                "params": params,
                "default_max_tokens": self.settings.default_max_tokens,
            }
            if w is None or not w.send(("gen", req_id, payload)):
                raise EngineError.of(
                    503, "The model worker is not running.", type="server_error", code="worker_unavailable"
                )
            usage = Usage()
            while True:
                kind, data = await q.get()
                if kind == "token":
                    yield Token(data)
                elif kind == "start":
                    usage.prompt_tokens, usage.cached_tokens = data["prompt_tokens"], data["cached_tokens"]
                elif kind == "finish":
                    done = True
                    u = data["usage"]
                    yield Finish(data["reason"], Usage(u["prompt_tokens"], u["completion_tokens"], u["cached_tokens"]))
                    return
                elif kind == "error":
                    done = True
                    yield Error(
                        data["status"],
                        data["message"],
                        data.get("type") or "server_error",
                        data.get("code"),
                        data.get("param"),
                    )
                    return
                elif kind == "died":
                    done = True
                    yield Error(503, data, "server_error", "worker_crashed", retry_after=1.0)
                    return
        finally:
            self._pending.pop(req_id, None)
            if not done and w is not None and w is self._worker:
                w.send(("cancel", req_id))

    async def stats(self, timeout: float = 1.0) -> dict[str, Any] | None:
        w = self._worker
        if w is None or self.state != "ready":
            return None
        f = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(f)
        if not w.send(("stats",)):
            return None
        try:
            return await asyncio.wait_for(f, timeout)
        except TimeoutError:
            return None

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.name,
            "state": self.state,
            "path": str(self.path) if self.path else self.spec.path,
            "pid": self._worker.pid if self._worker else None,
            "error": self.last_error,
            "restarts": self.restarts,
            "in_flight": self._in_flight,
            "queued": self._waiting,
            "slots": self.parallel,
            "memory_bytes": self.memory() if self.loaded else 0,
            "expires_in": None
            if self.expires_at is None or not self.loaded
            else max(0.0, round(self.expires_at - time.monotonic(), 1)),
            **{k: v for k, v in self.info.items() if k in ("n_ctx", "architecture", "parameters", "size")},
        }

    @property
    def worker_pid(self) -> int | None:
        return self._worker.pid if self._worker else None
