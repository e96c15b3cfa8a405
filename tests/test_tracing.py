"""OpenTelemetry tracing (observability/tracing.py) in the fast tier: create_app with a tracer provider whose
spans land in an InMemorySpanExporter, scripted backends, requests through httpx.ASGITransport."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from appliance.app import create_app
from appliance.config import RemoteBackendSpec, Settings
from appliance.engine.types import GenerateRequest, Message
from appliance.observability.tracing import Tracing, trace_headers
from appliance.security.keys import KeyEntry, KeysFile, hash_key, write_keys_file
from tests.fakes import FakeEmbedder, ScriptedBackend, crash, ok, scripted_factories

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
SECRET_PROMPT = "my secret prompt words"
KEY = "sk-app-" + "t" * 43


def make_tracing() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


async def test_spans_of_a_request_with_fallback_link_up(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(
        '[[models]]\nid = "m"\n'
        '[[models.backends]]\ntype = "remote"\nbase_url = "http://a.invalid"\nmodel = "m"\n'
        '[[models.backends]]\ntype = "remote"\nbase_url = "http://b.invalid"\nmodel = "m"\n'
    )
    write_keys_file(
        tmp_path / "keys.toml", KeysFile(keys={"alice": KeyEntry(sha256=hash_key(KEY), id="key_" + "a" * 24)})
    )
    a, b = ScriptedBackend("a", [crash()]), ScriptedBackend("b", [ok("Hi there")])
    settings = Settings(
        data_dir=tmp_path,
        models_file=models,
        default_model="m",
        retries=0,
        agent_enabled=False,
        embeddings_preload=False,
        keys_file=tmp_path / "keys.toml",
    )
    tracing, exporter = make_tracing()
    app = create_app(
        settings, backend_factories=scripted_factories({"m": [a, b]}), embeddings=FakeEmbedder(), tracing=tracing
    )
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://a") as c:
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": SECRET_PROMPT}]},
            headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "Authorization": f"Bearer {KEY}"},
        )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hi there"
    spans = exporter.get_finished_spans()
    by_name: dict[str, list] = {}
    for s in spans:
        by_name.setdefault(s.name.split(" /")[0], []).append(s)
    [server] = by_name["HTTP POST"]
    [opened] = by_name["engine.open"]
    attempts = sorted(by_name["engine.attempt"], key=lambda s: s.start_time)
    [gen] = by_name["engine.generation"]
    # One trace, continuing the caller's: server ← caller, open ← server, attempts and generation ← open.
    assert {format(s.context.trace_id, "032x") for s in spans} == {TRACE_ID}
    assert format(server.parent.span_id, "016x") == PARENT_ID
    assert server.name == "HTTP POST /v1/chat/completions"
    assert opened.parent.span_id == server.context.span_id
    assert [s.parent.span_id for s in attempts] == [opened.context.span_id] * 2
    assert gen.parent.span_id == opened.context.span_id
    # The fallback: a failed, b served.
    assert [s.attributes["appliance.backend"] for s in attempts] == ["a", "b"]
    assert attempts[0].status.status_code is StatusCode.ERROR
    assert attempts[0].attributes["error.type"] == "worker_crashed"
    assert attempts[1].status.status_code is not StatusCode.ERROR
    assert gen.attributes["appliance.backend"] == "b"
    assert gen.attributes["gen_ai.usage.output_tokens"] == 2
    assert gen.attributes["gen_ai.usage.input_tokens"] == 3
    assert gen.attributes["appliance.ttft_seconds"] >= 0
    assert gen.end_time >= gen.start_time
    # Request id and key id on the spans, never the prompt.
    assert server.attributes["appliance.request_id"] == r.headers["x-request-id"]
    assert server.attributes["http.response.status_code"] == 200
    for s in (server, opened, gen):
        assert s.attributes["appliance.key_id"] == "key_" + "a" * 24
    assert opened.attributes["appliance.request_id"] == r.headers["x-request-id"]
    assert SECRET_PROMPT not in repr([dict(s.attributes or {}) for s in spans])
    assert "my secret" not in repr([s.name for s in spans])


def test_outgoing_requests_carry_the_current_trace(tmp_path: Path) -> None:
    from appliance.backends.remote import RemoteBackend

    tracing, _ = make_tracing()
    spec = RemoteBackendSpec(type="remote", base_url="http://127.0.0.1:9/v1", model="up")
    backend = RemoteBackend("m", spec, Settings(data_dir=tmp_path))
    req = GenerateRequest(model="m", messages=[Message(role="user", content="hi")])
    assert "extra_headers" not in backend._args(req)  # no current span: nothing sent
    with tracing.tracer.start_as_current_span("outer") as span:
        headers = backend._args(req)["extra_headers"]
        assert trace_headers() == headers
    ctx = span.get_span_context()
    assert headers["traceparent"].startswith(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-")


def test_tracing_off_imports_nothing(tmp_path: Path) -> None:
    """Without APPLIANCE_OTEL_ENDPOINT, building the app loads no OpenTelemetry, psycopg, redis or limits."""
    code = (
        "import sys\n"
        "from appliance.app import create_app\n"
        "from appliance.config import Settings\n"
        f"app = create_app(Settings(data_dir={str(tmp_path)!r}))\n"
        "assert app.state.tracing is None\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('opentelemetry', 'psycopg', 'redis', 'limits'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_otel_endpoint_builds_an_otlp_exporter(tmp_path: Path) -> None:
    tracing = Tracing.from_settings(Settings(data_dir=tmp_path, otel_endpoint="http://127.0.0.1:4318"))
    assert tracing is not None
    try:
        [proc] = tracing.provider._active_span_processor._span_processors
        assert proc.span_exporter._endpoint == "http://127.0.0.1:4318/v1/traces"
    finally:
        tracing.shutdown()
    assert Tracing.from_settings(Settings(data_dir=tmp_path)) is None
    with pytest.raises(ValueError):
        Settings(data_dir=tmp_path, otel_endpoint="grpc://x")


async def test_agent_nodes_have_spans_under_the_generation(tmp_path: Path) -> None:
    """An agent turn through the traced engine: engine.open(agent) → engine.generation(agent) → agent.node
    spans per graph node, and the model's own engine.open inside the same trace; no prompt text."""
    from appliance.agent.service import AgentService
    from appliance.engine.types import Message
    from appliance.observability.tracing import TracedEngine, agent_callbacks
    from tests.fakes import ScriptedBackend, ok, scripted_registry, settings
    from tests.test_agent_graph import WordsEmbedder

    tracing, exporter = make_tracing()
    s = settings(data_dir=tmp_path, agent_timeout=10, agent_recursion_limit=8, embeddings_preload=False)
    backend = ScriptedBackend("llamacpp", default=ok("Fine, thanks."))
    engine = TracedEngine(scripted_registry(s, {"m": [backend]}), s, tracing=tracing)
    svc = AgentService(s, engine=engine, embeddings=WordsEmbedder())
    svc.callbacks = agent_callbacks(tracing)
    from appliance.agent.service import register_models

    register_models(svc, engine.registry)
    await svc.start()
    try:
        await svc.ready()
        with tracing.tracer.start_as_current_span("client") as root:
            req = GenerateRequest(model="agent", messages=[Message("user", SECRET_PROMPT)], request_id="req-1")
            stream = await engine.open(req)
            events = [ev async for ev in stream]
        assert events and type(events[-1]).__name__ == "Finish", events
    finally:
        await svc.close()
    spans = exporter.get_finished_spans()
    trace_id = root.get_span_context().trace_id
    assert {sp.context.trace_id for sp in spans} == {trace_id}
    by_id = {sp.context.span_id: sp for sp in spans}
    nodes = [sp for sp in spans if sp.name == "agent.node"]
    assert nodes and {sp.attributes["agent.node"] for sp in nodes} >= {"agent"}
    [agent_gen] = [sp for sp in spans if sp.name == "engine.generation" and sp.attributes["appliance.model"] == "agent"]

    def ancestors(sp) -> list[str]:
        out = []
        while sp.parent is not None and sp.parent.span_id in by_id:
            sp = by_id[sp.parent.span_id]
            out.append(sp.name)
        return out

    for sp in nodes:
        assert by_id[sp.parent.span_id] is agent_gen or "engine.generation" in ancestors(sp), ancestors(sp)
    model_opens = [sp for sp in spans if sp.name == "engine.open" and sp.attributes["appliance.model"] == "m"]
    assert model_opens and all("engine.generation" in ancestors(sp) for sp in model_opens)
    assert SECRET_PROMPT not in repr([dict(sp.attributes or {}) for sp in spans])
