"""The model worker process: owns one GGUF model and its llama.cpp context.

Started with the `spawn` context by `supervisor.WorkerProcess`; speaks the typed messages of `protocol.py`
over a `multiprocessing` pipe (where the protocol, and why text is gathered in an `Outbox`, is described).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import struct
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from appliance.backends.llamacpp.protocol import (
    Cancel,
    Events,
    Failed,
    Fatal,
    GenRequest,
    Ready,
    Stats,
    StatsRequest,
    Stop,
    Text,
    ToWorker,
    WorkerEvent,
)
from appliance.engine.types import Error

GGUF_MAGIC = b"GGUF"


def check_gguf(path: str) -> None:
    """Raise ValueError with a clear message if `path` is not a readable GGUF file."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise ValueError(f"cannot read model file {path}: {e.strerror}") from None
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (bad magic)")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version}")


def main(conn: Connection, spec: dict[str, Any]) -> None:
    """Process entry point."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API process decides when we stop
    try:
        worker = _Worker(spec)
    except Exception as e:
        conn.send(Fatal(str(e) or type(e).__name__))
        conn.close()
        return
    conn.send(Ready(worker.info))
    worker.serve(conn)


class _Worker:
    def __init__(self, spec: dict[str, Any]):
        import llama_cpp
        import llama_cpp._logger as llama_log
        from llama_cpp._internals import LlamaModel

        from appliance.backends.llamacpp.chat_format import ChatFormatter
        from appliance.backends.llamacpp.scheduler import Scheduler, SlotConfig

        llama_log.set_verbose(bool(spec.get("verbose")))
        path = spec["path"]
        check_gguf(path)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = spec.get("gpu_layers", 0)
        self.model = LlamaModel(path_model=path, params=mparams, verbose=False)
        n_train = self.model.n_ctx_train()
        n_slots = spec.get("parallel", 4)
        n_ctx_slot = min(spec.get("context_size", 8192), n_train) if n_train > 0 else spec["context_size"]
        n_batch = spec.get("batch_size", 512)
        # llama.cpp computes batches of 64+ tokens with other kernels than smaller ones, so the same prompt
        # gives (slightly) different logits depending on how it was chunked. Compute passes under 64 tokens
        # make outputs independent of batching and caching, for ~20% slower prompt processing.
        n_ubatch = min(n_batch, spec.get("ubatch_size", 48))

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx_slot * n_slots
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_ubatch
        cparams.n_seq_max = n_slots
        cparams.kv_unified = bool(spec.get("kv_unified", False))
        cparams.n_threads = spec.get("threads", os.cpu_count() or 1)
        cparams.n_threads_batch = cparams.n_threads
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model.model, cparams)
        if not self.ctx:
            raise ValueError(f"{path}: failed to create a llama.cpp context of {cparams.n_ctx} tokens")
        self.sched = Scheduler(self.model, self.ctx, SlotConfig(n_slots, n_ctx_slot, n_batch, prefill_chunk=n_ubatch))

        meta = self.model.metadata()
        template = spec.get("chat_template") or meta.get("tokenizer.chat_template")
        bos_id, eos_id = self.model.token_bos(), self.model.token_eos()
        self.bos_text = self.model.token_get_text(bos_id) if bos_id >= 0 else ""
        eos_text = self.model.token_get_text(eos_id) if eos_id >= 0 else ""
        self.formatter = ChatFormatter(template, self.bos_text, eos_text)
        self.add_bos = self.model.add_bos_token()
        self.n_ctx_slot = n_ctx_slot
        self.interval = float(spec.get("stream_interval", 0.0))
        self.info = {
            "pid": os.getpid(),
            "n_ctx": n_ctx_slot,
            "n_ctx_train": n_train,
            "slots": n_slots,
            "architecture": meta.get("general.architecture", ""),
            "name": meta.get("general.name", ""),
            "file_type": meta.get("general.file_type", ""),
            "parameters": self.model.n_params(),
            "size": self.model.size(),
            "chat_template": bool(template),
        }

    # -- serving ----------------------------------------------------------------------------
    def serve(self, conn: Connection) -> None:
        outbox = Outbox(conn, self.interval)
        while True:
            timeout: float | None = 0 if self.sched.busy else None
            try:
                while conn.poll(timeout):
                    msg = conn.recv()
                    if isinstance(msg, Stop):
                        return
                    self._handle(conn, msg)
                    timeout = 0
                if self.sched.busy:
                    try:
                        out = self.sched.step()
                    except Exception:  # a bug must cost the requests in flight, not the worker
                        traceback.print_exc()
                        out = self.sched.fail_all("internal error in the model worker")
                    outbox.add(out, final=not self.sched.busy)
                else:
                    outbox.add([], final=True)  # what a cancelled request left behind
            except (EOFError, BrokenPipeError, ConnectionResetError):
                return  # the API process is gone

    def _handle(self, conn: Connection, msg: ToWorker) -> None:
        if isinstance(msg, GenRequest):
            try:
                job = self._job(msg)
            except _Reject as r:
                conn.send(Events([Failed(msg.id, r.error)]))
                return
            self.sched.submit(job)
        elif isinstance(msg, Cancel):
            self.sched.cancel(msg.id)
        elif isinstance(msg, StatsRequest):
            conn.send(Stats(self.sched.stats()))

    def _job(self, req: GenRequest) -> Any:
        from appliance.backends.llamacpp.scheduler import Job

        stops = list(req.params.stop)
        if req.messages is not None:
            if not self.formatter.has_template and req.require_template:
                raise _Reject(400, "this model has no chat template; use /v1/completions", param="model")
            fmt = self.formatter([{"role": m.role, "content": m.content} for m in req.messages])
            text, stops = fmt.prompt, stops + [s for s in fmt.stops if s not in stops]
            param = "messages"
        else:
            text, param = req.prompt or "", "prompt"
        add_bos = self.add_bos and not (self.bos_text and text.startswith(self.bos_text))
        tokens = self.model.tokenize(text.encode("utf-8"), add_bos, True)
        if not tokens:
            raise _Reject(400, f"'{param}' is empty after tokenization", param=param)
        n_prompt, n_ctx = len(tokens), self.n_ctx_slot
        requested = req.params.max_tokens
        if requested is None:
            max_tokens = min(req.default_max_tokens, n_ctx - n_prompt)
            if max_tokens < 1:
                raise _Reject(
                    400,
                    f"This model's maximum context length is {n_ctx} tokens. However, your "
                    f"{param} resulted in {n_prompt} tokens. Please reduce the length of the {param}.",
                    code="context_length_exceeded",
                    param=param,
                )
        else:
            if n_prompt + requested > n_ctx:
                raise _Reject(
                    400,
                    f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                    f"{n_prompt + requested} tokens ({n_prompt} in the {param}, {requested} for the "
                    f"completion). Please reduce the length of the {param} or the completion.",
                    code="context_length_exceeded",
                    param=param,
                )
            max_tokens = requested
        return Job(req.id, tokens, max_tokens, dataclasses.replace(req.params, stop=stops))


class Outbox:
    """Sends scheduler events over the pipe, gathering streamed text for up to `interval` seconds."""

    def __init__(self, conn: Connection, interval: float):
        self.conn = conn
        self.interval = interval
        self.held: list[WorkerEvent] = []
        self.since = 0.0  # when the oldest held event was produced

    def add(self, events: list[WorkerEvent], final: bool = False) -> None:
        if not events and not self.held:
            return
        now = time.monotonic()
        if not self.held:
            self.since = now
        self.held.extend(events)
        urgent = final or any(not isinstance(ev, Text) for ev in events)
        if urgent or now - self.since >= self.interval:
            self.conn.send(Events(merge_text(self.held)))
            self.held = []


def merge_text(events: list[WorkerEvent]) -> list[WorkerEvent]:
    """Join each generation's consecutive `Text` events into one (order per generation is kept)."""
    out: list[WorkerEvent] = []
    last: dict[str, int] = {}  # generation id -> index of its latest event in `out`
    for ev in events:
        i = last.get(ev.id)
        prev = out[i] if i is not None else None
        if isinstance(ev, Text) and isinstance(prev, Text):
            out[i] = Text(ev.id, prev.text + ev.text)  # type: ignore[index]
        else:
            last[ev.id] = len(out)
            out.append(ev)
    return out


class _Reject(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.error = Error(status, message, "invalid_request_error", code, param)
