#!/usr/bin/env python3
"""Offline evaluation of the agent's tool use, through the HTTP API (the `openai` SDK, model "agent").

uv run python scripts/eval_agent.py --start                      # start an appliance on a temporary data dir
uv run python scripts/eval_agent.py --base-url http://127.0.0.1:8000 --api-key sk-...

34 questions: arithmetic (the calculator), dates and times (current_datetime), and remember-then-recall
(save_memory in one thread, a new thread asks: search_memory or the recalled memories). An answer scores
when it contains the tool's result: the number, the date/day/time (on this machine's clock, which is the
server's with --start), or the remembered word. Each question's thread (GET /v1/threads/{id}) shows which
tools the model called; the share of questions whose expected tool was called is reported too.

Prints the shares and writes the details as JSON (--out, default eval-results/eval_agent.json). Every
question runs as its own user, so runs do not see each other's memories. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import openai

Expect = Callable[[], list[str]]  # the strings (any one) a right answer contains, computed when asked


def fixed(*values: str) -> Expect:
    return lambda: list(values)


def _today() -> list[str]:
    now = dt.datetime.now()
    month, day = now.strftime("%B"), now.day
    return [now.strftime("%Y-%m-%d"), f"{month} {day}", f"{day} {month}", f"{month[:3]} {day}", f"{day}th of {month}"]


def _weekday() -> list[str]:
    return [dt.datetime.now().strftime("%A")]


def _time() -> list[str]:
    now = dt.datetime.now()
    times = [now - dt.timedelta(minutes=1), now, now + dt.timedelta(minutes=1)]
    return [f"{t:%H:%M}" for t in times] + [f"{t.hour % 12 or 12}:{t.minute:02d}" for t in times]


def _year() -> list[str]:
    return [str(dt.datetime.now().year)]


def _month() -> list[str]:
    return [dt.datetime.now().strftime("%B")]


@dataclass
class Question:
    kind: str  # arithmetic | date | remember | recall
    text: str
    expect: Expect = field(repr=False)
    tool: str  # the tool a good run calls
    pair: int | None = None  # remember/recall: the user they share


ARITHMETIC = [
    ("What is 12 * 7?", "84"),
    ("What is 345 + 678?", "1023"),
    ("Calculate 1024 / 16.", "64"),
    ("What is 2 ** 10?", "1024"),
    ("What is 999 - 123?", "876"),
    ("Compute (3 + 4) * 12.", "84"),
    ("What is 17 * 23?", "391"),
    ("What is 250 / 4?", "62.5"),
    ("What is 7 * 8 + 5?", "61"),
    ("What is 100 - 37?", "63"),
    ("What is 45 * 11?", "495"),
    ("What is 1234 + 4321?", "5555"),
    ("What is 6 * 7 * 8?", "336"),
    ("What is 3.5 * 4?", "14"),
]
DATES = [
    ("What is today's date?", _today),
    ("What's the date today?", _today),
    ("What day of the week is it today?", _weekday),
    ("What time is it now?", _time),
    ("What year is it?", _year),
    ("Which month is it?", _month),
]
MEMORY = [  # (remember, recall, the word the recall answer must contain)
    ("Please remember that my favourite colour is teal.", "What is my favourite colour?", "teal"),
    ("Remember this: my name is Marguerite.", "What is my name?", "Marguerite"),
    ("Please remember that my dog is called Biscuit.", "What is my dog called?", "Biscuit"),
    ("Remember that I live in Lisbon.", "Where do I live?", "Lisbon"),
    ("Please remember that I work as a carpenter.", "What is my job?", "carpenter"),
    ("Remember that my favourite food is lasagna.", "What is my favourite food?", "lasagna"),
    ("Please remember that my sister is called Ingrid.", "What is my sister's name?", "Ingrid"),
]


def questions() -> list[Question]:
    qs = [Question("arithmetic", q, fixed(v), "calculator") for q, v in ARITHMETIC]
    qs += [Question("date", q, f, "current_datetime") for q, f in DATES]
    for i, (remember, recall, word) in enumerate(MEMORY):
        qs.append(Question("remember", remember, fixed(word), "save_memory", pair=i))
        qs.append(Question("recall", recall, fixed(word), "search_memory", pair=i))
    return qs


@dataclass
class Result:
    kind: str
    question: str
    expected: list[str]
    answer: str
    tools_called: list[str]
    tool_results: list[str]
    correct: bool
    tool_used: bool
    thread_id: str
    seconds: float
    error: str | None = None


def contains(text: str, expected: list[str]) -> bool:
    t = text.casefold()
    return any(e.casefold() in t for e in expected)


class Runner:
    def __init__(self, base_url: str, api_key: str | None, model: str, max_tokens: int, timeout: float = 900):
        self.base_url, self.model, self.max_tokens = base_url.rstrip("/"), model, max_tokens
        key = api_key or "unused"
        self.client = openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=timeout)
        self.http = httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        self.run_id = uuid.uuid4().hex[:8]

    def ask(self, q: Question) -> Result:
        user = f"eval-{self.run_id}-{q.pair if q.pair is not None else uuid.uuid4().hex[:8]}"
        t0 = time.monotonic()
        try:
            raw = self.client.chat.completions.with_raw_response.create(
                model=self.model,
                messages=[{"role": "user", "content": q.text}],
                temperature=0,
                max_tokens=self.max_tokens,
                user=user,
            )
        except openai.APIError as e:
            return Result(q.kind, q.text, q.expect(), "", [], [], False, False, "", time.monotonic() - t0, str(e))
        answer = raw.parse().choices[0].message.content or ""
        tid = raw.headers.get("x-thread-id", "")
        msgs = self.http.get(f"/v1/threads/{tid}", params={"user": user}).json().get("messages", [])
        called = [c["function"]["name"] for m in msgs for c in (m.get("tool_calls") or [])]
        results = [m["content"] for m in msgs if m["role"] == "tool"]
        expected = q.expect()
        if q.kind == "remember":  # the fact must be in the user's memory, and the answer must not deny it
            mems = self.http.get("/v1/memories", params={"user": user}).json().get("data", [])
            correct = any(m["kind"] == "fact" and contains(m["text"], expected) for m in mems)
        else:
            correct = contains(answer, expected)
        return Result(
            q.kind, q.text, expected, answer, called, results, correct, q.tool in called, tid, time.monotonic() - t0
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_embeddings(base: str, proc: subprocess.Popen | None = None, timeout: float = 600) -> None:
    """Until the memory's embedding model answers (its first load takes 30-80 s, more on a busy machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit("the server exited")
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.post(f"{base}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "x"}, timeout=120)
            if r.status_code == 200:
                return
        time.sleep(1)
    raise SystemExit(f"the embedding model did not get ready in {timeout:g} s")


@contextlib.contextmanager
def started_server(args: list[str]) -> Iterator[str]:
    """`appliance serve` on a free loopback port and a temporary data dir, until the embedding model is ready."""
    tmp = Path(tempfile.mkdtemp(prefix="eval-agent-"))
    port = free_port()
    env = {
        "APPLIANCE_AGENT_TIMEOUT": "600",  # a busy machine is slow; the eval measures answers, not speed
        "APPLIANCE_FIRST_TOKEN_TIMEOUT": "300",
        "APPLIANCE_REQUEST_DEADLINE": "600",
        **os.environ,
        "APPLIANCE_DATA_DIR": str(tmp / "data"),
        "APPLIANCE_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "APPLIANCE_EMBEDDINGS_PRELOAD": "true",
    }
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", *args], env=env, stdout=log, stderr=log)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_embeddings(base, proc)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(runner: Runner, qs: list[Question], verbose: bool, concurrency: int = 1) -> list[Result]:
    """Ask every question; with `concurrency` > 1 several at once (a remember/recall pair stays in order)."""
    groups: dict[object, list[int]] = {}
    for i, q in enumerate(qs):
        groups.setdefault(("pair", q.pair) if q.pair is not None else i, []).append(i)
    results: list[Result | None] = [None] * len(qs)

    def ask_group(indices: list[int]) -> None:
        for i in indices:
            r = results[i] = runner.ask(qs[i])
            if verbose:
                mark = "ok " if r.correct else "-- "
                print(f"{mark}[{r.kind}] {r.question!r} -> {r.answer[:100]!r} tools={r.tools_called}", flush=True)

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        list(pool.map(ask_group, groups.values()))
    return [r for r in results if r is not None]


def summary(results: list[Result]) -> dict:
    def share(rs: list[Result], attr: str) -> float:
        return round(sum(getattr(r, attr) for r in rs) / len(rs), 3) if rs else 0.0

    kinds = sorted({r.kind for r in results})
    return {
        "questions": len(results),
        "correct": share(results, "correct"),
        "tool_used": share(results, "tool_used"),
        "by_kind": {
            k: {"n": len(rs), "correct": share(rs, "correct"), "tool_used": share(rs, "tool_used")}
            for k in kinds
            for rs in [[r for r in results if r.kind == k]]
        },
        "seconds": round(sum(r.seconds for r in results), 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="a running appliance")
    p.add_argument("--api-key", default=os.environ.get("APPLIANCE_API_KEY"), help="when the appliance has keys")
    p.add_argument("--start", action="store_true", help="start an appliance (temporary data dir) for the run")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `appliance serve` argument (repeatable)")
    p.add_argument("--model", default="agent", help="the agent model (agent or agent:<model id>)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=1, help="questions asked at once")
    p.add_argument("--timeout", type=float, default=900, help="seconds one question may take")
    p.add_argument("--kind", action="append", help="only these kinds (arithmetic, date, remember, recall)")
    p.add_argument("--first", type=int, default=0, help="only the first N questions (after --kind)")
    p.add_argument("--out", type=Path, default=Path("eval-results/eval_agent.json"))
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args()

    qs = [q for q in questions() if not a.kind or q.kind in a.kind or (q.kind == "remember" and "recall" in a.kind)]
    if a.first:
        qs = qs[: a.first]
    with contextlib.ExitStack() as stack:
        if a.start:
            base = stack.enter_context(started_server(a.serve_arg))
        else:
            base = a.base_url
            wait_for_embeddings(base)
        runner = Runner(base, a.api_key, a.model, a.max_tokens, a.timeout)
        results = run(runner, qs, not a.quiet, a.concurrency)
    doc = {"model": a.model, "summary": summary(results), "results": [asdict(r) for r in results]}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2, ensure_ascii=False))
    s = doc["summary"]
    print(
        f"answers containing the tool's result: {s['correct']:.0%} of {s['questions']}; "
        f"expected tool called: {s['tool_used']:.0%}"
    )
    for k, v in s["by_kind"].items():
        print(f"  {k:10} {v['correct']:.0%} correct, {v['tool_used']:.0%} tool used (n={v['n']})")
    print(f"details: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
