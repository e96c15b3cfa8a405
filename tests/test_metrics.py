"""Prometheus /metrics: the names the console and the Grafana dashboard rely on, and their values."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.backends.base import BackendState, BackendStatus
from appliance.engine.router import CircuitBreaker
from appliance.engine.types import Error, Finish, Usage
from appliance.observability.metrics import Metrics
from appliance.observability.system import parse_nvidia_smi
from tests.conftest import REPO, Server

DASHBOARD = REPO / "observability" / "grafana-dashboard.json"
README_SECTION = REPO / "docs" / "security-observability-readme-section.md"
# Exposed only where there is something to measure (an NVIDIA GPU; a generation that errored...).
CONDITIONAL = {
    "appliance_gpu_memory_used_bytes",
    "appliance_gpu_memory_total_bytes",
    "appliance_gpu_utilization_percent",
}

# Names other components read (the console, the dashboard): they must not change.
REQUIRED = {
    "appliance_http_requests_total",
    "appliance_http_request_duration_seconds",
    "appliance_requests_total",
    "appliance_tokens_total",
    "appliance_ttft_seconds",
    "appliance_decode_tokens_per_second",
    "appliance_queue_depth",
    "appliance_inflight_streams",
    "appliance_rejections_total",
    "appliance_fallbacks_total",
    "appliance_circuit_breaker_state",
    "appliance_worker_restarts_total",
    "appliance_kv_cache_tokens",
    "appliance_kv_cache_capacity_tokens",
    "appliance_prompt_cache_bytes",
    "appliance_process_resident_memory_bytes",
    "appliance_process_cpu_percent",
    "appliance_host_cpu_percent",
    "appliance_host_memory_used_bytes",
    "appliance_host_memory_total_bytes",
    "appliance_data_disk_free_bytes",
    "appliance_data_disk_total_bytes",
}


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name → [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def family_names(text: str) -> set[str]:
    """Names as written in queries: counters with _total, histograms without _bucket/_sum/_count."""
    names = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name + "_total" if fam.type == "counter" else fam.name)
    return names


# -- unit ---------------------------------------------------------------------------------------------


def test_parse_nvidia_smi() -> None:
    gpus = parse_nvidia_smi("0, 1024, 81559, 37\n1, [N/A], 81559, [Not Supported]\n\n")
    assert [g.index for g in gpus] == ["0", "1"]
    assert gpus[0].memory_used_bytes == 1024 * 1024 * 1024 and gpus[0].utilization_percent == 37
    assert gpus[1].memory_used_bytes is None and gpus[1].utilization_percent is None
    assert gpus[1].memory_total_bytes == 81559 * 1024 * 1024


class FakeBackend:
    name = "llamacpp"
    ready = True
    can_load = True

    def __init__(self, restarts: int = 0):
        self.restarts = restarts

    def status(self) -> BackendStatus:
        return BackendStatus(
            "llamacpp", BackendState.READY, True, True, in_flight=2, queued=3, slots=4, restarts=self.restarts
        )

    async def stats(self, timeout: float = 1.0) -> dict:
        return {
            "slots": 4,
            "slots_busy": 2,
            "waiting": 0,
            "cached_tokens": 100,
            "capacity_tokens": 4096,
            "parked_bytes": 1000,
        }


async def test_hooks_and_engine_collector(tmp_path: Path) -> None:
    m = Metrics(tmp_path, "test")
    backends = [FakeBackend(1), FakeBackend(0)]
    breakers = {id(b): CircuitBreaker(1, 30) for b in backends}
    breakers[id(backends[1])].failure()
    entry = SimpleNamespace(id="m1", backends=backends)
    m.engine = SimpleNamespace(registry=[entry], breaker=lambda b: breakers[id(b)])  # type: ignore[assignment]
    h = m.hooks
    h.on_start("m1", "llamacpp")
    h.on_first_token("m1", "llamacpp", 0.2)
    h.on_finish("m1", "llamacpp", Finish("stop", Usage(10, 21, 4)), 1.2, 1.0)
    h.on_error("m1", "llamacpp", Error(503, "x", code="worker_crashed"))
    h.on_fallback("m1", "llamacpp", "queue_full")
    h.on_reject("m1", "queue_full")
    m.observe_http("/v1/models", "GET", 200, 0.01)
    m.observe_http("/v1/models", "BREW", 418, 0.01)
    await m.refresh()
    s = samples(m.render().decode())
    assert ({"model": "m1", "backend": "llamacpp", "kind": "prompt"}, 10.0) in s["appliance_tokens_total"]
    assert ({"model": "m1", "backend": "llamacpp", "kind": "completion"}, 21.0) in s["appliance_tokens_total"]
    assert s["appliance_ttft_seconds_count"] == [({"model": "m1", "backend": "llamacpp"}, 1.0)]
    assert s["appliance_decode_tokens_per_second_sum"] == [({"model": "m1", "backend": "llamacpp"}, 20.0)]
    assert s["appliance_queue_depth"] == [({"model": "m1"}, 6.0)]
    assert s["appliance_inflight_streams"] == [({"model": "m1"}, 4.0)]
    assert s["appliance_kv_cache_tokens"] == [({"model": "m1"}, 200.0)]
    assert s["appliance_kv_cache_capacity_tokens"] == [({"model": "m1"}, 8192.0)]
    assert s["appliance_prompt_cache_bytes"] == [({"model": "m1"}, 2000.0)]
    assert sorted(v for _, v in s["appliance_circuit_breaker_state"]) == [0.0, 2.0]
    assert {lab["backend"] for lab, _ in s["appliance_circuit_breaker_state"]} == {"llamacpp", "llamacpp#2"}
    assert ({"model": "m1", "backend": "llamacpp"}, 1.0) in s["appliance_worker_restarts_total"]
    assert s["appliance_rejections_total"] == [({"model": "m1", "reason": "queue_full"}, 1.0)]
    assert ({"model": "m1", "backend": "llamacpp", "code": "worker_crashed"}, 1.0) in s[
        "appliance_generation_errors_total"
    ]
    assert ({"route": "/v1/models", "method": "OTHER", "status": "418"}, 1.0) in s["appliance_http_requests_total"]
    assert s["appliance_process_resident_memory_bytes"][0][1] > 10e6
    assert s["appliance_host_memory_total_bytes"][0][1] > s["appliance_host_memory_used_bytes"][0][1] > 0
    assert s["appliance_data_disk_total_bytes"][0][1] >= s["appliance_data_disk_free_bytes"][0][1] > 0
    assert not any(name.endswith("_created") for name in s)
    # Two apps in one process do not share a registry.
    assert "appliance_tokens_total" not in samples(Metrics(tmp_path, "other").render().decode())


def test_dashboard_is_valid_json_with_panels() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    assert all("appliance_" in e for e in exprs)


# -- end to end ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scraped(appliance_server: Server) -> str:
    url = appliance_server.base_url
    body = {"model": "default", "messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 8}
    assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        r.read()
    assert httpx.get(f"{url}/v1/models/default").status_code == 200
    assert httpx.get(f"{url}/v1/models/no-such-model").status_code == 404
    httpx.post(f"{url}/v1/chat/completions", json={"model": "nope", "messages": body["messages"]})
    time.sleep(2.5)  # one background refresh: KV cache and host readings
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


@pytest.mark.slow
def test_metrics_endpoint_exposes_required_names(scraped: str) -> None:
    missing = REQUIRED - family_names(scraped)
    assert not missing, missing
    assert all(n.startswith("appliance_") for n in family_names(scraped))


@pytest.mark.slow
def test_metric_values_after_requests(scraped: str) -> None:
    s = samples(scraped)
    model = "smollm2-135m-instruct"
    tokens = {lab["kind"]: v for lab, v in s["appliance_tokens_total"] if lab["model"] == model}
    assert tokens["prompt"] > 0 and tokens["completion"] > 0
    assert any(
        lab == {"model": model, "backend": "llamacpp"} and v >= 2 for lab, v in s["appliance_ttft_seconds_count"]
    )
    assert any(v >= 1 for _, v in s["appliance_decode_tokens_per_second_count"])
    assert ({"model": model}, 0.0) in s["appliance_queue_depth"]
    kv = dict((lab["model"], v) for lab, v in s["appliance_kv_cache_capacity_tokens"])
    assert kv[model] > 0
    assert any(lab["model"] == model and v > 0 for lab, v in s["appliance_kv_cache_tokens"])
    assert ({"model": model, "backend": "llamacpp"}, 0.0) in s["appliance_circuit_breaker_state"]
    assert s["appliance_process_resident_memory_bytes"][0][1] > 50e6  # the API process and its model worker
    # Route templates, not raw paths, label HTTP metrics (bounded cardinality).
    routes = {lab["route"] for lab, _ in s["appliance_http_requests_total"]}
    assert "/v1/models/{model_id:path}" in routes and "/v1/chat/completions" in routes
    assert not any("no-such-model" in r for r in routes)
    statuses = {(lab["route"], lab["status"]) for lab, _ in s["appliance_http_requests_total"]}
    assert ("/v1/models/{model_id:path}", "404") in statuses
    assert any(lab["route"] == "/v1/chat/completions" for lab, _ in s["appliance_http_request_duration_seconds_count"])


@pytest.mark.slow
def test_dashboard_queries_only_exposed_metrics(scraped: str) -> None:
    exposed = family_names(scraped) | CONDITIONAL
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            for name in re.findall(r"appliance_[a-z0-9_]+", target["expr"]):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert name in exposed or base in exposed, f"{panel['title']}: {name} is not exposed"


@pytest.mark.slow
def test_readme_documents_every_metric(scraped: str) -> None:
    # The section lives in docs/ until it is merged into README.md.
    text = "".join(p.read_text() for p in (README_SECTION, REPO / "README.md") if p.is_file())
    for name in family_names(scraped) | CONDITIONAL:
        assert f"`{name}`" in text, f"{name} is not documented"
