"""`appliance bench` / `scripts/bench.py`: the appliance over HTTP against llama-cpp-python in process, one run.

Measures, on the embedded model with the same thread count:
  1. single-stream decode tokens/s and TTFT (p50/p95): direct `llama_cpp.Llama` vs the appliance over HTTP;
  2. first-turn vs later-turn TTFT with 4 interleaved multi-turn conversations (~1,000-token histories);
  3. aggregate tokens/s at 1/2/4/8 concurrent streams;
  4. the appliance's RSS (API process + workers) before and after 2,000 requests.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from appliance.catalog import embedded_smollm2


def prompt(k: int) -> str:
    """The k-th cold prompt: a different first line each time (no cache reuse), and a continuation that
    runs to max_tokens under greedy decoding for every k, so N concurrent streams really are N until the end.
    (A leading "{k} " made the model stop after ~20 tokens for some k, leaving gaps in the batch.)"""
    return f"List {k + 1}: the numbers from 1 to 500, one per line:\n1\n2\n3\n"


DOC_WORDS = (
    "The river valley was settled by farmers who grew barley and kept sheep; over centuries they built "
    "terraces, mills and a stone bridge, traded wool with coastal towns, and recorded floods in a chapel ledger. "
)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


# -- direct llama-cpp-python ----------------------------------------------------------------------


def bench_direct(threads: int, ctx: int, n_tokens: int, reps: int, convos: list[list[dict]]) -> dict[str, Any]:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(embedded_smollm2()[0]), n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    ttfts, rates = [], []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        first = last = None
        n = 0
        # vary the prompt's first word so each rep is a cold prompt, as for the appliance
        for _ in llm.create_completion(prompt(i), max_tokens=n_tokens, temperature=0, stream=True):
            now = time.perf_counter()
            first = first or now
            last, n = now, n + 1
        if i == 0:
            continue  # warm-up
        ttfts.append(first - t0)
        rates.append((n - 1) / (last - first))
    # interleaved conversations: Llama keeps only the last prompt's cache
    first_turn, later_turn = [], []
    histories = [list(c) for c in convos]
    for turn in range(3):
        for h in histories:
            t0 = time.perf_counter()
            text = ""
            for chunk in llm.create_chat_completion(h, max_tokens=24, temperature=0, stream=True):
                delta = chunk["choices"][0]["delta"].get("content")
                if delta:
                    if not text:
                        (first_turn if turn == 0 else later_turn).append(time.perf_counter() - t0)
                    text += delta
            h += [{"role": "assistant", "content": text}, {"role": "user", "content": "Tell me more, briefly."}]
    return {
        "decode_tps": statistics.median(rates),
        "ttft_p50": pct(ttfts, 0.5),
        "ttft_p95": pct(ttfts, 0.95),
        "first_turn_ttft": statistics.mean(first_turn),
        "later_turn_ttft": statistics.mean(later_turn),
    }


# -- the appliance over HTTP ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Appliance:
    def __init__(self, threads: int, ctx: int, parallel: int):
        self.port = _free_port()
        self.tmp = tempfile.TemporaryDirectory()
        env = {
            **os.environ,
            "APPLIANCE_DATA_DIR": self.tmp.name,
            "HF_HUB_OFFLINE": "1",
            "APPLIANCE_AGENT_ENABLED": "false",
            # The embedding model would load in the background (torch, ~30 s of both cores) while the first
            # measurements run; the benchmark measures chat inference in steady state.
            "APPLIANCE_EMBEDDINGS_PRELOAD": "false",
            "APPLIANCE_LOG_LEVEL": "warning",
        }
        args = [
            "--port",
            str(self.port),
            "--threads",
            str(threads),
            "--context-size",
            str(ctx),
            "--parallel",
            str(parallel),
        ]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "serve", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the appliance did not become ready")

    def rss(self) -> int:
        p = psutil.Process(self.proc.pid)
        return sum(x.memory_info().rss for x in [p, *p.children(recursive=True)])

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.tmp.cleanup()


async def _stream(client: httpx.AsyncClient, path: str, body: dict) -> tuple[float, float, float, int]:
    """(start, first text, last text, completion tokens) of one SSE request.

    Tokens are counted from the usage chunk, not from text chunks: the appliance may send the text of
    several tokens in one chunk (APPLIANCE_STREAM_INTERVAL).
    """
    t0 = time.perf_counter()
    first = last = 0.0
    n = 0
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", path, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                n = obj["usage"]["completion_tokens"]
            ch = obj.get("choices") or [{}]
            piece = ch[0].get("text") or (ch[0].get("delta") or {}).get("content")
            if piece:
                now = time.perf_counter()
                first = first or now
                last = now
    return t0, first, last, n


async def bench_http(app: Appliance, n_tokens: int, reps: int, convos: list[list[dict]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=app.url, timeout=600) as c:
        ttfts, rates = [], []
        for i in range(reps + 1):
            body = {"model": "default", "prompt": prompt(i), "max_tokens": n_tokens, "temperature": 0}
            t0, first, last, n = await _stream(c, "/v1/completions", body)
            if i:
                ttfts.append(first - t0)
                rates.append((n - 1) / (last - first))
        out.update(decode_tps=statistics.median(rates), ttft_p50=pct(ttfts, 0.5), ttft_p95=pct(ttfts, 0.95))

        first_turn, later_turn = [], []
        histories = [list(h) for h in convos]
        for turn in range(3):
            for h in histories:
                body = {"model": "default", "messages": h, "max_tokens": 24, "temperature": 0, "stream": True}
                t0 = time.perf_counter()
                text, t_first = "", 0.0
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            d = json.loads(line[6:])["choices"]
                            piece = d[0]["delta"].get("content") if d else None
                            if piece:
                                t_first = t_first or time.perf_counter()
                                text += piece
                (first_turn if turn == 0 else later_turn).append(t_first - t0)
                h += [{"role": "assistant", "content": text}, {"role": "user", "content": "Tell me more, briefly."}]
        out.update(first_turn_ttft=statistics.mean(first_turn), later_turn_ttft=statistics.mean(later_turn))

        # Each level: one warm-up round, then the median of three. The rounds send the same prompts, so every
        # timed round finds them in the slots' caches alike; what is measured is decoding N streams at once.
        agg = {}
        for n_streams in (1, 2, 4, 8):
            bodies = [
                {"model": "default", "prompt": prompt(k), "max_tokens": n_tokens, "temperature": 0}
                for k in range(n_streams)
            ]
            rounds = []
            for _ in range(4):
                t0 = time.perf_counter()
                res = await asyncio.gather(*(_stream(c, "/v1/completions", b) for b in bodies))
                rounds.append(sum(r[3] for r in res) / (max(r[2] for r in res) - t0))
            agg[n_streams] = statistics.median(rounds[1:])
        out["aggregate_tps"] = agg
    return out


async def bench_rss(app: Appliance, n_requests: int, concurrency: int = 8) -> dict[str, Any]:
    before = app.rss()
    sem = asyncio.Semaphore(concurrency)
    ok = 0

    async with httpx.AsyncClient(base_url=app.url, timeout=120) as c:

        async def one(i: int) -> None:
            nonlocal ok
            async with sem:
                body = {
                    "model": "default",
                    "messages": [{"role": "user", "content": f"Say a word about {i}."}],
                    "max_tokens": 4,
                }
                if i % 2:
                    await _stream(c, "/v1/chat/completions", body)
                    ok += 1
                else:
                    r = await c.post("/v1/chat/completions", json=body)
                    ok += r.status_code == 200

        await asyncio.gather(*(one(i) for i in range(n_requests)))
    after = app.rss()
    return {"rss_before": before, "rss_after": after, "rss_growth": after / before - 1, "requests_ok": ok}


# -- main ----------------------------------------------------------------------------------------


def conversations() -> list[list[dict]]:
    topics = ["the valley", "the bridge", "the mills", "the floods"]
    doc = DOC_WORDS * 22  # ~1,000 tokens of history
    return [
        [{"role": "user", "content": f"Read this chronicle, then answer about {t}.\n\n{doc}\n\nWhat about {t}?"}]
        for t in topics
    ]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {psutil.cpu_count(logical=True)} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB"


def run(args: argparse.Namespace) -> dict[str, Any]:
    convos = conversations()
    print(f"bench on {machine()}, {args.threads} threads", file=sys.stderr)
    print("direct llama-cpp-python ...", file=sys.stderr)
    direct = bench_direct(args.threads, args.ctx, args.tokens, args.reps, convos)
    print("appliance over HTTP ...", file=sys.stderr)
    app = Appliance(args.threads, args.ctx, 8)
    try:
        http = asyncio.run(bench_http(app, args.tokens, args.reps, convos))
        print(f"{args.requests} requests for RSS ...", file=sys.stderr)
        rss = asyncio.run(bench_rss(app, args.requests))
    finally:
        app.close()
    agg = http["aggregate_tps"]
    result = {
        "machine": machine(),
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
        "direct": direct,
        "appliance": http,
        "rss": rss,
        "ratios": {
            "decode_http_vs_direct": http["decode_tps"] / direct["decode_tps"],
            "ttft_overhead_p50_ms": (http["ttft_p50"] - direct["ttft_p50"]) * 1000,
            "later_vs_first_turn_ttft": http["later_turn_ttft"] / http["first_turn_ttft"],
            "later_vs_first_turn_ttft_direct": direct["later_turn_ttft"] / direct["first_turn_ttft"],
            "aggregate_4_vs_1": agg[4] / agg[1],
            "aggregate_8_vs_1": agg[8] / agg[1],
            "rss_growth": rss["rss_growth"],
        },
    }
    return result


def table(r: dict[str, Any]) -> str:
    d, a, x = r["direct"], r["appliance"], r["ratios"]
    rows = [
        (
            "single-stream decode (tokens/s)",
            f"{d['decode_tps']:.1f}",
            f"{a['decode_tps']:.1f}",
            f"{x['decode_http_vs_direct']:.2f}x",
            ">= 0.95x",
        ),
        (
            "TTFT p50 / p95 (ms)",
            f"{d['ttft_p50'] * 1e3:.0f} / {d['ttft_p95'] * 1e3:.0f}",
            f"{a['ttft_p50'] * 1e3:.0f} / {a['ttft_p95'] * 1e3:.0f}",
            f"{x['ttft_overhead_p50_ms']:+.1f} ms p50",
            "<= 15 ms",
        ),
        (
            "first-turn TTFT, 4 convos (ms)",
            f"{d['first_turn_ttft'] * 1e3:.0f}",
            f"{a['first_turn_ttft'] * 1e3:.0f}",
            "",
            "",
        ),
        (
            "later-turn TTFT, 4 convos (ms)",
            f"{d['later_turn_ttft'] * 1e3:.0f}",
            f"{a['later_turn_ttft'] * 1e3:.0f}",
            f"{x['later_vs_first_turn_ttft']:.3f} (direct {x['later_vs_first_turn_ttft_direct']:.2f})",
            "<= 0.1",
        ),
    ]
    agg = {int(n): tps for n, tps in a["aggregate_tps"].items()}  # JSON turns the keys into strings
    for n, tps in agg.items():
        target = {4: ">= 1.4x", 8: ">= 1.6x"}.get(n, "")
        rows.append(
            (f"aggregate, {n} streams (tokens/s)", "", f"{tps:.1f}", f"{tps / agg[1]:.2f}x" if n > 1 else "", target)
        )
    rss = r["rss"]
    rows.append(
        (
            "RSS before / after 2,000 requests (MiB)",
            "",
            f"{rss['rss_before'] / 2**20:.0f} / {rss['rss_after'] / 2**20:.0f}",
            f"{rss['rss_growth'] * 100:+.1f} %",
            "<= 5 %",
        )
    )
    head = ("measure", "llama-cpp-python", "appliance", "ratio", "target")
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(5)]
    lines = [
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in [head, *rows]
    ]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 2)
    p.add_argument("--ctx", type=int, default=2048, help="context per slot / for the direct run")
    p.add_argument("--tokens", type=int, default=128, help="tokens per generation")
    p.add_argument("--reps", type=int, default=10, help="single-stream repetitions")
    p.add_argument("--requests", type=int, default=2000, help="requests for the RSS check")
    p.add_argument("--json", type=Path, default=Path("bench-results/bench.json"))


def main(args: argparse.Namespace) -> int:
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\n{result['machine']}, {result['threads']} threads, {result['date']}\n")
    print(table(result))
    print(f"\nJSON: {args.json}")
    return 0
