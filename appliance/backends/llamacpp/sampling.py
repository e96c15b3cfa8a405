"""Per-token work of the scheduler that is not batching: the sampler chain, token text, stop strings and
log-probabilities.

What runs for every generated token is kept small: sampling is one call into llama.cpp's sampler chain
(grammar, logit bias, penalties, top-k/p, min-p, temperature, all in C); a token's text and whether it
ends the generation are looked up once per token id and cached (`Vocab`); the stop scan looks only at the
end of the text and skips the prefix search when the last character cannot start a stop string.
Log-probabilities are computed (numpy over the logits row) only for requests that asked for them.
"""

from __future__ import annotations

import ctypes
import math
import random
from typing import Any

import llama_cpp
import numpy as np

from appliance.engine.types import SamplingParams, TokenLogprob

MAX_LOGIT_BIAS = 300  # entries in one request's logit_bias (OpenAI's documented bound is the same order)


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


class Sampler:
    """A llama.cpp sampler chain for one sequence (freed with the sequence).

    A grammar is applied lazily, as llama.cpp's own server does: the chain samples from all tokens, the
    grammar checks only the token chosen, and only when it rejects that token does the grammar mask the
    whole vocabulary (tens of milliseconds per token for a 49k vocabulary) before the chain samples again.
    Greedy decoding picks the same token either way; sampled decoding draws from the allowed tokens.
    """

    def __init__(self, p: SamplingParams, n_vocab: int, vocab: Any = None, grammar: str | None = None):
        params = llama_cpp.llama_sampler_chain_default_params()
        self.ptr = llama_cpp.llama_sampler_chain_init(params)
        self.grammar: Any = None
        self.n_vocab = n_vocab
        add = llama_cpp.llama_sampler_chain_add
        if p.logit_bias:  # first: what the client pushes up or down, before the grammar and penalties see it
            items = list(p.logit_bias.items())
            arr = (llama_cpp.llama_logit_bias * len(items))()
            for i, (tok, bias) in enumerate(items):
                arr[i].token, arr[i].bias = int(tok), float(bias)
            add(self.ptr, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(items), arr))
        if grammar is not None:  # checked after the chain (see the class docstring), not in it
            self.grammar = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
            if not self.grammar:
                self.grammar = None
                self.free()
                raise ValueError("the grammar could not be parsed")
            self._cur = np.empty(n_vocab, dtype=_TOKEN_DATA)
            self._ids = np.arange(n_vocab, dtype=np.int32)
            self._arr = llama_cpp.llama_token_data_array(
                self._cur.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), n_vocab, -1, False
            )
            self._one = np.empty(1, dtype=_TOKEN_DATA)
            self._one_arr = llama_cpp.llama_token_data_array(
                self._one.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), 1, -1, False
            )
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
        if self.grammar is None:
            return llama_cpp.llama_sampler_sample(self.ptr, ctx, idx)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, idx), shape=(self.n_vocab,))
        token = self._apply(logits, self.ptr)
        self._one[0] = (token, 1.0, 0.0)
        self._one_arr.size, self._one_arr.selected, self._one_arr.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(self._one_arr))
        if not np.isfinite(self._one["logit"][0]):  # the grammar refuses it: mask everything, sample again
            token = self._apply(logits, self.grammar, self.ptr)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.ptr, token)
        return token

    def _apply(self, logits: Any, *samplers: Any) -> int:
        """Run `samplers` over fresh candidates built from `logits`; the token the last one selected."""
        cur, arr = self._cur, self._arr
        cur["id"] = self._ids
        cur["logit"] = logits
        cur["p"] = 0.0
        arr.size, arr.selected, arr.sorted = self.n_vocab, -1, False
        for smpl in samplers:
            llama_cpp.llama_sampler_apply(smpl, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:  # nothing selectable (the grammar allows no token at all)
            raise RuntimeError("the sampler selected no token")
        return int(arr.data[arr.selected].id)  # samplers reorder the candidates in place

    def free(self) -> None:
        if self.ptr is not None:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None
        if self.grammar is not None:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None


def check_logit_bias(bias: dict[int, float], n_vocab: int) -> str | None:
    """Why a logit_bias cannot be used with this model (None: it can)."""
    if len(bias) > MAX_LOGIT_BIAS:
        return f"at most {MAX_LOGIT_BIAS} entries are allowed"
    for tok, value in bias.items():
        if not 0 <= tok < n_vocab:
            return f"token id {tok} is not in this model's vocabulary (0 to {n_vocab - 1})"
        if not -100 <= value <= 100 or math.isnan(value):
            return f"the bias of token {tok} must be between -100 and 100"
    return None


class Vocab:
    """Token text and end-of-generation flags, asked of llama.cpp once per token id and then cached."""

    def __init__(self, vocab: Any):
        self.vocab = vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self._buf = ctypes.create_string_buffer(256)
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self._text: dict[int, str] = {}

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for in generated text (special tokens render as nothing)."""
        b = self._pieces.get(token)
        if b is None:
            n = llama_cpp.llama_token_to_piece(self.vocab, token, self._buf, len(self._buf), 0, False)
            if n < 0:  # longer than the buffer: -n is the size needed
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
                b = buf.raw[: max(n, 0)]
            else:
                b = self._buf.raw[:n]
            self._pieces[token] = b
        return b

    def is_eog(self, token: int) -> bool:
        e = self._eog.get(token)
        if e is None:
            e = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))
        return e

    def text(self, token: int) -> str:
        """The token as logprobs show it: its text, or OpenAI's `bytes:\\xNN` form for a partial character."""
        t = self._text.get(token)
        if t is None:
            b = self.piece(token)
            try:
                t = b.decode("utf-8")
            except UnicodeDecodeError:
                t = "bytes:" + "".join(f"\\x{c:02x}" for c in b)
            self._text[token] = t
        return t


def logprob_entry(ctx: Any, idx: int, n_vocab: int, token: int, k: int, vocab: Vocab) -> TokenLogprob:
    """The sampled token's log-probability and the `k` most likely tokens, from the raw logits of row `idx`.

    Raw: the model's own distribution (log-softmax of its logits), before logit bias, penalties, grammar,
    temperature and truncation, as llama.cpp's server reports them.
    """
    ptr = llama_cpp.llama_get_logits_ith(ctx, idx)
    logits = np.ctypeslib.as_array(ptr, shape=(n_vocab,))
    m = float(logits.max())
    lse = m + math.log(float(np.exp(logits - m, dtype=np.float64).sum()))
    top: tuple[tuple[str, float], ...] = ()
    if k > 0:
        ids = np.argpartition(logits, -k)[-k:]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        top = tuple((vocab.text(int(i)), float(logits[i]) - lse) for i in ids)
    return TokenLogprob(vocab.text(token), float(logits[token]) - lse, top)


class StopFilter:
    """Holds back text that may be the start of a stop string; finds complete ones."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.chars = {c for s in self.stops for c in s[:-1]}  # characters a held-back prefix can end with
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        buf = self.held + text
        if not self.stops:
            self.held = ""
            return buf, False
        if not buf:
            return "", False
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        hold = 0
        if buf[-1] in self.chars:  # else no stop string can start in what is left: nothing to hold
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
