"""Continuous batching over one llama.cpp context with several sequences (slots).

Each slot owns one sequence id, with its own KV stream (`kv_unified=False`: a sequence's attention
never sees another's cells, so outputs do not depend on the batch), and remembers the tokens it
holds. A new prompt starts from the longest cached prefix it shares with any slot, in place or copied
from another slot (`slots.py` has the rule), or with a slot's state parked in RAM before another prompt
took the slot (`host_cache.py`), written back. Every `step()` builds one `llama_batch` holding one token
for each decoding sequence (in sequence-id order) plus chunks of newcomers' prompts, runs one
`llama_decode`, and samples each sequence with its own sampler chain (`sampling.py`).
This module runs inside the worker process; it knows nothing about pipes or HTTP. It produces the
typed events of `protocol.py` (Started, FirstToken, Text, Finished, Failed), keyed by `Job.req_id`.
"""

from __future__ import annotations

import codecs
import ctypes
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from appliance.backends.llamacpp.host_cache import HostCache, Parked
from appliance.backends.llamacpp.protocol import Failed, Finished, FirstToken, Started, Text, WorkerEvent
from appliance.backends.llamacpp.sampling import Sampler, StopFilter, Vocab, logprob_entry
from appliance.backends.llamacpp.slots import Slot, SlotPolicy, in_flight, place
from appliance.engine.types import Error, SamplingParams, TokenLogprob, Usage

Out = WorkerEvent
PARK_MIN = 16  # tokens a slot must be about to lose before its state is parked in RAM (host_cache.py)


@dataclass
class SlotConfig:
    n_slots: int = 4
    n_ctx_slot: int = 8192
    n_batch: int = 512
    prefill_chunk: int = 256  # prompt tokens per step while other sequences are decoding
    policy: SlotPolicy = field(default_factory=SlotPolicy)
    host_cache_bytes: int = 0  # RAM for slot caches parked before their slot is taken (host_cache.py); 0: off


@dataclass
class Job:
    """One generation as the scheduler runs it: the tokenized prompt, the resolved token cap, and the
    request's sampling parameters (`params.stop` includes the chat template's own stop strings)."""

    req_id: str  # the internal generation id (never the client's X-Request-Id)
    tokens: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    grammar: str | None = None  # GBNF (grammar.py): structured outputs, enforced token by token


@dataclass
class _Seq:
    job: Job
    sampler: Sampler
    pending: list[int]  # prompt tokens not yet decoded
    cached: int  # prompt tokens reused from a cache (the slot's own or a copy)
    stops: StopFilter
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    next_token: int | None = None  # sampled, to be decoded in the next step
    generated: int = 0
    started: float = field(default_factory=time.monotonic)
    # logprobs: (entry, first char, end char) of each token in the decoded text, until its text is sent
    lp: list[tuple[TokenLogprob, int, int]] = field(default_factory=list)
    chars: int = 0  # characters decoded so far
    emitted: int = 0  # characters sent so far


class Scheduler:
    """Owns a llama.cpp context; admits jobs into slots and advances all of them one step at a time."""

    def __init__(self, model: Any, ctx: Any, cfg: SlotConfig):
        self.model = model  # llama_cpp._internals.LlamaModel
        self.ctx = ctx  # raw llama_context_p
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.vocab = model.vocab
        self.tok = Vocab(self.vocab)
        self.n_vocab = self.tok.n_vocab
        self.cfg = cfg
        self.slots = [Slot(seq_id=i) for i in range(cfg.n_slots)]
        self.waiting: deque[Job] = deque()
        self.batch = llama_cpp.llama_batch_init(cfg.n_batch, 0, 1)
        for i in range(cfg.n_batch):  # every token belongs to one sequence
            self.batch.n_seq_id[i] = 1
        self.copies = 0  # prefixes copied from one slot into another
        self.reused = 0  # prompt tokens taken from a cache
        self.host = HostCache(cfg.host_cache_bytes) if cfg.host_cache_bytes > 0 else None

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
            "prefix_copies": self.copies,
            "reused_tokens": self.reused,
            "parked_states": len(self.host) if self.host else 0,
            "parked_bytes": self.host.used if self.host else 0,
            "restored_states": self.host.restored if self.host else 0,
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
        n = 0
        sample_at: list[tuple[Slot, int]] = []
        token, pos, seq_id, logits = b.token, b.pos, b.seq_id, b.logits

        decoding = [s for s in active if s.seq.next_token is not None]
        for slot in decoding:
            seq = slot.seq
            t = seq.next_token
            token[n], pos[n], logits[n] = t, len(slot.tokens), True
            seq_id[n][0] = slot.seq_id
            slot.tokens.append(t)
            sample_at.append((slot, n))
            seq.next_token = None
            n += 1
        budget = self.cfg.n_batch - n
        if decoding:  # keep running streams flowing: one bounded compute pass per step while they decode
            budget = min(budget, max(8, self.cfg.prefill_chunk - n))
        for slot in active:
            seq = slot.seq
            if not seq.pending or budget <= 0:
                continue
            chunk = seq.pending[:budget]
            del seq.pending[: len(chunk)]
            budget -= len(chunk)
            p0, sid = len(slot.tokens), slot.seq_id
            for j, t in enumerate(chunk):
                token[n + j], pos[n + j], logits[n + j] = t, p0 + j, False
                seq_id[n + j][0] = sid
            slot.tokens += chunk
            n += len(chunk)
            if not seq.pending:
                logits[n - 1] = True
                sample_at.append((slot, n - 1))
        b.n_tokens = n

        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            # The batch did not go in: fail every sequence in it (their caches are dropped).
            for slot in active:
                self._fail(slot, out, f"llama_decode failed ({rc})")
            return out

        now = time.monotonic()
        for slot, idx in sample_at:
            seq = slot.seq
            slot.last_used = now
            try:
                t = seq.sampler.sample(self.ctx, idx)
            except RuntimeError as e:  # e.g. a grammar that allows no token here: end this one, not the batch
                self._fail(slot, out, str(e))
                continue
            if seq.generated == 0:
                out.append(FirstToken(seq.job.req_id, now - seq.started))
            self._on_token(slot, t, idx, out)
        return out

    # -- internals --------------------------------------------------------------------------
    def _admit(self, out: list[Out]) -> None:
        deferred: list[Job] = []
        while self.waiting:
            free = [s for s in self.slots if s.seq is None]
            if not free:
                break
            job = self.waiting.popleft()
            running = [s for s in self.slots if s.seq is not None]
            busy = [s.seq_id for s in running]
            p = place(free, running, busy, job.tokens, self.cfg.policy)
            if in_flight(running, job.tokens, p.keep, self.cfg.policy):
                deferred.append(job)  # another slot is computing its prefix: copy that when it is done
                continue
            slot, keep = p.slot, p.keep
            parked, held = self.host.best(job.tokens) if self.host is not None else (None, 0)
            restore = parked is not None and held - self.cfg.policy.restore_cost > keep
            keep = min(held if restore else keep, len(job.tokens) - 1)  # re-decode the last token for its logits
            self._park(slot, 0 if restore or p.source is not None else keep)  # before anything overwrites it
            if restore:
                keep = self._restore(slot, parked, keep)  # type: ignore[arg-type]
            elif p.source is not None:
                # One stream per sequence: llama.cpp copies whole streams only (a partial copy aborts).
                llama_cpp.llama_memory_seq_cp(self.mem, p.source.seq_id, slot.seq_id, -1, -1)
                slot.tokens = list(p.source.tokens)
                self.copies += 1
            if not llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, keep, -1):  # recurrent state: all or none
                llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
                keep = 0
            del slot.tokens[keep:]
            self.reused += keep
            slot.seq = _Seq(
                job=job,
                sampler=Sampler(job.params, self.n_vocab, self.vocab, job.grammar),
                pending=job.tokens[keep:],
                cached=keep,
                stops=StopFilter(job.params.stop),
            )
            out.append(Started(job.req_id, len(job.tokens), keep))
        self.waiting.extendleft(reversed(deferred))

    def _park(self, slot: Slot, keep: int) -> None:
        """Copy the slot's state into the host cache when more than a little of it is about to be dropped
        (all but its first `keep` tokens), unless a parked state already holds it."""
        if self.host is None or len(slot.tokens) - keep < PARK_MIN or self.host.covers(slot.tokens):
            return
        size = llama_cpp.llama_state_seq_get_size(self.ctx, slot.seq_id)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, slot.seq_id)
        if n:
            self.host.put(list(slot.tokens), ctypes.string_at(buf, n))

    def _restore(self, slot: Slot, parked: Parked, keep: int) -> int:
        """Write a parked state into the (cleared) slot; the prompt tokens it gives (0 if llama.cpp refused)."""
        llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        data = (ctypes.c_uint8 * len(parked.data)).from_buffer_copy(parked.data)
        if not llama_cpp.llama_state_seq_set_data(self.ctx, data, len(parked.data), slot.seq_id):
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
            slot.tokens = []
            return 0
        self.host.touch(parked)  # type: ignore[union-attr]
        slot.tokens = list(parked.tokens)
        return keep

    def _on_token(self, slot: Slot, token: int, idx: int, out: list[Out]) -> None:
        seq = slot.seq
        job = seq.job
        tok = self.tok
        if tok.is_eog(token):
            self._finish(slot, "stop", out)
            return
        seq.generated += 1
        text = seq.decoder.decode(tok.piece(token))
        k = job.params.logprobs
        if k is not None:
            entry = logprob_entry(self.ctx, idx, self.n_vocab, token, k, tok)
            start = seq.chars
            seq.chars += len(text)
            seq.lp.append((entry, start, seq.chars))
        emit, hit = seq.stops.feed(text)
        seq.emitted += len(emit)
        if emit or seq.lp:
            self._text(seq, emit, out, final=hit)
        if hit:
            self._finish(slot, "stop", out, flush=False)
        elif seq.generated >= job.max_tokens or len(slot.tokens) >= self.cfg.n_ctx_slot:
            self._finish(slot, "length", out)
        else:
            seq.next_token = token

    def _text(self, seq: _Seq, text: str, out: list[Out], final: bool = False) -> None:
        """Send `text` with the logprobs of the tokens it completes (at the end: of every token it shows)."""
        lps: tuple[TokenLogprob, ...] | None = None
        if seq.lp:
            done = seq.emitted
            n = sum(1 for _, start, end in seq.lp if end <= done or (final and start < done))
            lps = tuple(e for e, _, _ in seq.lp[:n])
            del seq.lp[:n]
            if final:
                seq.lp.clear()  # tokens of a stop string: not part of the output
        if text or lps:
            out.append(Text(seq.job.req_id, text, lps))

    def _finish(self, slot: Slot, reason: str, out: list[Out], flush: bool = True) -> None:
        seq = slot.seq
        if flush:
            tail = seq.stops.feed(seq.decoder.decode(b"", final=True))[0] + seq.stops.flush()
            seq.emitted += len(tail)
            self._text(seq, tail, out, final=True)
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

    def _fail(self, slot: Slot, out: list[Out], message: str) -> None:
        out.append(Failed(slot.seq.job.req_id, Error(500, message)))
        llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, 0, -1)
        slot.tokens.clear()
        self._release(slot)

    def _release(self, slot: Slot) -> None:
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
