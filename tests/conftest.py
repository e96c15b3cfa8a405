"""Shared fixtures: real appliance servers on loopback, started as subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
OPENAPI = REPO.parent / "shared" / "openai-openapi.yaml"


def sse(text: str) -> list[Any]:
    """The JSON payloads of an OpenAI SSE body, which must end with `data: [DONE]`."""
    lines = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


@contextlib.contextmanager
def busy_port() -> Iterator[int]:
    """A loopback port held by something that is not an appliance: it accepts and hangs up at once (a socket
    that only listens would make a client wait out its whole timeout)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        s.settimeout(0.05)
        done = threading.Event()

        def hang_up() -> None:
            while not done.is_set():
                with contextlib.suppress(TimeoutError, OSError):
                    s.accept()[0].close()

        t = threading.Thread(target=hang_up, daemon=True)
        t.start()
        try:
            yield s.getsockname()[1]
        finally:
            done.set()
            t.join()


def streamed_logprobs(chunks: list[Any]) -> list[Any]:
    """The `logprobs.content` entries of streamed chat chunks (from `sse()`), in order."""
    return [
        e
        for ch in chunks
        if ch["choices"] and ch["choices"][0]["logprobs"]
        for e in ch["choices"][0]["logprobs"]["content"]
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running `appliance serve` subprocess."""

    proc: subprocess.Popen
    port: int
    data_dir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self, verbose: bool = False) -> dict:
        r = httpx.get(f"{self.base_url}/health", params={"verbose": 1} if verbose else None, timeout=5)
        return r.json()

    def backend(self, model: str | None = None) -> dict:
        doc = self.health(verbose=True)
        m = next(m for m in doc["models"] if model is None or m["id"] == model or model in m["aliases"])
        return m["backends"][0]

    def worker_pid(self, model: str | None = None) -> int:
        return self.backend(model)["pid"]

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(tmp: Path, *args: str, env: dict[str, str] | None = None, wait: bool = True) -> Server:
    """Start `appliance serve` on a free loopback port with its data dir under `tmp`."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    data_dir = tmp / "data"
    full_env = {
        **os.environ,
        "APPLIANCE_DATA_DIR": str(data_dir),
        "APPLIANCE_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        # The embedding model (torch) loads on first use in tests that do not need it; saves CPU.
        "APPLIANCE_EMBEDDINGS_PRELOAD": "false",
        **(env or {}),
    }
    log_path = tmp / f"server-{port}.log"
    log_file = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", *args],
        cwd=tmp,
        env=full_env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    server = Server(proc, port, data_dir, log_path, full_env)
    if wait:
        try:
            server.wait_ready()
        except Exception:
            server.stop(signal.SIGKILL)
            raise
    return server


@pytest.fixture(scope="session")
def appliance_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server on the embedded default model, shared by the read-mostly tests."""
    # Batch-invariant: tests compare outputs alone and batched, cold and from a cache, token for token.
    server = start_server(tmp_path_factory.mktemp("appliance"), "--context-size", "4096", "--batch-invariant")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def openapi_doc() -> dict:
    if not OPENAPI.is_file():
        pytest.skip(f"{OPENAPI} not present (OpenAI's spec is only in the development workspace)")
    import yaml

    with OPENAPI.open() as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@pytest.fixture(scope="session")
def openai_schema(openapi_doc: dict):
    """validate(name, instance): check an object against a component schema of OpenAI's spec."""
    import jsonschema

    def nullable(node):
        if isinstance(node, dict):
            node = {k: nullable(v) for k, v in node.items()}
            if node.pop("nullable", False) and "type" in node:
                node["type"] = [node["type"], "null"] if isinstance(node["type"], str) else [*node["type"], "null"]
                if "enum" in node:
                    node["enum"] = [*node["enum"], None]
            return node
        if isinstance(node, list):
            return [nullable(v) for v in node]
        return node

    components = nullable(openapi_doc["components"])

    def validate(name: str, instance: dict) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": components}
        jsonschema.Draft202012Validator(schema).validate(instance)

    return validate
