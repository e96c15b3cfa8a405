"""KV cache type and compute-pass settings: what the worker is given, what it costs in memory, and that a
quantized cache works (llama.cpp turns flash attention on for a quantized V cache)."""

from __future__ import annotations

import pytest

from appliance.backends.llamacpp.protocol import Finished, GenRequest, Text
from appliance.backends.llamacpp.residency import kv_cache_bytes
from appliance.backends.llamacpp.supervisor import Supervisor
from appliance.backends.llamacpp.worker import compute_passes
from appliance.catalog import embedded_smollm2
from appliance.config import LlamaCppBackendSpec, ModelsFile, Settings
from appliance.engine.types import Message, SamplingParams

MiB = 1 << 20


def test_kv_cache_bytes_from_the_gguf_header() -> None:
    path = embedded_smollm2()[0]
    # SmolLM2-135M: 30 layers x 3 KV heads x (64 + 64) dims per token
    assert kv_cache_bytes(path, 8192, 4, "f16") == 30 * 3 * 128 * 2 * 8192 * 4 == 720 * MiB
    assert kv_cache_bytes(path, 8192, 8, "f16") == 1440 * MiB
    assert kv_cache_bytes(path, 8192, 8, "q8_0") == 1440 * MiB * 17 // 32
    assert kv_cache_bytes(path, 100_000, 1, "f16") == kv_cache_bytes(path, 8192, 1, "f16")  # capped at training
    assert kv_cache_bytes(None, 8192, 1, "f16") == 0


def test_compute_passes() -> None:
    assert compute_passes(512, None, invariant=False) == (512, 128)  # whole-batch passes, 128 while others decode
    assert compute_passes(512, None, invariant=True) == (48, 48)
    assert compute_passes(512, 256, invariant=True) == (63, 63)  # never 64 or more when invariant
    assert compute_passes(256, 1024, invariant=False) == (256, 128)


def test_models_file_and_settings_reach_the_worker(tmp_path) -> None:
    s = Settings(data_dir=tmp_path, kv_cache_type="q8_0", batch_invariant=True)
    spec = LlamaCppBackendSpec(path="embedded:smollm2")
    sup = Supervisor("m", spec, s, 8, on_events=lambda e: None, on_lost=lambda e: None)
    sup.path = embedded_smollm2()[0]
    w = sup._worker_spec()
    assert (w["kv_cache_type"], w["batch_invariant"]) == ("q8_0", True)
    spec = LlamaCppBackendSpec(path="embedded:smollm2", kv_cache_type="f16", batch_invariant=False)
    w = Supervisor("m", spec, s, 8, on_events=lambda e: None, on_lost=lambda e: None)._worker_spec()
    assert (w["kv_cache_type"], w["batch_invariant"]) == ("f16", False)
    assert Settings(data_dir=tmp_path).parallel == 8 and Settings(data_dir=tmp_path).kv_cache_type == "f16"
    doc = {"models": [{"id": "m", "backends": [{"type": "llamacpp", "path": "x", "kv_cache_type": "q5_9"}]}]}
    with pytest.raises(ValueError):
        ModelsFile.model_validate(doc)


@pytest.mark.slow
def test_a_q8_0_cache_loads_and_generates() -> None:
    from appliance.backends.llamacpp.worker import _Worker

    spec = {"path": str(embedded_smollm2()[0]), "context_size": 512, "threads": 1, "parallel": 2}
    w = _Worker({**spec, "kv_cache_type": "q8_0"})
    assert w.info["kv_cache_type"] == "q8_0"
    req = GenRequest(
        "q", [Message("user", "Name three colours.")], None, SamplingParams(max_tokens=12, temperature=0), 64
    )
    w.sched.submit(w._job(req))
    text, done = "", None
    while w.sched.busy:
        for ev in w.sched.step():
            if isinstance(ev, Text):
                text += ev.text
            elif isinstance(ev, Finished):
                done = ev
    assert done is not None and done.usage.completion_tokens > 0 and text.strip()
