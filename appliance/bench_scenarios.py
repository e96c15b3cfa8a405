"""The benchmark's scenarios: each one runs against any OpenAI-compatible server over HTTP.

Every scenario is `async def name(client, cfg) -> dict[str, float]` where `client` is an `httpx.AsyncClient`
on the server's base URL and `cfg` the run's `Config`; the keys of the dict are the metrics of `METRICS`
(bench.py prints them side by side and divides the appliance's by each other server's). Prompts that
measure prefill carry the run's nonce, so that a server already running (--against) starts them cold.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Config:
    model: str  # the `model` field to send
    tokens: int = 128  # tokens per generation in the decode scenarios
    reps: int = 10  # single-stream repetitions
    turns: int = 3  # turns of the interleaved conversations
    streams: tuple[int, ...] = (1, 4, 8)
    rounds: int = 4  # rounds per stream count (the first is a warm-up)
    health_chats: int = 300  # concurrent chats while /health is probed
    health_tokens: int = 16
    answer_tokens: int = 128  # the long answer before the repeated prompt
    doc_words: int = 22  # DOC_WORDS repeats in the long prompts: 22 is ~1,000 tokens
    nonce: str = ""

    @property
    def doc(self) -> str:
        return DOC_WORDS * self.doc_words


@dataclass(frozen=True)
class Metric:
    label: str
    unit: str  # printed after the value
    better: str  # "lower" or "higher": how to read the ratio appliance / other
    digits: int = 1


METRICS: dict[str, Metric] = {
    "start_to_ready_s": Metric("start to /health 200", "s", "lower", 2),
    "decode_tps": Metric("single-stream decode", "tok/s", "higher"),
    "ttft_ms": Metric("TTFT, cold short prompt (p50)", "ms", "lower", 0),
    "repeat_ttft_ms": Metric("TTFT, same short prompt again after a 128-token answer", "ms", "lower", 0),
    "prefill_first_turn_s": Metric("first turn of a ~1,100-token conversation (TTFT)", "s", "lower", 2),
    "later_over_first": Metric("later-turn / first-turn TTFT, 4 interleaved conversations", "", "lower", 3),
    "agg_4_over_1": Metric("aggregate tokens/s, 4 streams over 1", "x", "higher", 2),
    "agg_8_over_1": Metric("aggregate tokens/s, 8 streams over 1", "x", "higher", 2),
    "agg_8_tps": Metric("aggregate at 8 streams", "tok/s", "higher"),
    "shared_prefill_s": Metric("8 requests sharing a ~1,000-token system prompt: all first tokens", "s", "lower", 2),
    "health_p50_ms": Metric("/health p50 while the chats run (300 by default)", "ms", "lower"),
    "health_p99_ms": Metric("/health p99 while the chats run (300 by default)", "ms", "lower"),
    "json_tps": Metric("decode with a JSON-schema grammar", "tok/s", "higher"),
    "json_over_free": Metric("JSON-schema decode / unconstrained decode", "x", "higher", 2),
    "embed_decode_ratio": Metric("decode while the embedding model loads / decode alone", "x", "higher", 2),
    "embed_first_s": Metric("first /v1/embeddings after start (loads the model)", "s", "lower", 1),
    "rss_idle_mib": Metric("RSS of the server's processes, idle after the runs", "MiB", "lower", 0),
    "rss_growth_pct": Metric("RSS growth over the RSS-check requests", "%", "lower"),
}

DOC_WORDS = (
    "The river valley was settled by farmers who grew barley and kept sheep; over centuries they built "
    "terraces, mills and a stone bridge, traded wool with coastal towns, and recorded floods in a chapel ledger. "
)


def prompt(k: int) -> str:
    """The k-th decode prompt: greedy decoding runs it to max_tokens for every k, so N concurrent streams
    really are N until the end. (A leading "{k} " made the model stop after ~20 tokens for some k.)"""
    return f"List {k + 1}: the numbers from 1 to 500, one per line:\n1\n2\n3\n"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


@dataclass
class Timing:
    start: float
    first: float  # first text (0.0: none came)
    last: float
    tokens: int
    text: str

    @property
    def ttft(self) -> float:
        return (self.first or self.last or time.perf_counter()) - self.start

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / (self.last - self.first) if self.tokens > 1 and self.last > self.first else 0.0


async def stream(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> Timing:
    """One streamed request, sent again once if the server had closed the pooled keep-alive connection
    (llama-server closes idle ones after 5 s: httpx then sees the connection drop before any answer)."""
    try:
        return await _stream(client, path, body)
    except httpx.RemoteProtocolError:
        return await _stream(client, path, body)


async def _stream(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> Timing:
    """Tokens come from the usage chunk when the server sends one (the appliance may send several tokens
    per chunk), else one per text chunk (llama-server sends one token per chunk)."""
    t0 = time.perf_counter()
    first = last = 0.0
    usage_tokens, chunks, text = 0, 0, []
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"{path} answered {r.status_code}: {r.text[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage_tokens = obj["usage"].get("completion_tokens") or 0
            ch = obj.get("choices") or [{}]
            piece = ch[0].get("text") or (ch[0].get("delta") or {}).get("content")
            if piece:
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
                text.append(piece)
    return Timing(t0, first, last, usage_tokens or chunks, "".join(text))


def chat(cfg: Config, messages: list[dict], max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": cfg.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}


# -- scenarios -------------------------------------------------------------------------------------


async def decode(c: httpx.AsyncClient, cfg: Config) -> dict[str, float]:
    ttfts, rates = [], []
    for i in range(cfg.reps + 1):
        body = {"model": cfg.model, "prompt": prompt(i), "max_tokens": cfg.tokens, "temperature": 0}
        t = await stream(c, "/v1/completions", body)
        if i:  # the first is a warm-up
            ttfts.append(t.ttft)
            rates.append(t.decode_tps)
    return {"decode_tps": statistics.median(rates), "ttft_ms": pct(ttfts, 0.5) * 1e3}


async def repeated_prompt(c: httpx.AsyncClient, cfg: Config) -> dict[str, float]:
    """A short question answered at length (128 tokens), then asked again: a retry, a regenerate, the same
    question from two users. A server that reuses the cached prefix answers the second one at once."""
    again = []
    for i in range(max(1, min(cfg.reps, 3))):
        msgs = [{"role": "user", "content": f"({cfg.nonce}-{i}) Tell me a long story about a lighthouse keeper."}]
        await stream(c, "/v1/chat/completions", chat(cfg, msgs, cfg.answer_tokens))
        again.append((await stream(c, "/v1/chat/completions", chat(cfg, msgs, 8))).ttft)
    return {"repeat_ttft_ms": statistics.median(again) * 1e3}


def conversations(nonce: str, doc: str) -> list[list[dict]]:
    return [
        [
            {
                "role": "user",
                "content": f"({nonce}) Read this chronicle, then answer about {t}.\n\n{doc}\n\nWhat about {t}?",
            }
        ]
        for t in ("the valley", "the bridge", "the mills", "the floods")
    ]


async def interleaved(c: httpx.AsyncClient, cfg: Config) -> dict[str, float]:
    """4 conversations of ~1,100 tokens, one turn each in turn: the first turns are cold prefills, the
    later ones find their history cached (if the server kept it while serving the other three)."""
    first_turn, later_turn = [], []
    histories = conversations(cfg.nonce, cfg.doc)
    for turn in range(cfg.turns):
        for h in histories:
            t = await stream(c, "/v1/chat/completions", chat(cfg, h, 24))
            (first_turn if turn == 0 else later_turn).append(t.ttft)
            h += [{"role": "assistant", "content": t.text}, {"role": "user", "content": "Tell me more, briefly."}]
    out = {"prefill_first_turn_s": statistics.mean(first_turn)}
    if later_turn:
        out["later_over_first"] = statistics.mean(later_turn) / out["prefill_first_turn_s"]
    return out


async def aggregate(c: httpx.AsyncClient, cfg: Config) -> dict[str, float]:
    """Aggregate tokens/s at each stream count: one warm-up round, then the median of the rest. The rounds
    send the same prompts, so every timed round finds them cached alike: this measures decoding N at once."""
    agg: dict[int, float] = {}
    for n in cfg.streams:
        bodies = [
            {"model": cfg.model, "prompt": prompt(k), "max_tokens": cfg.tokens, "temperature": 0} for k in range(n)
        ]
        rounds = []
        for _ in range(max(2, cfg.rounds)):
            t0 = time.perf_counter()
            res = await asyncio.gather(*(stream(c, "/v1/completions", b) for b in bodies))
            rounds.append(sum(r.tokens for r in res) / (max(r.last for r in res) - t0))
        agg[n] = statistics.median(rounds[1:])
    out = {f"agg_{n}_tps": tps for n, tps in agg.items()}
    out.update({f"agg_{n}_over_1": tps / agg[1] for n, tps in agg.items() if n > 1 and 1 in agg})
    return out


async def shared_system_prompt(c: httpx.AsyncClient, cfg: Config) -> dict[str, float]:
    """8 requests at once, one ~1,000-token system prompt (cold), 8 different questions: the time until all
    8 have their first token. A server that prefills the shared prefix once beats one that does it 8 times."""
    system = f"({cfg.nonce}-shared) You are the archivist of this chronicle. Answer from it only.\n\n{cfg.doc}"
    questions = [
        "the valley",
        "the bridge",
        "the mills",
        "the floods",
        "the sheep",
        "the wool",
        "the ledger",
        "the towns",
    ]
    t0 = time.perf_counter()
    res = await asyncio.gather(
        *(
            stream(
                c,
                "/v1/chat/completions",
                chat(cfg, [{"role": "system", "content": system}, {"role": "user", "content": f"What about {q}?"}], 8),
            )
            for q in questions
        )
    )
    return {"shared_prefill_s": max(r.first or r.last for r in res) - t0}


async def json_grammar(c: httpx.AsyncClient, cfg: Config) -> dict[str, float]:
    """Decode speed under a JSON-schema grammar (response_format json_schema) and without, same prompt."""
    schema = {
        "type": "object",
        "properties": {"numbers": {"type": "array", "items": {"type": "integer"}}},
        "required": ["numbers"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "numbers", "schema": schema}}
    msgs = [{"role": "user", "content": 'Count from 1 to 300 as JSON: {"numbers": [1, 2, 3, ...]}'}]
    free, constrained = [], []
    for _ in range(max(1, min(cfg.reps, 3))):
        free.append((await stream(c, "/v1/chat/completions", chat(cfg, msgs, cfg.tokens))).decode_tps)
        t = await stream(c, "/v1/chat/completions", chat(cfg, msgs, cfg.tokens, response_format=fmt))
        constrained.append(t.decode_tps)
    f, j = statistics.median(free), statistics.median(constrained)
    return {"json_tps": j, "json_over_free": j / f if f else 0.0}


PROBE = """
import sys, time, http.client
host, port = sys.argv[1], int(sys.argv[2])
while True:
    t0 = time.perf_counter()
    try:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
    except OSError:
        ok = False
    print(f"{(time.perf_counter() - t0) * 1000:.3f}" if ok else "failed", flush=True)
    time.sleep(0.05)
"""


async def health_under_load(c: httpx.AsyncClient, cfg: Config) -> dict[str, float]:
    """/health latency, probed every 50 ms from a separate process (a new connection each time, like a load
    balancer), while `health_chats` chats run at once. Non-streamed chats keep this client's loop idle.
    `health_chats_ok` counts the chats answered 200: the appliance turns away those beyond its slots and
    queue (APPLIANCE_MAX_QUEUE) with a 503 at once, where llama-server queues them all."""
    url, n = c.base_url, cfg.health_chats
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=str(url), timeout=900, limits=limits) as many:

        async def one(i: int) -> bool:
            msgs = [{"role": "user", "content": f"Say something about the number {i}."}]
            try:
                r = await many.post("/v1/chat/completions", json=chat(cfg, msgs, cfg.health_tokens))
            except httpx.HTTPError:
                return False
            return r.status_code == 200

        # The probe starts first: the chats' arrival (n requests parsed and queued at once) is part of the load.
        probe = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PROBE, url.host, str(url.port or 80),
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )  # fmt: skip

        async def read() -> None:
            assert probe.stdout is not None
            async for line in probe.stdout:
                text = line.decode().strip()
                latencies.append(10_000.0 if text == "failed" else float(text))

        reader = asyncio.create_task(read())
        while not latencies and probe.returncode is None:
            await asyncio.sleep(0.01)
        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        try:
            ok = await asyncio.gather(*tasks)
        finally:
            probe.terminate()
            await probe.wait()
            await reader
    if not latencies:
        raise RuntimeError("no /health probe finished while the chats ran")
    return {
        "health_p50_ms": pct(latencies, 0.5),
        "health_p99_ms": pct(latencies, 0.99),
        "health_probes": float(len(latencies)),
        "health_chats_ok": float(sum(ok)),
    }


EMBEDDING_MODEL = "all-minilm-l6-v2"  # the appliance's own; servers that do not list it skip the scenario


async def embedding_load(c: httpx.AsyncClient, cfg: Config) -> dict[str, float]:
    """Decode speed while the embedding model loads, over decode speed alone, and how long the first
    /v1/embeddings request took. The appliance loads that model on first use, in a process of its own at low
    CPU priority with one thread: the generation running meanwhile should keep its speed. Needs a server that
    has not loaded it yet (a fresh one: `appliance bench` starts one, and runs this scenario last)."""
    models = (await c.get("/v1/models")).json().get("data") or []
    if not any(m.get("id") == EMBEDDING_MODEL for m in models):
        return {}
    body = {"model": cfg.model, "prompt": prompt(0), "max_tokens": cfg.tokens, "temperature": 0}
    alone = [(await stream(c, "/v1/completions", body)).decode_tps for _ in range(3)]

    async def embed() -> float:
        t0 = time.perf_counter()
        while True:  # a request waits APPLIANCE_EMBEDDINGS_WAIT (60 s) for the load, then 503: ask again
            r = await c.post("/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": "hello"}, timeout=900)
            if r.status_code == 200:
                return time.perf_counter() - t0
            if r.status_code != 503 or time.perf_counter() - t0 > 900:
                raise RuntimeError(f"/v1/embeddings answered {r.status_code}: {r.text[:300]}")

    loading = asyncio.create_task(embed())
    during = []
    while not loading.done() or not during:
        during.append((await stream(c, "/v1/completions", body)).decode_tps)
    first = await loading
    return {"embed_decode_ratio": statistics.median(during) / statistics.median(alone), "embed_first_s": first}


SCENARIOS = {
    "decode": decode,
    "repeated": repeated_prompt,
    "interleaved": interleaved,
    "aggregate": aggregate,
    "shared": shared_system_prompt,
    "json": json_grammar,
    "health": health_under_load,
    "embed_load": embedding_load,  # last, after the idle RSS (bench.py): it loads the embedding model
}
# Scenarios run in alternating rounds (servers A B, then B A, …; the median of each server's rounds): a
# drift in this VM's speed over the minute a scenario takes (5-20 % seen) then touches every server alike.
ROUNDS = {"decode": 3, "aggregate": 2}
LAST = ("embed_load",)  # run after the idle RSS is measured: the RSS target is before any embedding request
