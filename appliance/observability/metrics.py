"""Prometheus metrics: one CollectorRegistry per app, every name prefixed `appliance_`.

Three sources: counters and histograms updated as things happen (HTTP middleware, engine hooks, auth and
limits), a collector that reads the engine's state at scrape time (queues, in-flight streams, circuit
breakers, worker restarts, model residency), and readings refreshed by a background task every couple of
seconds (KV cache from the workers, process/host/disk/GPU) so that a scrape never waits on a worker or a
subprocess. README "Metrics" lists every metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from appliance.engine.router import EngineHooks
from appliance.engine.types import Error, Finish
from appliance.observability.system import SystemReading, SystemSampler

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from appliance.engine.router import Engine

log = logging.getLogger("appliance.metrics")
disable_created_metrics()  # no `_created` series: half the output, nothing the dashboard uses

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
TPS_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 1000)
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


class PrometheusHooks(EngineHooks):
    """Engine events → counters and histograms."""

    def __init__(self, m: Metrics):
        self.m = m

    def on_start(self, model: str, backend: str) -> None:
        self.m.requests.labels(model, backend).inc()

    def on_first_token(self, model: str, backend: str, ttft: float) -> None:
        self.m.ttft.labels(model, backend).observe(ttft)

    def on_finish(self, model: str, backend: str, finish: Finish, duration: float, decode_time: float) -> None:
        m, u = self.m, finish.usage
        m.tokens.labels(model, backend, "prompt").inc(u.prompt_tokens)
        m.tokens.labels(model, backend, "completion").inc(u.completion_tokens)
        if u.cached_tokens:
            m.cached_tokens.labels(model, backend).inc(u.cached_tokens)
        m.generation_seconds.labels(model, backend).observe(duration)
        m.finishes.labels(model, backend, finish.reason).inc()
        # Tokens after the first one, over the time after the first one: the decode rate, TTFT excluded.
        if u.completion_tokens > 1 and decode_time > 0:
            m.decode_tps.labels(model, backend).observe((u.completion_tokens - 1) / decode_time)

    def on_error(self, model: str, backend: str, error: Error) -> None:
        self.m.errors.labels(model, backend, error.code or str(error.status)).inc()

    def on_fallback(self, model: str, backend: str, reason: str) -> None:
        self.m.fallbacks.labels(model, backend, reason).inc()

    def on_reject(self, model: str, reason: str) -> None:
        self.m.rejections.labels(model, reason).inc()


class _Collect:
    """A custom collector calling a function at scrape time."""

    def __init__(self, fn):
        self.fn = fn

    def collect(self) -> Iterable[Metric]:
        try:
            yield from self.fn()
        except Exception:  # a broken reading must not break the whole scrape
            log.exception("metrics collector failed")

    def describe(self) -> list[Metric]:
        return []


class Metrics:
    def __init__(self, data_dir=None, version: str = ""):
        self.registry = r = CollectorRegistry()
        self.engine: Engine | None = None
        self.data_dir = data_dir
        self.kv: dict[str, dict[str, float]] = {}  # model → summed worker stats
        self.system = SystemReading()
        self._sampler: SystemSampler | None = None

        # HTTP (the access middleware)
        self.http_requests = Counter(
            "appliance_http_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "appliance_http_request_duration_seconds",
            "HTTP request duration to the end of the response body (streams included)",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http_in_flight = Gauge("appliance_http_requests_in_flight", "HTTP requests being served", registry=r)

        # Generation (engine hooks)
        self.requests = Counter(
            "appliance_requests", "Generation requests started, by model and backend", ["model", "backend"], registry=r
        )
        self.tokens = Counter(
            "appliance_tokens",
            "Tokens processed (kind: prompt or completion)",
            ["model", "backend", "kind"],
            registry=r,
        )
        self.cached_tokens = Counter(
            "appliance_prompt_cached_tokens", "Prompt tokens reused from the KV cache", ["model", "backend"], registry=r
        )
        self.ttft = Histogram(
            "appliance_ttft_seconds",
            "Time to first token, from the start of the backend attempt (queue wait included)",
            ["model", "backend"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.decode_tps = Histogram(
            "appliance_decode_tokens_per_second",
            "Per-request decode speed: completion tokens after the first over the time after the first",
            ["model", "backend"],
            buckets=TPS_BUCKETS,
            registry=r,
        )
        self.generation_seconds = Histogram(
            "appliance_generation_duration_seconds",
            "Duration of finished generations, queue wait included",
            ["model", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.finishes = Counter(
            "appliance_finishes", "Finished generations by finish reason", ["model", "backend", "reason"], registry=r
        )
        self.errors = Counter(
            "appliance_generation_errors",
            "Generations that ended in an error, by code",
            ["model", "backend", "code"],
            registry=r,
        )
        self.fallbacks = Counter(
            "appliance_fallbacks",
            "Times a request moved past a backend, by reason",
            ["model", "backend", "reason"],
            registry=r,
        )
        self.rejections = Counter(
            "appliance_rejections",
            "Requests no backend could take, by reason (queue_full, ...)",
            ["model", "reason"],
            registry=r,
        )

        # Security
        self.auth_failures = Counter(
            "appliance_auth_failures",
            "Requests refused with 401 (reason: missing or invalid key)",
            ["reason"],
            registry=r,
        )
        self.rate_limited = Counter(
            "appliance_rate_limited",
            "Requests refused with 429 by a key's limits (limit: requests, tokens, streams; "
            "key: the key's name, or 'other' when there are more than 100 keys)",
            ["key", "limit"],
            registry=r,
        )

        info = Gauge("appliance_info", "The appliance's version", ["version"], registry=r)
        info.labels(version).set(1)
        r.register(_Collect(self._engine_metrics))
        r.register(_Collect(self._system_metrics))
        self.hooks = PrometheusHooks(self)

    # -- HTTP --------------------------------------------------------------------------------------
    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "OTHER"
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_latency.labels(route, method).observe(seconds)

    # -- engine state at scrape time ------------------------------------------------------------------
    def _engine_metrics(self) -> Iterable[Metric]:
        engine = self.engine
        if engine is None:
            return
        labels_mb = ["model", "backend"]
        queue = GaugeMetricFamily("appliance_queue_depth", "Requests waiting for a slot", labels=["model"])
        inflight = GaugeMetricFamily(
            "appliance_inflight_streams", "Generation requests admitted and running", labels=["model"]
        )
        slots = GaugeMetricFamily("appliance_slots", "Concurrent sequences (slots) of loaded models", labels=["model"])
        loaded = GaugeMetricFamily("appliance_model_loaded", "1 if a backend of the model is loaded", labels=["model"])
        memory = GaugeMetricFamily("appliance_model_memory_bytes", "Memory of loaded model workers", labels=["model"])
        ready = GaugeMetricFamily("appliance_backend_ready", "1 if the backend is ready", labels=labels_mb)
        breaker = GaugeMetricFamily(
            "appliance_circuit_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open", labels=labels_mb
        )
        restarts = CounterMetricFamily(
            "appliance_worker_restarts", "Model worker processes restarted after dying", labels=labels_mb
        )
        kv_used = GaugeMetricFamily("appliance_kv_cache_tokens", "Tokens held in the KV cache", labels=["model"])
        kv_cap = GaugeMetricFamily(
            "appliance_kv_cache_capacity_tokens", "KV cache capacity in tokens (all slots)", labels=["model"]
        )
        busy = GaugeMetricFamily("appliance_slots_busy", "Slots generating now (from the worker)", labels=["model"])
        parked = GaugeMetricFamily(
            "appliance_prompt_cache_bytes", "Slot states parked in RAM (APPLIANCE_PROMPT_CACHE_MIB)", labels=["model"]
        )
        for entry in engine.registry:
            q = n = s = mem = 0
            is_loaded = False
            seen: dict[str, int] = {}
            for backend in entry.backends:
                try:
                    st = backend.status()
                except Exception:
                    continue
                q += st.queued
                n += st.in_flight
                if st.loaded:
                    s += st.slots or 0
                    is_loaded = True
                mem += st.memory_bytes
                name = backend.name
                seen[name] = seen.get(name, 0) + 1
                label = name if seen[name] == 1 else f"{name}#{seen[name]}"
                ready.add_metric([entry.id, label], 1.0 if backend.ready else 0.0)
                br = engine.breaker(backend).describe()["state"]
                breaker.add_metric([entry.id, label], BREAKER_STATES.get(br, 0))
                if backend.can_load:  # backends with a worker process of their own
                    restarts.add_metric([entry.id, label], float(st.restarts))
            queue.add_metric([entry.id], q)
            inflight.add_metric([entry.id], n)
            slots.add_metric([entry.id], s)
            loaded.add_metric([entry.id], 1.0 if is_loaded else 0.0)
            memory.add_metric([entry.id], mem)
            kv = self.kv.get(entry.id)
            if kv is not None:
                kv_used.add_metric([entry.id], kv.get("cached_tokens", 0))
                kv_cap.add_metric([entry.id], kv.get("capacity_tokens", 0))
                busy.add_metric([entry.id], kv.get("slots_busy", 0))
                parked.add_metric([entry.id], kv.get("parked_bytes", 0))
        yield from (queue, inflight, slots, loaded, memory, ready, breaker, restarts, kv_used, kv_cap, busy, parked)

    def _system_metrics(self) -> Iterable[Metric]:
        s = self.system

        def g(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield g(
            "appliance_process_resident_memory_bytes",
            "RSS of the API process and its model workers",
            s.process_rss_bytes,
        )
        yield g(
            "appliance_process_cpu_percent",
            "CPU of the API process and its workers (100 = one core busy)",
            s.process_cpu_percent,
        )
        yield g("appliance_host_cpu_percent", "Host CPU use, all cores (0-100)", s.host_cpu_percent)
        yield g("appliance_host_memory_used_bytes", "Host memory in use (total - available)", s.host_memory_used_bytes)
        yield g("appliance_host_memory_total_bytes", "Host memory", s.host_memory_total_bytes)
        yield g("appliance_data_disk_free_bytes", "Free space on the data directory's filesystem", s.disk_free_bytes)
        yield g("appliance_data_disk_total_bytes", "Size of the data directory's filesystem", s.disk_total_bytes)
        used = GaugeMetricFamily("appliance_gpu_memory_used_bytes", "GPU memory in use (nvidia-smi)", labels=["gpu"])
        total = GaugeMetricFamily("appliance_gpu_memory_total_bytes", "GPU memory (nvidia-smi)", labels=["gpu"])
        util = GaugeMetricFamily("appliance_gpu_utilization_percent", "GPU utilisation (nvidia-smi)", labels=["gpu"])
        for gpu in s.gpus:
            if gpu.memory_used_bytes is not None:
                used.add_metric([gpu.index], gpu.memory_used_bytes)
            if gpu.memory_total_bytes is not None:
                total.add_metric([gpu.index], gpu.memory_total_bytes)
            if gpu.utilization_percent is not None:
                util.add_metric([gpu.index], gpu.utilization_percent)
        yield from (used, total, util)

    # -- background refresh ----------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Ask each loaded worker for its stats, and read process/host/GPU figures (in a thread)."""
        engine = self.engine
        if engine is not None:
            kv: dict[str, dict[str, float]] = {}
            for entry in engine.registry:
                for backend in entry.backends:
                    if not backend.ready:
                        continue
                    try:
                        st = await backend.stats()
                    except Exception:
                        st = None
                    if not st:
                        continue
                    acc = kv.setdefault(entry.id, {})
                    for k in ("cached_tokens", "capacity_tokens", "slots_busy", "slots", "waiting", "parked_bytes"):
                        acc[k] = acc.get(k, 0) + float(st.get(k) or 0)
            self.kv = kv
        if self._sampler is None and self.data_dir is not None:
            self._sampler = await asyncio.to_thread(SystemSampler, self.data_dir)
        if self._sampler is not None:
            self.system = await asyncio.to_thread(self._sampler.read)

    @contextlib.asynccontextmanager
    async def running(self, interval: float = 2.0) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                started = time.monotonic()
                try:
                    await self.refresh()
                except Exception:
                    log.exception("metrics refresh failed")
                await asyncio.sleep(max(0.2, interval - (time.monotonic() - started)))

        task = asyncio.create_task(loop(), name="metrics-refresh")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the endpoint ------------------------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def endpoint(self, request: Request) -> Response:
        from starlette.responses import Response

        return Response(self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
