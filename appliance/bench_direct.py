"""`appliance bench --direct`: llama-cpp-python's `Llama`, used in process on the same GGUF, threads, context
and prompts: what the appliance's serving layer (HTTP, the worker process, the scheduler) costs or saves over
the library it is built on.

It runs in a process of its own after the servers' scenarios (they sit idle meanwhile), and measures what
one in-process caller can: single-stream decode, a cold short prompt's TTFT, the first turn of the
~1,100-token conversations, and the same short prompt again after a 128-token answer. One `Llama` has one
sequence, so concurrency and shared-prefix scenarios have no counterpart here.

    python -m appliance.bench_direct '{"model": ..., "threads": 2, "ctx": 8192, "tokens": 128, "reps": 10,
                                       "nonce": "...", "doc_words": 22}'   → one JSON line of metrics
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

from appliance.bench_scenarios import DOC_WORDS, Timing, conversations, prompt


def _timed(chunks: Iterator[dict[str, Any]]) -> Timing:
    """llama-cpp-python streams one chunk per token (a multi-byte character may join two)."""
    t0 = time.perf_counter()
    first = last = 0.0
    n, text = 0, []
    for chunk in chunks:
        ch = chunk["choices"][0]
        piece = ch.get("text") or (ch.get("delta") or {}).get("content")
        if piece:
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
            text.append(piece)
    return Timing(t0, first, last, n, "".join(text))


def measure(cfg: dict[str, Any]) -> dict[str, float]:
    from llama_cpp import Llama

    threads = cfg["threads"]
    llm = Llama(
        model_path=cfg["model"],
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=cfg["ctx"],
        n_batch=512,
        verbose=False,
    )
    tokens, reps, nonce = cfg["tokens"], cfg["reps"], cfg["nonce"]

    rates, ttfts = [], []
    for i in range(reps + 1):
        t = _timed(llm.create_completion(prompt(i), max_tokens=tokens, temperature=0, stream=True))
        if i:  # the first is a warm-up, as in the scenarios
            rates.append(t.decode_tps)
            ttfts.append(t.ttft)

    again = []
    for i in range(max(1, min(reps, 3))):
        msgs = [{"role": "user", "content": f"({nonce}-{i}) Tell me a long story about a lighthouse keeper."}]
        _timed(llm.create_chat_completion(msgs, max_tokens=128, temperature=0, stream=True))
        again.append(_timed(llm.create_chat_completion(msgs, max_tokens=8, temperature=0, stream=True)).ttft)

    first_turn = []
    for h in conversations(nonce, DOC_WORDS * cfg["doc_words"]):
        first_turn.append(_timed(llm.create_chat_completion(h, max_tokens=24, temperature=0, stream=True)).ttft)

    return {
        "decode_tps": statistics.median(rates),
        "ttft_ms": statistics.median(ttfts) * 1e3,
        "repeat_ttft_ms": statistics.median(again) * 1e3,
        "prefill_first_turn_s": statistics.mean(first_turn),
    }


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
