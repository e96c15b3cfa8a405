"""The model worker process: owns one GGUF model and its llama.cpp context.

Started with the `spawn` context by `supervisor.WorkerProcess`; speaks the typed messages of `protocol.py`
over a `multiprocessing` pipe (where the protocol, and why text is gathered in an `Outbox`, is described).

Tokenization: chat requests are rendered by `chat_format.ChatFormatter`, which tells the template's markup
from message content; `ChatTokenizer` parses special tokens in the markup only, so text in a message is
always text (see chat_format's docstring for how, and for templates that transform content). Raw prompts
(`prompt` on /v1/completions, Ollama's `raw`) are the client's own markup and are tokenized as before, with
special tokens parsed: whoever writes a raw prompt writes the whole prompt, turns and all.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import struct
import traceback
from multiprocessing.connection import Connection
from typing import Any

from appliance.backends.llamacpp.chat_tokens import ChatTokenizer
from appliance.backends.llamacpp.chat_tokens import Reject as _Reject
from appliance.backends.llamacpp.outbox import Outbox, merge_text  # noqa: F401 (tests import them from here)
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
    TokenizeRequest,
    TokenizeResult,
    ToWorker,
)
from appliance.backends.llamacpp.tool_calls import chat_input, detect_format, markup_texts
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


# KV cache element types (ggml_type) by the name the models file and settings use.
KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}
INVARIANT_UBATCH = 48  # llama.cpp computes passes of 64+ tokens with other kernels (see compute_passes)


def compute_passes(n_batch: int, ubatch: int | None, invariant: bool) -> tuple[int, int]:
    """Tokens per compute pass (n_ubatch), and prompt tokens per step while other requests decode.

    llama.cpp computes passes of 64 tokens or more with other kernels than smaller ones, so a prompt gives
    (slightly) different logits depending on how it was cut into passes: computed in one 512-token pass,
    from a cache, or token by token. Batch-invariant mode keeps every pass under 64 tokens (48), so outputs
    do not depend on batching, caching or other requests, for ~20% slower prompt processing. By default
    prompts are computed in passes of the whole batch (512), as llama-server does; while other requests
    decode, a newcomer's prompt goes in 128-token pieces so their tokens keep flowing.
    """
    if invariant:
        n_ubatch = min(n_batch, ubatch or INVARIANT_UBATCH, 63)
        return n_ubatch, n_ubatch
    n_ubatch = min(n_batch, ubatch or n_batch)
    return n_ubatch, min(n_ubatch, 128)


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


def preload() -> None:
    """What `_Worker` imports, ahead of its spec (worker_main): the scheduler imports `llama_cpp`, whose
    package brings the bindings, numpy and the chat-template code (jinja2)."""
    from appliance.backends.llamacpp import chat_format, scheduler  # noqa: F401


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
        n_ubatch, prefill_chunk = compute_passes(n_batch, spec.get("ubatch_size"), bool(spec.get("batch_invariant")))

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx_slot * n_slots
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_ubatch
        cparams.n_seq_max = n_slots
        cparams.kv_unified = bool(spec.get("kv_unified", False))
        cparams.n_threads = spec.get("threads", os.cpu_count() or 1)
        cparams.n_threads_batch = cparams.n_threads
        cparams.no_perf = True
        kv_type = spec.get("kv_cache_type") or "f16"
        cparams.type_k = cparams.type_v = KV_TYPES[kv_type]  # a quantized V cache turns flash attention on
        self.ctx = llama_cpp.llama_init_from_model(self.model.model, cparams)
        if not self.ctx:
            raise ValueError(
                f"{path}: failed to create a llama.cpp context of {cparams.n_ctx} tokens with a {kv_type} KV cache"
            )
        parked = spec.get("prompt_cache_mib", 0) << 20  # host_cache.py
        cfg = SlotConfig(n_slots, n_ctx_slot, n_batch, prefill_chunk, host_cache_bytes=parked)
        self.sched = Scheduler(self.model, self.ctx, cfg)

        meta = self.model.metadata()
        template = spec.get("chat_template") or meta.get("tokenizer.chat_template")
        bos_id, eos_id = self.model.token_bos(), self.model.token_eos()
        self.bos_text = self.model.token_get_text(bos_id) if bos_id >= 0 else ""
        eos_text = self.model.token_get_text(eos_id) if eos_id >= 0 else ""
        self.formatter = ChatFormatter(template, self.bos_text, eos_text)
        self.tool_format = spec.get("tool_format") or detect_format(template, self.formatter.render)
        self.add_bos = self.model.add_bos_token()
        self.chat_tokenizer = ChatTokenizer(self.model)
        self.n_ctx_slot = n_ctx_slot
        self.interval = float(spec.get("stream_interval", 0.0))
        self.info = {
            "pid": os.getpid(),
            "n_ctx": n_ctx_slot,
            "n_ctx_train": n_train,
            "slots": n_slots,
            "kv_cache_type": kv_type,
            "batch_invariant": bool(spec.get("batch_invariant")),
            "architecture": meta.get("general.architecture", ""),
            "name": meta.get("general.name", ""),
            "file_type": meta.get("general.file_type", ""),
            "parameters": self.model.n_params(),
            "size": self.model.size(),
            "chat_template": bool(template),
            "tool_format": self.tool_format,
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
            except Exception:  # a bug must cost this request, not the worker and every stream on it
                traceback.print_exc()
                conn.send(Events([Failed(msg.id, Error(500, "internal error in the model worker", "server_error"))]))
                return
            self.sched.submit(job)
        elif isinstance(msg, Cancel):
            self.sched.cancel(msg.id)
        elif isinstance(msg, StatsRequest):
            conn.send(Stats(self.sched.stats()))
        elif isinstance(msg, TokenizeRequest):
            conn.send(self._tokenize(msg))

    def _tokenize(self, msg: TokenizeRequest) -> TokenizeResult:
        """/tokenize (special-token text parsed, as llama-server does) and /detokenize (special tokens shown)."""
        if msg.tokens is not None:
            n_vocab = self.model.n_vocab()
            bad = next((t for t in msg.tokens if not 0 <= t < n_vocab), None)
            if bad is not None:
                return TokenizeResult(msg.id, error=f"token id {bad} is outside the vocabulary (0..{n_vocab - 1})")
            text = self.model.detokenize(msg.tokens, special=True).decode("utf-8", errors="replace")
            return TokenizeResult(msg.id, text=text)
        add_bos = msg.add_special and self.add_bos
        return TokenizeResult(msg.id, tokens=self.model.tokenize((msg.text or "").encode("utf-8"), add_bos, True))

    def _job(self, req: GenRequest) -> Any:
        from appliance.backends.llamacpp.sampling import check_logit_bias
        from appliance.backends.llamacpp.scheduler import Job

        stops = list(req.params.stop)
        why = check_logit_bias(req.params.logit_bias, self.sched.n_vocab) if req.params.logit_bias else None
        if why:
            raise _Reject(400, f"Invalid 'logit_bias': {why}.", code="invalid_value", param="logit_bias")
        if req.messages is not None:
            if not self.formatter.has_template and req.require_template:
                raise _Reject(400, "this model has no chat template; use /v1/completions", param="model")
            msgs, tools = chat_input(req.messages, req.tools, req.tool_choice, self.tool_format)
            for p, text in markup_texts(msgs, tools):  # rendered as markup: no control-token text allowed
                if self.chat_tokenizer.contains_control(text):
                    raise _Reject(400, "tool definitions and calls must not contain control-token text", param=p)
            try:
                fmt = self.formatter(msgs, tools)
            except Exception as e:  # the template refused the conversation (raise_exception), or broke on it
                raise _Reject(400, f"This model's chat template rejected the messages: {e}", param="messages") from e
            stops += [s for s in fmt.stops if s not in stops]
            param = "messages"
            self._check_length(fmt.prompt, param)
            add_bos = self.add_bos and not (self.bos_text and fmt.prompt.startswith(self.bos_text))
            tokens = self.chat_tokenizer(fmt, add_bos)
        else:
            text, param = req.prompt or "", "prompt"
            self._check_length(text, param)
            add_bos = self.add_bos and not (self.bos_text and text.startswith(self.bos_text))
            tokens = self.model.tokenize(text.encode("utf-8"), add_bos, True)  # raw: the client's own markup
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
        return Job(req.id, tokens, max_tokens, dataclasses.replace(req.params, stop=stops), self._grammar(req))

    def _grammar(self, req: GenRequest) -> str | None:
        """The request's output format as a grammar; a 400 naming what cannot be enforced."""
        from appliance.backends.llamacpp.grammar import UnsupportedSchema, tool_gbnf

        try:
            return tool_gbnf(
                req.tools if req.messages is not None else [],
                req.tool_choice,
                req.parallel_tool_calls,
                self.tool_format,
                req.params.output,
                self.sched.grammar_ok,
            )
        except UnsupportedSchema as e:
            raise _Reject(400, f"Invalid '{e.param}': {e}.", code="invalid_value", param=e.param) from e

    def _check_length(self, text: str, param: str) -> None:
        """Refuse, without tokenizing it, a text too long for the context whatever its tokens.

        No token covers more than `chat_tokenizer.max_token_bytes` bytes, so a text longer than that many
        times the context cannot fit. Tokenizing a megabyte takes this process (every stream on the model)
        half a second; this check takes microseconds.
        """
        n_ctx = self.n_ctx_slot
        if len(text) > (n_ctx + 2) * self.chat_tokenizer.max_token_bytes:  # chars <= bytes: a safe test
            raise _Reject(
                400,
                f"This model's maximum context length is {n_ctx} tokens. However, your {param} resulted in "
                f"more than {n_ctx} tokens. Please reduce the length of the {param}.",
                code="context_length_exceeded",
                param=param,
            )
