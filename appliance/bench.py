"""`appliance bench` / `scripts/bench.py`: the appliance side by side with other OpenAI-compatible servers.

One run starts the appliance on the embedded model (or uses a running one, --appliance-url), starts or
attaches to the other servers, and runs every scenario (bench_scenarios.py) against each of them in turn,
scenario by scenario, so that a drift in the machine's load touches all of them alike. It prints a table
with one column per server and the ratio appliance / other per measure, and writes JSON.

  --against NAME=URL      a server already running (RSS too with --pid NAME=PID)
  --start NAME=CMD        a server this run starts: CMD may use {port} {model} {threads} {parallel} {ctx}
                          {ctx_total}; its start to /health 200 and its RSS are measured
  --llama-server PATH     shorthand: llama.cpp's server on the same GGUF, threads and slots
                          (scripts/build-llama-server.sh builds it from the llama.cpp in llama-cpp-python)
  --direct                also llama-cpp-python's `Llama` in process on the same GGUF (bench_direct.py)
  --quick                 a functional check in about a minute, not a measurement

Run it on an otherwise idle machine: the servers share the CPU with everything else on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LLAMA_SERVER = "{binary} -m {model} -t {threads} -np {parallel} -c {ctx_total} --host 127.0.0.1 --port {port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Target:
    name: str
    url: str
    pid: int | None = None
    proc: subprocess.Popen | None = None
    model: str = "default"
    metrics: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    cleanup: list[Any] = field(default_factory=list)

    def rss(self) -> int | None:
        if self.pid is None:
            return None
        import psutil

        try:
            p = psutil.Process(self.pid)
            procs = [p, *p.children(recursive=True)]
        except psutil.Error:
            return None
        total = 0
        for x in procs:
            with contextlib.suppress(psutil.Error):
                total += x.memory_info().rss
        return total

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for c in self.cleanup:
            c()


def wait_ready(target: Target, timeout: float = 300) -> float:
    """Seconds from now until GET /health answers 200 (GET /v1/models for servers without /health)."""
    import httpx

    t0 = time.monotonic()
    path = "/health"
    while time.monotonic() - t0 < timeout:
        if target.proc is not None and target.proc.poll() is not None:
            raise RuntimeError(f"{target.name} exited with code {target.proc.returncode} before it was ready")
        try:
            r = httpx.get(target.url + path, timeout=2)
            if r.status_code == 200:
                return time.monotonic() - t0
            if r.status_code == 404:
                path = "/v1/models"
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{target.name} was not ready in {timeout:.0f}s")


def start_process(name: str, argv: list[str], env: dict[str, str] | None, port: int, log: Path) -> Target:
    out = log.open("wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    t = Target(name, f"http://127.0.0.1:{port}", pid=proc.pid, proc=proc)
    t.cleanup.append(out.close)
    try:
        wait_ready(t)
    except Exception:
        t.close()
        raise RuntimeError(f"{name} did not start; its output is in {log}") from None
    t.metrics["start_to_ready_s"] = time.monotonic() - t0
    return t


def start_appliance(args: argparse.Namespace, logs: Path) -> Target:
    port = _free_port()
    tmp = tempfile.TemporaryDirectory(prefix="appliance-bench-")
    env = {
        **os.environ,
        "APPLIANCE_DATA_DIR": tmp.name,
        "HF_HUB_OFFLINE": "1",
        "APPLIANCE_LOG_LEVEL": "warning",
    }
    argv = [sys.executable, "-m", "appliance", "serve", "--port", str(port), "--threads", str(args.threads)]
    argv += ["--context-size", str(args.ctx), "--parallel", str(args.parallel)]
    t = start_process("appliance", argv, env, port, logs / "appliance.log")
    t.cleanup.append(tmp.cleanup)
    return t


def start_command(name: str, template: str, args: argparse.Namespace, logs: Path) -> Target:
    from appliance.catalog import embedded_smollm2

    port = _free_port()
    values = {
        "port": port,
        "model": str(embedded_smollm2()[0]),
        "threads": args.threads,
        "parallel": args.parallel,
        "ctx": args.ctx,
        "ctx_total": args.ctx * args.parallel,
    }
    argv = [a.format(**values) for a in shlex.split(template)]
    print(f"starting {name}: {shlex.join(argv)}", file=sys.stderr)
    return start_process(name, argv, None, port, logs / f"{name}.log")


def _pairs(items: list[str], what: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{what} expects NAME=VALUE, got {item!r}")
        out.append((name, value))
    return out


def targets(args: argparse.Namespace, logs: Path) -> list[Target]:
    pids = {n: int(p) for n, p in _pairs(args.pid, "--pid")}
    started: list[Target] = []
    try:
        if args.appliance_url:
            started.append(Target("appliance", args.appliance_url.rstrip("/"), pid=pids.get("appliance")))
        else:
            started.append(start_appliance(args, logs))
        starts = _pairs(args.start, "--start")
        if args.llama_server:
            starts.append(("llama-server", LLAMA_SERVER.replace("{binary}", shlex.quote(str(args.llama_server)))))
        for name, cmd in starts:
            started.append(start_command(name, cmd, args, logs))
        for name, url in _pairs(args.against, "--against"):
            started.append(Target(name, url.rstrip("/"), pid=pids.get(name)))
    except BaseException:
        for t in started:
            t.close()
        raise
    names = [t.name for t in started]
    if len(set(names)) != len(names):
        raise SystemExit(f"server names must differ: {names}")
    return started


def _model_of(t: Target) -> str:
    """The model to ask for: `default` on the appliance, else the first one the server lists."""
    import httpx

    if t.name == "appliance":
        return "default"
    try:
        data = httpx.get(f"{t.url}/v1/models", timeout=10).json().get("data") or []
        return data[0]["id"] if data else "default"
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return "default"


async def rss_growth(t: Target, model: str, n_requests: int, concurrency: int = 8) -> dict[str, float]:
    """RSS before and after `n_requests` short chats, streamed and not (a leak shows as growth)."""
    import httpx

    from appliance.bench_scenarios import stream

    before = t.rss() or 0
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=t.url, timeout=120) as c:

        async def one(i: int) -> None:
            async with sem:
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": f"A word about {i}."}],
                    "max_tokens": 4,
                }
                if i % 2:
                    await stream(c, "/v1/chat/completions", body)
                else:
                    await c.post("/v1/chat/completions", json=body)

        await asyncio.gather(*(one(i) for i in range(n_requests)))
    after = t.rss() or 0
    return {"rss_growth_pct": (after / before - 1) * 100} if before else {}


async def run_all(ts: list[Target], args: argparse.Namespace) -> None:
    import httpx

    from appliance.bench_scenarios import LAST, ROUNDS, SCENARIOS, Config

    nonce = secrets.token_hex(4)
    quick = dict(tokens=16, reps=1, turns=2, rounds=2, health_chats=20, health_tokens=4, doc_words=2, answer_tokens=16)
    quick = quick if args.quick else {}
    base = dict(tokens=args.tokens, reps=args.reps, health_chats=args.health_chats)
    names = list(SCENARIOS) if args.scenarios == "all" else args.scenarios.split(",")
    for name in names:
        if name not in SCENARIOS:
            raise SystemExit(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    for t in ts:
        t.model = _model_of(t)

    async def scenario(name: str) -> None:
        rounds = 1 if args.quick else ROUNDS.get(name, 1)
        results: dict[str, list[dict[str, float]]] = {t.name: [] for t in ts}
        for r in range(rounds):
            for t in ts if r % 2 == 0 else ts[::-1]:
                sizes = {**base, **quick}
                if rounds > 1:  # the repetitions shared out between the rounds
                    sizes |= {"reps": max(1, -(-sizes["reps"] // rounds)), "rounds": 3}
                cfg = Config(model=t.model, nonce=f"{nonce}-{t.name}", **sizes)
                print(f"{name} on {t.name} ..." + (f" (round {r + 1}/{rounds})" if rounds > 1 else ""), file=sys.stderr)
                async with httpx.AsyncClient(base_url=t.url, timeout=900) as c:
                    try:
                        results[t.name].append(await SCENARIOS[name](c, cfg))
                    except Exception as e:  # one server's failure must not lose the others' figures
                        t.errors[name] = f"{type(e).__name__}: {e}"
                        print(f"  {name} failed on {t.name}: {t.errors[name]}", file=sys.stderr)
        for t in ts:
            if runs := results[t.name]:
                t.metrics.update({k: statistics.median(run[k] for run in runs) for k in runs[0]})

    for name in names:
        if name not in LAST:
            await scenario(name)
    requests = 20 if args.quick else args.requests
    for t in ts:
        if t.pid is not None and requests:
            print(f"{requests} requests for RSS growth on {t.name} ...", file=sys.stderr)
            try:
                t.metrics.update(await rss_growth(t, t.model, requests))
            except Exception as e:  # as above: keep the figures already measured
                t.errors["rss_growth"] = f"{type(e).__name__}: {e}"
                print(f"  rss growth failed on {t.name}: {t.errors['rss_growth']}", file=sys.stderr)
    await asyncio.sleep(2)  # idle: let in-flight work settle
    for t in ts:
        if (rss := t.rss()) is not None:
            t.metrics["rss_idle_mib"] = rss / 2**20
    for name in names:
        if name in LAST:
            await scenario(name)
    if args.direct:
        ts.append(direct(args, f"{nonce}-direct", quick))


def direct(args: argparse.Namespace, nonce: str, quick: dict[str, int]) -> Target:
    """llama-cpp-python in a process of its own, with the scenarios' prompts (bench_direct.py)."""
    from appliance.catalog import embedded_smollm2

    cfg = {"model": str(embedded_smollm2()[0]), "threads": args.threads, "ctx": args.ctx, "nonce": nonce}
    cfg |= {"tokens": quick.get("tokens", args.tokens), "reps": quick.get("reps", args.reps)}
    cfg |= {"doc_words": quick.get("doc_words", 22)}
    print("llama-cpp-python (in process) ...", file=sys.stderr)
    t = Target("llama-cpp-python", "(in process)")
    argv = [sys.executable, "-m", "appliance.bench_direct", json.dumps(cfg)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if out.returncode == 0:
        t.metrics = json.loads(out.stdout.strip().splitlines()[-1])
    else:
        t.errors["direct"] = out.stderr.strip()[-500:]
    return t


def machine() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {psutil.cpu_count(logical=True)} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB"


def ratios(ts: list[Target]) -> dict[str, dict[str, float]]:
    """appliance / other, for each measure both have."""
    app, others = ts[0], ts[1:]
    return {o.name: {k: v / o.metrics[k] for k, v in app.metrics.items() if o.metrics.get(k)} for o in others}


def table(result: dict[str, Any]) -> str:
    from appliance.bench_scenarios import METRICS

    servers = result["servers"]
    names = list(servers)
    head = ["measure", *names, *(f"appliance / {n}" for n in names[1:]), "better"]
    rows = []
    for key, m in METRICS.items():
        vals = [servers[n]["metrics"].get(key) for n in names]
        if all(v is None for v in vals):
            continue
        cells = [f"{v:.{m.digits}f}{(' ' + m.unit) if m.unit else ''}" if v is not None else "–" for v in vals]
        rat = [result["ratios"][n].get(key) for n in names[1:]]
        rows.append([m.label, *cells, *(f"{r:.2f}" if r is not None else "–" for r in rat), m.better])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in [head, *rows]]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    for n in names:
        for scen, err in servers[n]["errors"].items():
            lines.append(f"{n}: {scen} failed: {err}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--against", action="append", default=[], metavar="NAME=URL", help="a running server")
    p.add_argument("--pid", action="append", default=[], metavar="NAME=PID", help="its process, for RSS")
    p.add_argument("--start", action="append", default=[], metavar="NAME=CMD", help="a server to start")
    p.add_argument("--llama-server", type=Path, metavar="PATH", help="start llama-server on the same model")
    p.add_argument("--appliance-url", metavar="URL", help="use a running appliance instead of starting one")
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 2
    p.add_argument("--threads", type=int, default=cores, help="threads of each server (default: physical cores)")
    p.add_argument("--parallel", type=int, default=4, help="slots of each server")
    p.add_argument("--ctx", type=int, default=8192, help="context per slot")
    p.add_argument("--tokens", type=int, default=128, help="tokens per generation")
    p.add_argument("--reps", type=int, default=10, help="single-stream repetitions")
    p.add_argument("--health-chats", type=int, default=300, help="concurrent chats while /health is probed")
    p.add_argument("--requests", type=int, default=2000, help="requests for the RSS-growth check (0: skip)")
    p.add_argument("--scenarios", default="all", help="comma-separated subset of the scenarios")
    p.add_argument("--direct", action="store_true", help="also llama-cpp-python used in process")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    p.add_argument("--json", type=Path, default=Path("bench-results/bench.json"))


def main(args: argparse.Namespace) -> int:
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    print(f"bench on {machine()}; server logs in {logs}", file=sys.stderr)
    ts = targets(args, logs)
    try:
        asyncio.run(run_all(ts, args))
    finally:
        for t in ts:
            t.close()
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "settings": {k: getattr(args, k) for k in ("threads", "parallel", "ctx", "tokens", "reps", "quick")},
        "servers": {t.name: {"url": t.url, "model": t.model, "metrics": t.metrics, "errors": t.errors} for t in ts},
        "ratios": ratios(ts),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\n{result['machine']}, {args.threads} threads, {args.parallel} slots x {args.ctx}, {result['date']}\n")
    print(table(result))
    print(f"\nJSON: {args.json}")
    return 0
