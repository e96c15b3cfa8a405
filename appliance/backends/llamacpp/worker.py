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
import re
import signal
import struct
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from appliance.backends.llamacpp.chat_format import Formatted
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
        self.chat_tokenizer = ChatTokenizer(self.model)
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
            except Exception:  # a bug must cost this request, not the worker and every stream on it
                traceback.print_exc()
                conn.send(Events([Failed(msg.id, Error(500, "internal error in the model worker", "server_error"))]))
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
            try:
                fmt = self.formatter([{"role": m.role, "content": m.content} for m in req.messages])
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
        from appliance.backends.llamacpp.grammar import UnsupportedSchema, gbnf

        try:
            return gbnf(req.params.output, self.sched.grammar_ok)
        except UnsupportedSchema as e:
            raise _Reject(400, f"Invalid 'response_format': {e}.", code="invalid_value", param="response_format") from e

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


# llama.cpp token attributes (llama_token_attr)
_ATTR_UNKNOWN, _ATTR_CONTROL, _ATTR_LSTRIP, _ATTR_RSTRIP = 1 << 0, 1 << 3, 1 << 7, 1 << 8
_C_SPACE = " \t\n\v\f\r"  # what C's isspace() strips around LSTRIP/RSTRIP tokens


class ChatTokenizer:
    """Tokenize a formatted chat: special tokens are parsed in the template's markup, never in content.

    The result is what `llama_tokenize(prompt, add_bos, parse_special=True)` gives for the whole prompt,
    except that control-token text inside message content stays text. llama.cpp tokenizes with special
    parsing by first cutting the text at control tokens (longest first; LSTRIP/RSTRIP tokens eat the
    whitespace beside them) and then tokenizing each plain fragment on its own. This does the same cut on
    the markup pieces only, joins each run of plain markup text and content into one fragment and has
    llama.cpp tokenize it with special parsing off, so token boundaries at markup/content seams are the same
    as before. Tokens of type USER_DEFINED (ordinary added words, e.g. Gemma's runs of newlines) are still
    matched everywhere, as llama.cpp and Hugging Face's tokenizers both do: they are not markup.
    """

    def __init__(self, model: Any):
        import llama_cpp

        self.model = model
        self.bos, self.eos = model.token_bos(), model.token_eos()
        self.add_eos = bool(llama_cpp.llama_vocab_get_add_eos(model.vocab))
        control: list[tuple[str, int, int]] = []
        longest = 1  # bytes of the longest token text: no token stands for more bytes of input than that
        for tid in range(model.n_vocab()):
            raw = llama_cpp.llama_vocab_get_text(model.vocab, tid)
            longest = max(longest, len(raw))
            attr = model.token_get_attr(tid)
            if raw and attr & (_ATTR_CONTROL | _ATTR_UNKNOWN):
                control.append((raw.decode("utf-8", "replace"), tid, attr))
        self.max_token_bytes = longest + 1  # + a space some tokenizers put before a fragment
        control.sort(key=lambda c: len(c[0]), reverse=True)  # llama.cpp's order: longest first
        self.control = control
        self._control_re: re.Pattern[str] | None = None

    def contains_control(self, text: str) -> bool:
        """Whether `text` holds the text of any control token (which special parsing would turn into it)."""
        if self._control_re is None:
            self._control_re = re.compile("|".join(re.escape(t) for t, _, _ in self.control) or r"(?!)")
        return self._control_re.search(text) is not None

    def __call__(self, fmt: Formatted, add_bos: bool) -> list[int]:
        if fmt.parts is None:  # the template transforms content: markup cannot be told from content
            if any(self.contains_control(t) for t in fmt.contents):
                raise _Reject(
                    400,
                    "message content contains the text of one of this model's control tokens, which this "
                    "model's chat template cannot keep apart from its own markup",
                    param="messages",
                )
            return self.model.tokenize(fmt.prompt.encode("utf-8"), add_bos, True)
        markup = "".join(t for t, is_markup in fmt.parts if is_markup)
        present = [c for c in self.control if c[0] in markup]
        # Items: ("tok", id, attr) for a control token, ("text", str) for plain text (markup or content).
        items: list[tuple[Any, ...]] = []
        for text, is_markup in fmt.parts:
            items += _cut(text, present) if is_markup else [("text", text)]
        # Join plain runs into fragments; apply LSTRIP/RSTRIP to the neighbouring fragments.
        seq: list[int | str] = []
        for item in items:
            if item[0] == "text":
                if seq and isinstance(seq[-1], str):
                    seq[-1] += item[1]
                else:
                    seq.append(item[1])
            else:
                seq.append(item[1])
        for i, item in enumerate(seq):
            if isinstance(item, int):
                attr = self.model.token_get_attr(item)
                if attr & _ATTR_LSTRIP and i > 0 and isinstance(seq[i - 1], str):
                    seq[i - 1] = seq[i - 1].rstrip(_C_SPACE)  # type: ignore[union-attr]
                if attr & _ATTR_RSTRIP and i + 1 < len(seq) and isinstance(seq[i + 1], str):
                    seq[i + 1] = seq[i + 1].lstrip(_C_SPACE)  # type: ignore[union-attr]
        tokens: list[int] = [self.bos] if add_bos and self.bos >= 0 else []
        for item in seq:
            if isinstance(item, int):
                tokens.append(item)
            elif item:
                tokens += self.model.tokenize(item.encode("utf-8"), False, False)
        if add_bos and self.add_eos and self.eos >= 0:
            tokens.append(self.eos)
        return tokens


def _cut(text: str, control: list[tuple[str, int, int]]) -> list[tuple[Any, ...]]:
    """Cut markup text at control tokens as llama.cpp does: each token in turn, longest first."""
    frags: list[tuple[Any, ...]] = [("text", text)]
    for ctext, tid, attr in control:
        out: list[tuple[Any, ...]] = []
        for frag in frags:
            if frag[0] != "text" or ctext not in frag[1]:
                out.append(frag)
                continue
            pieces = frag[1].split(ctext)
            for j, piece in enumerate(pieces):
                if j:
                    out.append(("tok", tid, attr))
                if piece:
                    out.append(("text", piece))
        frags = out
    return frags


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
