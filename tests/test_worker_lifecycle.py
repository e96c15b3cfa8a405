"""The API outlives its model workers: crashes, client disconnects, start-up and graceful drain."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time

import httpx
import psutil
import pytest

from appliance.backends.llamacpp.process import WorkerProcess, worker_spec
from appliance.backends.llamacpp.supervisor import Supervisor
from appliance.catalog import embedded_smollm2
from appliance.config import LlamaCppBackendSpec, Settings
from tests.conftest import Server, start_server

pytestmark = pytest.mark.slow

# Greedy: this prompt runs to any max_tokens (sampling could stop early and finish inside a short timeout).
LONG = {
    "model": "default",
    "messages": [{"role": "user", "content": "Write a very long essay about the sea."}],
    "temperature": 0,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A server with one slot, so a still-running generation would block the next request.

    No retries: a crash before the first token would otherwise be retried (tested with the fallbacks).
    """
    s = start_server(
        tmp_path_factory.mktemp("lifecycle"),
        "--parallel",
        "1",
        "--context-size",
        "2048",
        env={"APPLIANCE_RETRIES": "0"},
    )
    yield s
    s.stop()


def wait_for_new_worker(server: Server, old_pid: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = server.backend()
        if b["state"] == "ready" and b["pid"] not in (None, old_pid):
            return b["pid"]
        time.sleep(0.1)
    raise TimeoutError(server.log())


def test_worker_killed_mid_stream_ends_stream_with_error_then_recovers(server: Server) -> None:
    pid = server.worker_pid()
    events: list[str] = []
    with httpx.stream(
        "POST", f"{server.base_url}/v1/chat/completions", json={**LONG, "max_tokens": 1500, "stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 5:
                os.kill(pid, signal.SIGKILL)
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "worker_crashed" and err["type"] == "server_error"
    assert all("choices" in json.loads(e) for e in events[:-2])
    assert httpx.get(f"{server.base_url}/health", timeout=2).status_code in (200, 503)  # the API is still up
    new_pid = wait_for_new_worker(server, pid)
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json={**LONG, "max_tokens": 5}, timeout=60)
    assert r.status_code == 200
    assert server.backend()["restarts"] >= 1 and new_pid != pid


def test_worker_killed_during_non_streaming_request_gives_503(server: Server) -> None:
    pid = server.worker_pid()

    def kill_once_generating() -> None:
        deadline = time.monotonic() + 30
        while server.backend()["in_flight"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill_once_generating, daemon=True).start()
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json={**LONG, "max_tokens": 1500}, timeout=60)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "worker_crashed"
    assert "retry-after" in r.headers
    wait_for_new_worker(server, pid)
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json={**LONG, "max_tokens": 5}, timeout=60)
    assert r.status_code == 200


def test_client_disconnect_frees_the_worker(server: Server) -> None:
    # One slot: if the abandoned 1500-token generation kept running (~20 s here), the next request would wait.
    with httpx.stream(
        "POST", f"{server.base_url}/v1/chat/completions", json={**LONG, "max_tokens": 1500, "stream": True}, timeout=60
    ) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n > 6:
                break
    t0 = time.monotonic()
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
        timeout=60,
    )
    assert r.status_code == 200
    assert time.monotonic() - t0 < 10.0  # vs ~20 s if the abandoned generation went on
    assert server.backend()["in_flight"] == 0


def test_non_streaming_disconnect_frees_the_worker(server: Server) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/chat/completions", json={**LONG, "max_tokens": 1500}, timeout=1.0)
    t0 = time.monotonic()
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
        timeout=60,
    )
    assert r.status_code == 200
    assert time.monotonic() - t0 < 10.0  # vs ~20 s if the abandoned generation went on


def test_health_says_loading_until_the_model_serves(tmp_path) -> None:
    s = start_server(tmp_path, wait=False)
    seen: list[tuple[int, dict]] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{s.base_url}/health", timeout=2)
            except httpx.TransportError:
                time.sleep(0.01)
                continue
            seen.append((r.status_code, r.json()))
            assert r.elapsed.total_seconds() < 0.5
            if r.status_code == 200:
                break
            time.sleep(0.01)
        # The worker spawns before the HTTP layer loads, so on a fast machine the model may be ready by the
        # first answer; until it is, every answer is 503 loading, and the 200 means the worker is ready.
        assert seen[-1] == (200, {"status": "ok"})
        assert all(answer == (503, {"status": "loading"}) for answer in seen[:-1]), seen
        assert s.backend()["state"] == "ready"
    finally:
        s.stop()


def test_sigterm_drains_in_flight_streams(tmp_path) -> None:
    s = start_server(tmp_path, "--drain-timeout", "60")
    lines: list[str] = []
    try:
        with httpx.stream(
            "POST", f"{s.base_url}/v1/chat/completions", json={**LONG, "max_tokens": 48, "stream": True}, timeout=60
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    if len(lines) == 3:
                        s.proc.send_signal(signal.SIGTERM)
        assert lines[-1] == "[DONE]"
        finish = json.loads(lines[-2])["choices"][0]["finish_reason"]
        assert finish == "length"
        assert s.proc.wait(30) == 0
        assert "draining" in s.log()
    finally:
        s.stop(signal.SIGKILL)


def test_serve_spawns_the_worker_first_and_adopts_it(server: Server) -> None:
    """`appliance serve` spawns the default model's worker before it imports the HTTP layer (the two overlap);
    the supervisor adopts that process: one worker, not two."""
    loading = re.findall(r"worker pid \d+ loading [^\"]*", server.log())
    assert loading and "(spawned before the app was built)" in loading[0], loading
    pids = {int(p) for p in re.findall(r"worker pid (\d+) loading", server.log())}
    spawned = [c.pid for c in psutil.Process(server.proc.pid).children() if c.pid in pids]
    assert spawned == [server.worker_pid()]


def test_an_early_worker_started_differently_is_replaced(tmp_path) -> None:
    """A worker spawned early with another spec than the model's (say the settings changed in between) is
    stopped, and one with the model's own spec starts instead."""
    settings = Settings(_env_file=None, data_dir=tmp_path, threads=1, context_size=512, parallel=1)
    spec = LlamaCppBackendSpec(path="embedded:smollm2")
    path = embedded_smollm2()[0]
    early = WorkerProcess(worker_spec(path, spec, settings, parallel=2))  # 2 slots: not what the model gets

    async def run() -> tuple[int | None, int | None]:
        sup = Supervisor("m", spec, settings, 1, on_events=lambda e: None, on_lost=lambda e: None, early=early)
        try:
            await sup.wait_ready(60)
            return sup.pid, sup.info.get("slots")
        finally:
            await sup.close()

    pid, slots = asyncio.run(run())
    assert pid != early.pid and slots == 1
    assert not early.alive


def prestarted_workers(marker: str) -> list[psutil.Process]:
    """Worker processes whose environment carries `marker` (the test's own, whoever their parent is now)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(p.info["cmdline"] or [])
            if "llamacpp.worker_main" in cmdline and p.environ().get("APPLIANCE_TEST_MARK") == marker:
                found.append(p)
        except psutil.Error:
            pass
    return found


def wait_until_none(marker: str, timeout: float = 20) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := prestarted_workers(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_a_prestarted_worker_nobody_takes_exits(tmp_path) -> None:
    """`appliance serve` starts a worker's interpreter before its own imports (appliance/prestart.py). When serve
    stops before it knows the model (a bad flag), or its default model needs no such worker (a file that is
    not there), that interpreter exits: nothing is left behind."""
    import subprocess
    import sys
    import uuid

    marker = uuid.uuid4().hex
    env = {**os.environ, "APPLIANCE_TEST_MARK": marker, "APPLIANCE_DATA_DIR": str(tmp_path / "d")}
    r = subprocess.run(
        [sys.executable, "-m", "appliance", "serve", "--context-size", "lots"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 2 and "--context-size" in r.stderr
    assert wait_until_none(marker) == []

    models = tmp_path / "models.toml"
    models.write_text(
        f'[[models]]\nid = "gone"\n[[models.backends]]\ntype = "llamacpp"\npath = "{tmp_path / "gone.gguf"}"\n'
    )
    env = {"APPLIANCE_TEST_MARK": marker, "APPLIANCE_MODELS_FILE": str(models), "APPLIANCE_DEFAULT_MODEL": "gone"}
    s = start_server(tmp_path, env=env, wait=False)
    try:
        deadline = time.monotonic() + 60
        while "Running on" not in s.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "Running on" in s.log(), s.log()
        assert wait_until_none(marker) == [], s.log()
        assert s.proc.poll() is None  # the appliance serves on (its model reports the missing file)
    finally:
        s.stop()
