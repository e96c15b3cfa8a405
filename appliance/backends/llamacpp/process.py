"""A model worker's process: spawned (a fresh interpreter: no inherited threads, locks or file descriptors
but its end of the pipe) and, once an event loop is there to hear it, attached to a thread that reads its pipe.

It is started with `subprocess` (`python -m appliance.backends.llamacpp.worker_main FD`), not
multiprocessing's `spawn`, which would first re-import the parent's `__main__` (`appliance.cli`, with
pydantic-settings: ~0.25 s of every worker start); the child gets the parent's `sys.path` and its spec as the
first two messages, as multiprocessing would send them.

Spawning and attaching are two steps so that `appliance serve` can spawn the default model's worker before
it imports the HTTP layer (`spawn_early`): the worker's own imports and model load (about 1 s on 2 cores)
then overlap the API process's imports (about 0.8 s) instead of following them. Whatever the worker sends
meanwhile (its `Ready`) waits in the pipe. Earlier still, `appliance serve` starts the worker's interpreter
before its own settings layer is imported (appliance/prestart.py): the spec follows once it is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.backends.llamacpp import worker as worker_mod
from appliance.backends.llamacpp.protocol import Stop, ToWorker
from appliance.catalog import ModelFileError, peek_model_path
from appliance.config import ConfigError, LlamaCppBackendSpec, ModelsFile, Settings
from appliance.prestart import Launched, launch


def worker_spec(path: Path, spec: LlamaCppBackendSpec, settings: Settings, parallel: int) -> dict[str, Any]:
    """What the worker is started with: the model's own settings over the global ones."""
    s = settings
    return {
        "path": str(path),
        "context_size": spec.context_size or s.context_size,
        "threads": spec.threads or s.threads,
        "gpu_layers": spec.gpu_layers if spec.gpu_layers is not None else s.gpu_layers,
        "parallel": parallel,
        "batch_size": spec.batch_size or s.batch_size,
        "ubatch_size": spec.ubatch_size or s.ubatch_size,
        "batch_invariant": s.batch_invariant if spec.batch_invariant is None else spec.batch_invariant,
        "kv_cache_type": spec.kv_cache_type or s.kv_cache_type,
        "prompt_cache_mib": s.prompt_cache_mib,
        "chat_template": spec.chat_template,
        "tool_format": spec.tool_format,
        "stream_interval": s.stream_interval,
        "verbose": s.log_level == "debug",
    }


class WorkerProcess:
    """One worker process and, once attached, the thread that reads its pipe."""

    def __init__(self, spec: dict[str, Any], prestarted: Launched | None = None):
        """A new worker for `spec`, or the `prestarted` interpreter given it (appliance/prestart.py)."""
        self.spec = spec
        self.proc, self.conn = (prestarted or launch()).take()
        self._send_lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.send(spec)  # waits in the pipe until the child, its imports done, reads it

    def attach(self, loop: asyncio.AbstractEventLoop, on_message, on_exit) -> None:
        """Deliver the worker's messages, and its exit, as calls on `loop`."""
        self.loop, self._on_message, self._on_exit = loop, on_message, on_exit
        threading.Thread(target=self._read, name=f"worker-reader-{self.proc.pid}", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def send(self, msg: ToWorker | list[str] | dict[str, Any]) -> bool:
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
        self._call(self._on_exit, self, self.proc.wait())

    def _call(self, fn, *args) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are shutting down
            self.loop.call_soon_threadsafe(fn, *args)  # type: ignore[union-attr]

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit; kill it if it does not."""
        self.send(Stop())
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)
        with contextlib.suppress(OSError):
            self.conn.close()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class EarlyWorker:
    """The default model's worker, spawned before the app exists; its supervisor adopts it."""

    model_id: str
    process: WorkerProcess


def spawn_early(settings: Settings, models: ModelsFile, prestarted: Launched | None = None) -> EarlyWorker | None:
    """Spawn the default model's first backend's worker now (in the `prestarted` interpreter, if any), if it
    is a llama.cpp model whose file is on disk (nothing to assemble or download). None otherwise: the
    supervisor spawns it as usual, and `prestarted` is let go (it exits)."""
    try:
        return _spawn_early(settings, models, prestarted)
    finally:
        if prestarted is not None:
            prestarted.discard()  # no-op once taken


def _spawn_early(settings: Settings, models: ModelsFile, prestarted: Launched | None) -> EarlyWorker | None:
    spec = next((m for m in models.models if settings.default_model in (m.id, *m.aliases)), None)
    backend = spec.backends[0] if spec is not None and spec.backends else None
    if not isinstance(backend, LlamaCppBackendSpec):
        return None
    try:
        path = peek_model_path(backend.path, settings.models_dir)
        if path is None:
            return None
        worker_mod.check_gguf(str(path))
    except (ModelFileError, ConfigError, ValueError, OSError):
        return None  # the supervisor reports it, the usual way
    parallel = backend.parallel or settings.parallel
    worker = WorkerProcess(worker_spec(path, backend, settings, parallel), prestarted)
    return EarlyWorker(spec.id, worker)  # type: ignore[union-attr]
