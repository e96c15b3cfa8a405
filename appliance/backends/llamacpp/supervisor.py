"""One model's worker process: spawn it, read its pipe, track its state, restart it when it dies.

States (`BackendState`):
  IDLE ─start()→ LOADING ─Ready→ READY ─unload()→ UNLOADED ─start()→ LOADING …
  LOADING ─Fatal / bad file→ FAILED (a request after a 10 s pause tries again)
  READY or LOADING ─worker died→ LOADING again, after a back-off when it keeps dying (0.5 s doubling to 30 s)
  any ─close()→ STOPPED
A reader thread turns pipe messages into calls on the event loop. The supervisor knows nothing of
generations: it hands `Events` to `on_events`, and tells `on_lost` when the worker goes away with
generations possibly in flight (crash, unload, shutdown), with the error to end them with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

from appliance.backends.base import BackendState
from appliance.backends.llamacpp import worker as worker_mod
from appliance.backends.llamacpp.process import WorkerProcess, worker_spec
from appliance.backends.llamacpp.protocol import (
    Events,
    Fatal,
    FromWorker,
    Ready,
    Stats,
    StatsRequest,
    TokenizeRequest,
    TokenizeResult,
    ToWorker,
)
from appliance.backends.llamacpp.residency import kv_cache_bytes
from appliance.catalog import ModelFileError, resolve_model_path
from appliance.config import LlamaCppBackendSpec, Settings
from appliance.engine.types import EngineError, Error

log = logging.getLogger("appliance.llamacpp")
RETRY_FAILED_AFTER = 10.0  # seconds a failed load is reported as is before a request tries again


class Supervisor:
    def __init__(
        self,
        model_id: str,
        spec: LlamaCppBackendSpec,
        settings: Settings,
        parallel: int,
        on_events: Callable[[Events], None],
        on_lost: Callable[[Error], None],
        prepare: Callable[[], Awaitable[None]] | None = None,
        early: WorkerProcess | None = None,
    ):
        self.model_id = model_id
        self.spec = spec
        self.settings = settings
        self.parallel = parallel
        self._on_events = on_events
        self._on_lost = on_lost
        self._prepare = prepare  # before each spawn (residency: make room in the memory budget)
        self.state = BackendState.IDLE
        self.error: str | None = None
        self.info: dict[str, Any] = {}
        self.restarts = 0
        self.path: Path | None = None
        self._worker: WorkerProcess | None = None
        self._early = early  # spawned before the app was built (`appliance serve`): adopted by the first start
        self._changed = asyncio.Event()  # replaced after each set: waiters see every change
        self._stats_waiters: list[asyncio.Future] = []
        self._tokenize_waiters: dict[str, asyncio.Future] = {}  # TokenizeRequest id -> its result
        self._crashes: list[float] = []
        self._failed_at = 0.0
        self._closing = False
        self._start_task: asyncio.Task | None = None
        self._rss_seen = 0

    @property
    def pid(self) -> int | None:
        return self._worker.pid if self._worker else None

    @property
    def loaded(self) -> bool:
        return self.state in (BackendState.LOADING, BackendState.READY) and self._worker is not None

    def send(self, msg: ToWorker) -> bool:
        w = self._worker
        return w is not None and w.send(msg)

    def memory(self) -> int:
        """Bytes the worker uses now (RSS), or an estimate while it loads."""
        pid = self.pid
        if pid is not None and self.state is BackendState.READY:
            with contextlib.suppress(psutil.Error):
                self._rss_seen = psutil.Process(pid).memory_info().rss
                return self._rss_seen
        return self.estimate()

    def estimate(self) -> int:
        """What loading this model will take: what it took last time, else the file, its KV cache (all slots;
        llama.cpp allocates and clears it at load) and some room for compute buffers."""
        if self._rss_seen:
            return self._rss_seen
        size = self.path.stat().st_size if self.path and self.path.exists() else 0
        w = self._worker_spec() if self.path else {}
        kv = kv_cache_bytes(self.path, w.get("context_size", 0), self.parallel, w.get("kv_cache_type", "f16"))
        return int(size * 1.1) + kv + (64 << 20) if kv else int(size * 1.5) + (64 << 20)

    # -- transitions --------------------------------------------------------------------------------
    def _set(self, state: BackendState) -> None:
        self.state = state
        self._changed.set()
        self._changed = asyncio.Event()

    async def start(self) -> None:
        if self.state in (BackendState.LOADING, BackendState.READY) or self._closing:
            return
        self._set(BackendState.LOADING)
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
        if self._prepare is not None:
            await self._prepare()
        if self._closing or self.state is not BackendState.LOADING:
            return
        w, self._early = self._early, None
        if w is not None and w.spec != self._worker_spec():  # not what this start would spawn: start afresh
            await asyncio.to_thread(w.stop)
            w = None
        early = w is not None
        w = w or WorkerProcess(self._worker_spec())
        self._worker = w
        w.attach(asyncio.get_running_loop(), self._on_message, self._on_exit)
        how = " (spawned before the app was built)" if early else ""
        log.info("model %s: worker pid %s loading %s%s", self.model_id, w.pid, self.path, how)

    def _worker_spec(self) -> dict[str, Any]:
        return worker_spec(self.path, self.spec, self.settings, self.parallel)  # type: ignore[arg-type]

    def _fail(self, message: str) -> None:
        log.error("model %s failed to load: %s", self.model_id, message)
        self.error, self._failed_at = message, time.monotonic()
        self._set(BackendState.FAILED)

    async def stop(self, reason: str) -> None:
        """Unload: stop the worker; generations in flight end with 503 `model_unloaded`."""
        w, self._worker = self._worker, None
        self._set(BackendState.UNLOADED)
        if w is not None:
            log.info("model %s: unloading (%s), worker pid %s", self.model_id, reason, w.pid)
            self._on_lost(
                Error(
                    503,
                    f"Model '{self.model_id}' was unloaded ({reason}); the request was not completed.",
                    "server_error",
                    "model_unloaded",
                    retry_after=1.0,
                )
            )
            await asyncio.to_thread(w.stop)

    async def close(self) -> None:
        self._closing = True
        self._set(BackendState.STOPPED)
        if self._start_task is not None:
            self._start_task.cancel()
        for w in (self._worker, self._early):
            if w is not None:
                await asyncio.to_thread(w.stop)
        self._worker = self._early = None
        self._on_lost(Error(503, "The appliance is shutting down.", "server_error", "shutting_down", retry_after=1.0))

    # -- pipe callbacks (event loop thread) ---------------------------------------------------------
    def _on_message(self, w: WorkerProcess, msg: FromWorker) -> None:
        if w is not self._worker:
            return
        if isinstance(msg, Events):
            self._on_events(msg)
        elif isinstance(msg, Ready):
            self.info, self.error = msg.info, None
            self._set(BackendState.READY)
            log.info(
                "model %s ready (pid %s, %s slots x %s ctx)",
                self.model_id,
                w.pid,
                self.info.get("slots"),
                self.info.get("n_ctx"),
            )
        elif isinstance(msg, Fatal):
            self._worker = None
            self._fail(msg.message)
        elif isinstance(msg, TokenizeResult):
            fut = self._tokenize_waiters.pop(msg.id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, Stats):
            waiters, self._stats_waiters = self._stats_waiters, []
            for f in waiters:
                if not f.done():
                    f.set_result(msg.stats)

    def _on_exit(self, w: WorkerProcess, exitcode: int | None) -> None:
        if w is not self._worker:
            return
        self._worker = None
        if self._closing:
            return
        log.error("model %s: worker pid %s died (exit code %s)", self.model_id, w.pid, exitcode)
        self._on_lost(
            Error(
                503,
                "The model worker stopped unexpectedly; the request was not completed.",
                "server_error",
                "worker_crashed",
                retry_after=1.0,
            )
        )
        now = time.monotonic()
        self._crashes = [t for t in self._crashes if now - t < 60] + [now]
        delay = min(30.0, 0.5 * 2 ** (len(self._crashes) - 1)) if len(self._crashes) > 1 else 0.0
        self.restarts += 1
        self._set(BackendState.LOADING)
        self._start_task = asyncio.get_running_loop().create_task(self._spawn(delay))

    # -- waiting ------------------------------------------------------------------------------------
    async def wait_ready(self, timeout: float) -> None:
        """Start the worker if need be and wait until it is ready; 503 if it failed or takes too long."""
        deadline = time.monotonic() + timeout
        while self.state is not BackendState.READY:
            if self.state is BackendState.FAILED:
                if time.monotonic() - self._failed_at < RETRY_FAILED_AFTER:
                    raise EngineError.of(
                        503,
                        f"Model '{self.model_id}' failed to load: {self.error}",
                        type="server_error",
                        code="model_load_failed",
                    )
                self.state = BackendState.IDLE
            if self.state in (BackendState.IDLE, BackendState.UNLOADED) and not self._closing:
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

    async def stats(self, timeout: float = 1.0) -> dict[str, Any] | None:
        if self.state is not BackendState.READY:
            return None
        f = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(f)
        if not self.send(StatsRequest()):
            return None
        try:
            return await asyncio.wait_for(f, timeout)
        except TimeoutError:
            return None

    async def tokenize(self, msg: TokenizeRequest, timeout: float = 30.0) -> TokenizeResult:
        """Send a TokenizeRequest to the ready worker and wait for its answer; 503 if it cannot answer."""
        fut = asyncio.get_running_loop().create_future()
        self._tokenize_waiters[msg.id] = fut
        try:
            if not self.send(msg):
                raise EngineError.of(503, "The model worker is not running.", "server_error", "worker_unavailable")
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            err = EngineError.of(503, "The model worker did not answer in time.", "server_error", "worker_busy")
            raise err from None
        finally:
            self._tokenize_waiters.pop(msg.id, None)
