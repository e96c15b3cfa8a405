"""Model management: two GGUFs side by side, keep-alive, LRU eviction under a memory budget, and the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import ollama
import pytest

from appliance.catalog import embedded_smollm2
from tests.conftest import Server, start_server

pytestmark = pytest.mark.slow

MODELS = """
[[models]]
id = "smol"
[[models.backends]]
type = "llamacpp"
path = "embedded:smollm2"
context_size = 1024
parallel = 1

[[models]]
id = "gemma"
[[models.backends]]
type = "llamacpp"
path = "embedded:gemma3-270m"
context_size = 1024
parallel = 1

[[models]]
id = "broken"
[[models.backends]]
type = "llamacpp"
path = "{corrupt}"
"""


def models_file(tmp: Path) -> Path:
    corrupt = tmp / "truncated.gguf"
    shutil.copyfile(embedded_smollm2()[0], corrupt)
    with corrupt.open("r+b") as f:
        f.truncate(30_000_000)
    p = tmp / "models.toml"
    p.write_text(MODELS.format(corrupt=corrupt))
    return p


def loaded(server: Server) -> set[str]:
    return {m["name"] for m in httpx.get(f"{server.base_url}/api/ps", timeout=5).json()["models"]}


def wait_until(pred, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("roomy")
    s = start_server(tmp, "--models-file", str(models_file(tmp)), "--default-model", "smol")
    yield s
    s.stop()


def test_two_models_side_by_side(roomy: Server) -> None:
    assert loaded(roomy) == {"smol"}  # the default loads at start; the others on first use
    a = httpx.post(
        f"{roomy.base_url}/v1/chat/completions",
        json={"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5},
        timeout=120,
    )
    b = httpx.post(
        f"{roomy.base_url}/v1/completions",
        json={"model": "gemma", "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0},
        timeout=120,
    )
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    assert b.json()["model"] == "gemma" and b.json()["choices"][0]["text"]
    assert loaded(roomy) == {"smol", "gemma"}
    gemma_file = roomy.data_dir / "models" / "gemma-3-270m-q4_k_m.gguf"
    assert gemma_file.is_file()  # assembled once into the data directory
    tags = {m.model: m for m in ollama.Client(host=roomy.base_url).list().models}
    assert tags["gemma"].details.family == "gemma3" and tags["gemma"].details.quantization_level == "Q4_K_M"


def test_base_model_chat_uses_a_plain_transcript(roomy: Server) -> None:
    r = httpx.post(
        f"{roomy.base_url}/v1/chat/completions",
        json={"model": "gemma", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5},
        timeout=120,
    )
    assert r.status_code == 200, r.text


def test_keep_alive_unloads_idle_models(roomy: Server) -> None:
    c = ollama.Client(host=roomy.base_url)
    c.generate(model="gemma", prompt="Hi", keep_alive="1s", options={"num_predict": 2})
    assert "gemma" in loaded(roomy)
    assert wait_until(lambda: "gemma" not in loaded(roomy), 10)
    assert "smol" in loaded(roomy)  # the default model is pinned against idleness
    r = c.generate(model="gemma", prompt="")  # Ollama's "load this model"
    assert r.done_reason == "load" and "gemma" in loaded(roomy)
    r = c.generate(model="gemma", prompt="", keep_alive=0)  # ... and "unload it now"
    assert r.done_reason == "unload" and "gemma" not in loaded(roomy)


def test_corrupt_model_fails_cleanly_and_the_api_stays_up(roomy: Server) -> None:
    r = httpx.post(
        f"{roomy.base_url}/v1/chat/completions",
        json={"model": "broken", "messages": [{"role": "user", "content": "Hi"}]},
        timeout=60,
    )
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "model_load_failed" and "truncated.gguf" in err["message"]
    assert httpx.get(f"{roomy.base_url}/health", timeout=5).json() == {"status": "ok"}


def test_lru_eviction_under_a_memory_budget(tmp_path: Path) -> None:
    # smol takes ~200 MB and gemma ~400 MB here: a 500 MB budget holds one of them at a time.
    s = start_server(
        tmp_path,
        "--models-file",
        str(models_file(tmp_path)),
        "--default-model",
        "smol",
        env={"APPLIANCE_MEMORY_BUDGET": str(500 * 1024 * 1024)},
    )
    try:

        def complete(model: str) -> None:
            r = httpx.post(
                f"{s.base_url}/v1/completions",
                json={"model": model, "prompt": "Once upon a time", "max_tokens": 3},
                timeout=120,
            )
            assert r.status_code == 200, r.text

        assert loaded(s) == {"smol"}
        complete("gemma")
        assert loaded(s) == {"gemma"}
        assert "evicting model smol" in s.log()
        assert httpx.get(f"{s.base_url}/health", timeout=5).json() == {"status": "ok"}  # smol reloads on demand
        complete("smol")
        assert loaded(s) == {"smol"}
        assert "evicting model gemma" in s.log()
    finally:
        s.stop()


def run_cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", "models", *args, "--data-dir", str(tmp / "data"), "--port", "9"],
        capture_output=True,
        text=True,
        cwd=tmp,
        timeout=120,
    )


def test_models_cli_add_list_rm(tmp_path: Path) -> None:
    corrupt = tmp_path / "bad.gguf"
    shutil.copyfile(embedded_smollm2()[0], corrupt)
    with corrupt.open("r+b") as f:
        f.truncate(50_000_000)
    r = run_cli(tmp_path, "add", str(corrupt))
    assert r.returncode != 0 and "corrupt or truncated" in r.stderr and "Traceback" not in r.stderr
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    r = run_cli(tmp_path, "add", str(not_gguf))
    assert r.returncode != 0 and ("not a GGUF" in r.stderr or "truncated" in r.stderr)

    r = run_cli(tmp_path, "add", str(embedded_smollm2()[0]), "--id", "smol-copy")
    assert r.returncode == 0, r.stderr
    assert "llama" in r.stdout and "Q4_1" in r.stdout and "context 8192" in r.stdout
    copied = tmp_path / "data" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert copied.is_file() and not copied.is_symlink()
    text = (tmp_path / "data" / "models.toml").read_text()
    assert 'id = "smol-copy"' in text and embedded_smollm2()[1] in text  # sha256 recorded
    r = run_cli(tmp_path, "list")
    assert r.returncode == 0
    row = next(line for line in r.stdout.splitlines() if line.startswith("smol-copy"))
    assert "Q4_1" in row and "8192" in row and "llamacpp" in row and row.rstrip().endswith("?")
    r = run_cli(tmp_path, "add", str(embedded_smollm2()[0]), "--id", "smol-copy")
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run_cli(tmp_path, "rm", "smol-copy")
    assert r.returncode == 0 and not copied.exists()
    assert "smol-copy" not in run_cli(tmp_path, "list").stdout
    r = run_cli(tmp_path, "rm", "smollm2-135m-instruct")
    assert r.returncode == 2 and "default model" in r.stderr
