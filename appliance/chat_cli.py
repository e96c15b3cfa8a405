"""`appliance run [MODEL]`: a terminal chat, like `ollama run`.

Talks to a running appliance over its OpenAI API: `--url`, else APPLIANCE_URL, else the configured port on
this host. When none answers there, it starts one (`appliance serve` on that port, with the same settings
flags) for the length of the chat. Replies stream token by token; the conversation is kept (sent whole each
turn); `/bye` (or end of input) leaves, `/clear` forgets the conversation, Ctrl-C stops a reply.
Sends APPLIANCE_API_KEY (or --api-key) as the bearer key when given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import TextIO

import httpx

from appliance.config import Settings

HELP = "/bye: leave · /clear: forget the conversation · Ctrl-C: stop a reply · Ctrl-D: leave"


def _local_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{'[' + host + ']' if ':' in host else host}:{settings.port}"


def _answers(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(f"{url}/health", timeout=2.0).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def _start_server(argv: list[str], url: str, client: httpx.Client, err: TextIO) -> subprocess.Popen:
    print(f"no appliance answers at {url}: starting one…", file=err, flush=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "serve", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`appliance serve` exited with status {proc.returncode} (try `appliance doctor`)")
        with contextlib.suppress(httpx.HTTPError):
            if client.get(f"{url}/health", timeout=2.0).status_code == 200:
                return proc
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the appliance did not become ready in 180 s")


def _deltas(client: httpx.Client, url: str, model: str, messages: list[dict], extra: dict) -> Iterator[str]:
    body = {"model": model, "messages": messages, "stream": True, **extra}
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=300)) as r:
        if r.status_code != 200:
            r.read()
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:200]
            raise RuntimeError(f"HTTP {r.status_code}: {message}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            if "error" in doc:
                raise RuntimeError(doc["error"].get("message", "the reply failed"))
            for choice in doc.get("choices", []):
                if text := choice.get("delta", {}).get("content"):
                    yield text


def chat(client: httpx.Client, url: str, model: str, stdin: TextIO, out: TextIO, extra: dict | None = None) -> int:
    """The loop: read a line, stream the reply, keep both; until /bye or end of input."""
    interactive = stdin.isatty()
    messages: list[dict] = []
    if interactive:
        print(HELP, file=out, flush=True)
    while True:
        if interactive:
            print(">>> ", end="", file=out, flush=True)
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            print(file=out)
            continue
        if not line:
            return 0
        text = line.strip()
        if text in ("/bye", "/exit", "/quit"):
            return 0
        if text == "/clear":
            messages.clear()
            print("(conversation cleared)", file=out, flush=True)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        reply: list[str] = []
        try:
            for piece in _deltas(client, url, model, messages, extra or {}):
                reply.append(piece)
                print(piece, end="", file=out, flush=True)
        except KeyboardInterrupt:
            print(" (stopped)", end="", file=out)
        except (RuntimeError, httpx.HTTPError) as e:
            print(f"error: {e}", file=out, flush=True)
            messages.pop()
            continue
        print("\n", file=out, flush=True)
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_run(settings: Settings, args: argparse.Namespace, serve_argv: list[str]) -> int:
    url = (args.url or os.environ.get("APPLIANCE_URL") or _local_url(settings)).rstrip("/")
    key = args.api_key or os.environ.get("APPLIANCE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    proc = None
    with httpx.Client(headers=headers) as client:
        try:
            if not _answers(client, url):
                if args.url or os.environ.get("APPLIANCE_URL"):
                    print(f"appliance: nothing answers at {url}", file=sys.stderr)
                    return 1
                proc = _start_server(serve_argv, url, client, sys.stderr)
            extra = {"max_tokens": args.max_tokens} if args.max_tokens else {}
            return chat(client, url, args.model, sys.stdin, sys.stdout, extra)
        except RuntimeError as e:
            print(f"appliance: {e}", file=sys.stderr)
            return 1
        finally:
            if proc is not None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
