"""Continuous batching over one llama.cpp context with several sequences (slots).

Each slot owns one sequence id, with its own KV stream (`kv_unified=False`: a sequence's attention
never sees another's cells, so outputs do not depend on the batch), and remembers the tokens it
holds, so a request that continues a conversation reuses the longest cached prefix. Every `step()`
builds one `llama_batch` holding one token for each decoding sequence (in sequence-id order) plus a
chunk of a newcomer's prompt, runs one `llama_decode`, and samples each sequence with its own
sampler chain.
This module runs inside the worker process; it knows nothing about pipes or HTTP. It produces the
typed events of `protocol.py` (Started, FirstToken, Text, Finished, Failed), keyed by `Job.req_id`.
"""

from __future__ import annotations

import codecs
import ctypes
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from appliance.backends.llamacpp.protocol import Failed, Finished, FirstToken, Started, Text, WorkerEvent
from appliance.engine.types import Error, SamplingParams, Usage

Out = WorkerEvent


@dataclass
class SlotConfig:
    n_slots: int = 4
    n_ctx_slot: int = 8192
    n_batch: int = 512
    prefill_chunk: int = 256  # prompt tokens per step while other sequences are decoding


@dataclass
class Job:
    """One generation as the scheduler runs it: the tokenized prompt, the resolved token cap, and the
    request's sampling parameters (`params.stop` includes the chat template's own stop strings)."""

    req_id: str  # the internal generation id (never the client's X-Request-Id)
    tokens: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    grammar: str | None = None  # GBNF (grammar.py): structured outputs, enforced token by token


class _Sampler:
    """A llama.cpp sampler chain for one sequence (freed with the sequence)."""

    def __init__(self, p: SamplingParams, n_vocab: int, vocab: Any = None, grammar: str | None = None):
        params = llama_cpp.llama_sampler_chain_default_params()
        self.ptr = llama_cpp.llama_sampler_chain_init(params)
        add = llama_cpp.llama_sampler_chain_add
        if grammar is not None:  # first: the others choose only among tokens the grammar allows
            g = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
            if not g:
                self.free()
                raise ValueError("the grammar could not be parsed")
            add(self.ptr, g)
        if p.presence_penalty or p.frequency_penalty or p.repeat_penalty != 1.0:
            add(
                self.ptr,
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab, 64, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
                ),
            )
        if p.temperature <= 0:
            add(self.ptr, llama_cpp.llama_sampler_init_greedy())
        else:
            if p.top_k > 0:
                add(self.ptr, llama_cpp.llama_sampler_init_top_k(p.top_k))
            if p.top_p < 1.0:
                add(self.ptr, llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
            if p.min_p > 0:
                add(self.ptr, llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
            add(self.ptr, llama_cpp.llama_sampler_init_temp(p.temperature))
            seed = p.seed if p.seed is not None else random.getrandbits(32)
            add(self.ptr, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, ctx: Any, idx: int) -> int:
        return llama_cpp.llama_sampler_sample(self.ptr, ctx, idx)

    def free(self) -> None:
        if self.ptr is not None:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None


class _StopFilter:
    """Holds back text that may be the start of a stop string; finds complete ones."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        buf = self.held + text
        if not self.stops:
            self.held = ""
            return buf, False
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        self.held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass
class _Seq:
    job: Job
    sampler: _Sampler
    pending: list[int]  # prompt tokens not yet decoded
    cached: int  # prompt tokens reused from the slot's cache
    stops: _StopFilter
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    next_token: int | None = None  # sampled, to be decoded in the next step
    generated: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass
class _Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # tokens whose KV is in the cache
    last_used: float = 0.0
    seq: _Seq | None = None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def runs(seq_ids: list[int]) -> int:
    """How many runs of consecutive ids: [0, 1, 2] -> 1, [0, 2, 3] -> 2."""
    ids = sorted(set(seq_ids))
    return sum(1 for i, x in enumerate(ids) if i == 0 or x != ids[i - 1] + 1)


def pick_slot(free: list[_Slot], busy: list[int], tokens: list[int]) -> _Slot:
    """The free slot for a prompt.

    1. The slot this prompt continues (its cache is, all but a short tail, a prefix of the prompt).
    2. Else the slot that keeps the busy sequence ids in the fewest runs of consecutive ids: with one KV
       stream per sequence, llama.cpp computes each run of consecutive ids in its own pass, so a gap
       ({0, 2} rather than {0, 1}) costs every running request a compute pass per token (4 streams on
       seq ids 1, 3, 5, 7 decode no faster than one after another).
    3. Then an empty slot, then the least recently used, so other conversations keep their caches.
    """
    best, best_len = None, 0
    for s in free:
        n = common_prefix(s.tokens, tokens)
        if n > best_len and len(s.tokens) - n <= max(8, len(s.tokens) // 10):
            best, best_len = s, n
    if best is not None:
        return best
    return min(free, key=lambda s: (runs([*busy, s.seq_id]), len(s.tokens) > 0, s.last_used))


class Scheduler:
    """Owns a llama.cpp context; admits jobs into slots and advances all of them one step at a time."""

    def __init__(self, model: Any, ctx: Any, cfg: SlotConfig):
        self.model = model  # llama_cpp._internals.LlamaModel
        self.ctx = ctx  # raw llama_context_p
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.vocab = model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.cfg = cfg
        self.slots = [_Slot(seq_id=i) for i in range(cfg.n_slots)]
        self.waiting: deque[Job] = deque()
        self.batch = llama_cpp.llama_batch_init(cfg.n_batch, 0, 1)
        self._piece = ctypes.create_string_buffer(256)

    # -- requests ---------------------------------------------------------------------------
    def grammar_ok(self, grammar: str) -> bool:
        """Whether llama.cpp parses `grammar` (checked before a job is queued, so it cannot fail later)."""
        g = llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not g:
            return False
        llama_cpp.llama_sampler_free(g)
        return True

    def submit(self, job: Job) -> None:
        self.waiting.append(job)

    def cancel(self, req_id: str) -> bool:
        for i, job in enumerate(self.waiting):
            if job.req_id == req_id:
                del self.waiting[i]
                return True
        for slot in self.slots:
            if slot.seq is not None and slot.seq.job.req_id == req_id:
                self._release(slot)
                return True
        return False

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(s.seq is not None for s in self.slots)

    def stats(self) -> dict[str, int]:
        return {
            "slots": len(self.slots),
            "slots_busy": sum(s.seq is not None for s in self.slots),
            "waiting": len(self.waiting),
            "cached_tokens": sum(len(s.tokens) for s in self.slots),
            "capacity_tokens": len(self.slots) * self.cfg.n_ctx_slot,
        }

    # -- the loop body ----------------------------------------------------------------------
    def step(self) -> list[Out]:
        """Admit, decode one batch, sample. Returns the events produced."""
        out: list[Out] = []
        self._admit(out)
        active = [s for s in self.slots if s.seq is not None]
        if not active:
            return out
        b = self.batch
        b.n_tokens = 0
        sample_at: list[tuple[_Slot, int]] = []

        def add(slot: _Slot, token: int, logits: bool) -> None:
            i = b.n_tokens
            b.token[i] = token
            b.pos[i] = len(slot.tokens)
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = slot.seq_id
            b.logits[i] = logits
            slot.tokens.append(token)
            b.n_tokens = i + 1
            if logits:
                sample_at.append((slot, i))

        decoding = [s for s in active if s.seq.next_token is not None]  # type: ignore[union-attr]
        for slot in decoding:
            seq = slot.seq
            assert seq is not None and seq.next_token is not None
            add(slot, seq.next_token, True)
            seq.next_token = None
        budget = self.cfg.n_batch - b.n_tokens
        if decoding:  # keep running streams flowing: one compute pass per step while they decode
            budget = min(budget, max(8, self.cfg.prefill_chunk - b.n_tokens))
        for slot in active:
            seq = slot.seq
            assert seq is not None
            if not seq.pending or budget <= 0:
                continue
            chunk = seq.pending[:budget]
            del seq.pending[: len(chunk)]
            budget -= len(chunk)
            for j, tok in enumerate(chunk):
                add(slot, tok, not seq.pending and j == len(chunk) - 1)

        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            # The batch did not go in: roll back positions and fail every sequence in it.
            for slot in active:
                self._fail(slot, out, f"llama_decode failed ({rc})")
            return out

        now = time.monotonic()
        for slot, idx in sample_at:
            seq = slot.seq
            assert seq is not None
            slot.last_used = now
            token = seq.sampler.sample(self.ctx, idx)
            if seq.generated == 0:
                out.append(FirstToken(seq.job.req_id, now - seq.started))
            self._on_token(slot, token, out)
        return out

    # -- internals --------------------------------------------------------------------------
    def _admit(self, out: list[Out]) -> None:
        while self.waiting:
            free = [s for s in self.slots if s.seq is None]
            if not free:
                return
            job = self.waiting[0]
            slot = self._pick_slot(free, job.tokens)
            keep = common_prefix(slot.tokens, job.tokens)
            if keep == len(job.tokens):
                keep -= 1  # re-decode the last prompt token to get its logits
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, keep, -1)
            del slot.tokens[keep:]
            slot.seq = _Seq(
                job=job,
                sampler=_Sampler(job.params, self.n_vocab, self.vocab, job.grammar),
                pending=job.tokens[keep:],
                cached=keep,
                stops=_StopFilter(job.params.stop),
            )
            self.waiting.popleft()
            out.append(Started(job.req_id, len(job.tokens), keep))

    def _pick_slot(self, free: list[_Slot], tokens: list[int]) -> _Slot:
        busy = [s.seq_id for s in self.slots if s.seq is not None]
        return pick_slot(free, busy, tokens)

    def _on_token(self, slot: _Slot, token: int, out: list[Out]) -> None:
        seq = slot.seq
        assert seq is not None
        job = seq.job
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            self._finish(slot, "stop", out)
            return
        seq.generated += 1
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        text = seq.decoder.decode(self._piece.raw[: max(n, 0)])
        emit, hit = seq.stops.feed(text)
        if emit:
            out.append(Text(job.req_id, emit))
        if hit:
            self._finish(slot, "stop", out, flush=False)
        elif seq.generated >= job.max_tokens or len(slot.tokens) >= self.cfg.n_ctx_slot:
            self._finish(slot, "length", out)
        else:
            seq.next_token = token

    def _finish(self, slot: _Slot, reason: str, out: list[Out], flush: bool = True) -> None:
        seq = slot.seq
        assert seq is not None
        if flush:
            tail = seq.stops.feed(seq.decoder.decode(b"", final=True))[0] + seq.stops.flush()
            if tail:
                out.append(Text(seq.job.req_id, tail))
        usage = Usage(prompt_tokens=len(seq.job.tokens), completion_tokens=seq.generated, cached_tokens=seq.cached)
        out.append(Finished(seq.job.req_id, reason, usage))  # type: ignore[arg-type]
        self._release(slot)

    def fail_all(self, message: str) -> list[Out]:
        """Fail every admitted and waiting job (after an unexpected error in a step)."""
        out: list[Out] = []
        for slot in self.slots:
            if slot.seq is not None:
                self._fail(slot, out, message)
        while self.waiting:
            out.append(Failed(self.waiting.popleft().req_id, Error(500, message)))
        return out

    def _fail(self, slot: _Slot, out: list[Out], message: str) -> None:
        seq = slot.seq
        assert seq is not None
        out.append(Failed(seq.job.req_id, Error(500, message)))
        llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, 0, -1)
        slot.tokens.clear()
        self._release(slot)

    def _release(self, slot: _Slot) -> None:
        if slot.seq is not None:
            slot.seq.sampler.free()
            slot.seq = None
        slot.last_used = time.monotonic()

    def close(self) -> None:
        for slot in self.slots:
            self._release(slot)
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
