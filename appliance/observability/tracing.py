"""Optional OpenTelemetry tracing (APPLIANCE_OTEL_ENDPOINT: an OTLP/HTTP collector). Off by default: this
module imports no OpenTelemetry package until `Tracing.from_settings` finds the setting set, and app.py
adds nothing to the request path without it.

Spans, each with the request id and the key id as attributes (never prompt or completion text):

    HTTP POST /v1/chat/completions          (server span; parent: the caller's `traceparent`, if any)
    └─ engine.open                          routing to a backend of the model, with fallback
       ├─ engine.attempt  backend=a  error   one per try; a failed one has status ERROR and its code
       └─ engine.attempt  backend=b
    └─ engine.generation                    the stream of the backend that took it: TTFT, tokens, finish
       └─ (an agent's own engine.open … for each model call, and agent.node spans via `agent_callbacks`)

The provider is an object of the app (app.state.tracing), never OpenTelemetry's global one. Context flows
in contextvars, so `trace_headers()` gives the `traceparent` of the current span for outgoing HTTP calls
(the remote backend sends it on), and a node behind nginx continues the trace of the node or client that
called it.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.config import Settings
from appliance.engine.router import Engine
from appliance.engine.types import EngineError, Event, Finish, GenerateRequest
from appliance.engine.types import Error as EngineErrorEvent

TRACER_NAME = "appliance"


class Tracing:
    """A tracer provider and its tracer; `shutdown()` flushes what is pending."""

    def __init__(self, provider: Any):
        self.provider = provider
        self.tracer = provider.get_tracer(TRACER_NAME)

    @classmethod
    def from_settings(cls, settings: Settings, version: str = "") -> Tracing | None:
        """None when APPLIANCE_OTEL_ENDPOINT is unset (nothing imported)."""
        if not settings.otel_endpoint:
            return None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        endpoint = settings.otel_endpoint.rstrip("/")
        if not endpoint.endswith("/v1/traces"):
            endpoint += "/v1/traces"
        resource = Resource.create(
            {
                "service.name": "appliance",
                "service.version": version,
                "service.instance.id": f"{socket.gethostname()}:{settings.port}",
            }
        )
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=10)))
        return cls(provider)

    def shutdown(self) -> None:
        self.provider.shutdown()


def _status_error(span: Any, description: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, description))


def _ids(req: GenerateRequest) -> dict[str, str]:
    out = {"appliance.model": req.model}
    if req.request_id:
        out["appliance.request_id"] = req.request_id
    if req.principal:
        out["appliance.key_id"] = req.principal
    return out


def trace_headers() -> dict[str, str]:
    """`traceparent` (and `tracestate`) of the current span, for an outgoing HTTP request; {} when tracing
    is off (OpenTelemetry not even imported) or no span is current."""
    if "opentelemetry.trace" not in sys.modules:
        return {}
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier


# -- HTTP ---------------------------------------------------------------------------------------------


class TracingMiddleware:
    """A server span per HTTP request, continuing an incoming `traceparent`. Its attributes are set when the
    response has gone: method, route, status, request id, key id, model."""

    def __init__(self, app: ASGIApp, tracing: Tracing):
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.app = app
        self.tracer = tracing.tracer
        self.propagator = TraceContextTextMapPropagator()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from opentelemetry.trace import SpanKind

        wanted = (b"traceparent", b"tracestate")
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in wanted}
        ctx = self.propagator.extract(carrier)
        method = scope["method"]
        status = {"code": 500}

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        with self.tracer.start_as_current_span(
            f"HTTP {method}", context=ctx, kind=SpanKind.SERVER, record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                await self.app(scope, receive, send_status)
            finally:
                route = getattr(scope.get("route"), "path", None) or scope["path"]
                span.update_name(f"HTTP {method} {route}")
                st = scope.get("state") or {}
                attrs = {
                    "http.request.method": method,
                    "http.route": route,
                    "http.response.status_code": status["code"],
                    "appliance.request_id": st.get("request_id"),
                    "appliance.key_id": st.get("principal"),
                    "appliance.model": st.get("model"),
                }
                span.set_attributes({k: v for k, v in attrs.items() if v is not None})
                if status["code"] >= 500:
                    _status_error(span, f"HTTP {status['code']}")


# -- the engine ---------------------------------------------------------------------------------------


class TracedEngine(Engine):
    """The engine with spans around routing (`engine.open`), each backend attempt (`engine.attempt`) and the
    chosen backend's stream (`engine.generation`: TTFT, tokens and finish reason as attributes)."""

    def __init__(self, *args: Any, tracing: Tracing, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tracer = tracing.tracer

    async def open(self, req: GenerateRequest) -> Any:
        with self.tracer.start_as_current_span(
            "engine.open", attributes=_ids(req), record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                stream = await super().open(req)
            except EngineError as e:
                span.set_attribute("error.type", e.error.code or "error")
                _status_error(span, e.error.message[:200])
                raise
            span.set_attribute("appliance.backend", stream.backend)
            return stream

    async def _first_event(self, backend: Any, req: GenerateRequest, left: float) -> tuple[Event, Any]:
        started = time.time_ns()
        attrs = {**_ids(req), "appliance.backend": backend.name}
        with self.tracer.start_as_current_span(
            "engine.attempt", attributes=attrs, record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                first, it = await super()._first_event(backend, req, left)
            except EngineError as e:
                span.set_attribute("error.type", e.error.code or "error")
                _status_error(span, e.error.message[:200])
                raise
            except TimeoutError:
                span.set_attribute("error.type", "first_token_timeout")
                _status_error(span, "no first token in time")
                raise
        gen = self.tracer.start_span("engine.generation", attributes=attrs, start_time=started)
        gen.set_attribute("appliance.ttft_seconds", (time.time_ns() - started) / 1e9)
        if isinstance(first, Finish):  # the whole answer in one event: the rest is never iterated
            _finish(gen, first)
            gen.end()
            return first, it
        return first, self._traced(gen, it)

    async def _traced(self, gen: Any, it: AsyncIterator[Event]) -> AsyncIterator[Event]:
        """`it`, with the generation span current while it runs (an agent's own model calls nest under it)."""
        from opentelemetry import context, trace

        ctx = trace.set_span_in_context(gen)
        try:
            while True:
                token = context.attach(ctx)
                try:
                    ev = await anext(it)
                except StopAsyncIteration:
                    break
                finally:
                    context.detach(token)
                if isinstance(ev, Finish):
                    _finish(gen, ev)
                elif isinstance(ev, EngineErrorEvent):
                    gen.set_attribute("error.type", ev.code or "error")
                    _status_error(gen, ev.message[:200])
                yield ev
        finally:
            try:
                await it.aclose()  # type: ignore[attr-defined]
            finally:
                gen.end()


def _finish(span: Any, ev: Finish) -> None:
    span.set_attributes(
        {
            "appliance.finish_reason": ev.reason,
            "gen_ai.usage.input_tokens": ev.usage.prompt_tokens,
            "gen_ai.usage.output_tokens": ev.usage.completion_tokens,
        }
    )


# -- the agent ----------------------------------------------------------------------------------------


def agent_callbacks(tracing: Tracing | None) -> list[Any]:
    """LangChain callbacks that make an `agent.node` span per LangGraph node run (for the agent's run
    config: `{"callbacks": agent_callbacks(tracing)}`); [] when tracing is off."""
    if tracing is None:
        return []
    from langchain_core.callbacks import AsyncCallbackHandler
    from opentelemetry import trace

    tracer = tracing.tracer

    class NodeSpans(AsyncCallbackHandler):
        def __init__(self) -> None:
            self.spans: dict[Any, Any] = {}

        async def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: Any, **kw: Any) -> None:
            meta = kw.get("metadata") or {}
            node = meta.get("langgraph_node")
            if not node or kw.get("name") != node:  # only the node's own run, not the runnables inside it
                return
            parent = self.spans.get(kw.get("parent_run_id"))
            ctx = trace.set_span_in_context(parent) if parent is not None else None
            span = tracer.start_span(
                "agent.node", context=ctx, attributes={"agent.node": node, "agent.step": meta.get("langgraph_step", 0)}
            )
            self.spans[run_id] = span

        async def on_chain_end(self, outputs: Any, *, run_id: Any, **kw: Any) -> None:
            if (span := self.spans.pop(run_id, None)) is not None:
                span.end()

        async def on_chain_error(self, error: BaseException, *, run_id: Any, **kw: Any) -> None:
            if (span := self.spans.pop(run_id, None)) is not None:
                _status_error(span, type(error).__name__)
                span.end()

    return [NodeSpans()]
