"""OpenAI's logprobs and logit_bias on the wire: request validation and response shapes.

Chat: `logprobs: true` and `top_logprobs` (0-20) give `choices[].logprobs.content[]` entries of `{token,
logprob, bytes, top_logprobs[]}`. Completions: `logprobs` (0-5) gives `choices[].logprobs` with parallel lists
`tokens`, `token_logprobs`, `top_logprobs` (one `{token: logprob}` object per token) and `text_offset`.
The values are the model's own log-probabilities: log-softmax of the raw logits, before logit_bias,
penalties, grammar, temperature and top-k/p (see backends/llamacpp/sampling.py). A token that is part of a
UTF-8 character shows as `bytes:\\xNN...` (OpenAI's form), its bytes in `bytes`.
"""

from __future__ import annotations

import codecs
import math
import re
from typing import Any

from pydantic import Field

from appliance.api.protocol.common import ResponseModel
from appliance.engine.types import TokenLogprob

MAX_LOGIT_BIAS = 300  # entries; each one is a token id (as a string) and a bias in -100..100
_BYTES = re.compile(r"\\x([0-9a-f]{2})")


def valid_logit_bias(v: Any) -> Any:
    """`logit_bias` checked whole, so that every problem is a 400 naming `logit_bias` itself."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ValueError("expected an object mapping token ids to biases")
    if len(v) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} entries are allowed")
    for key, bias in v.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 9):
            raise ValueError(f"keys must be token ids (non-negative integers as strings), not {key[:20]!r}")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not math.isfinite(bias):
            raise ValueError(f"the bias of token {key} must be a number")
        if not -100 <= bias <= 100:
            raise ValueError(f"the bias of token {key} must be between -100 and 100")
    return {k: float(b) for k, b in v.items()}


def logit_bias_of(v: dict[str, float] | None) -> dict[int, float]:
    return {int(k): b for k, b in (v or {}).items()}


def token_bytes(token: str) -> list[int]:
    if token.startswith("bytes:"):
        return [int(h, 16) for h in _BYTES.findall(token)]
    return list(token.encode("utf-8"))


class TopLogprob(ResponseModel):
    token: str
    logprob: float = Field(le=0)
    bytes: list[int] | None


class ChatTokenLogprob(ResponseModel):
    token: str
    logprob: float = Field(le=0)
    bytes: list[int] | None
    top_logprobs: list[TopLogprob] = Field(description="the most likely tokens at this position, most likely first")


class ChatLogprobs(ResponseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


def _lp(x: float) -> float:
    return min(0.0, x)


def chat_logprobs(entries: list[TokenLogprob] | None) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=e.token,
                logprob=_lp(e.logprob),
                bytes=token_bytes(e.token),
                top_logprobs=[TopLogprob(token=t, logprob=_lp(lp), bytes=token_bytes(t)) for t, lp in e.top],
            )
            for e in entries or []
        ]
    )


class CompletionLogprobs(ResponseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int] = Field(description="where each token starts in the choice's text, in characters")


class CompletionOffsets:
    """Builds completion logprobs chunk by chunk, keeping `text_offset` running across them."""

    def __init__(self, start: int = 0):
        self.offset = start
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def __call__(self, entries: list[TokenLogprob] | None) -> CompletionLogprobs:
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for e in entries or []:
            out.tokens.append(e.token)
            out.token_logprobs.append(_lp(e.logprob))
            out.top_logprobs.append({t: _lp(lp) for t, lp in e.top})
            out.text_offset.append(self.offset)
            self.offset += len(self._decoder.decode(bytes(token_bytes(e.token))))
        return out
