"""The composition root: settings → parts → routes, middleware and one lifespan. The whole app, top to bottom.

Nothing else wires parts together: no module adds routes, patches the lifespan or reads globals later.
Tests build the same app with other parts injected (scripted backends, a fake embedder).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from appliance.agent.service import AgentService, register_models
from appliance.api import embeddings as embeddings_api
from appliance.api import extras, health, ollama, openai, openapi, responses, threads
from appliance.api.errors import engine_error_handler, http_error_handler, unhandled_error_handler
from appliance.api.middleware import BodyLimitMiddleware, RequestIdMiddleware
from appliance.api.response_store import ResponseStore, StoredResponses
from appliance.api.streaming import ClientDisconnected, disconnected_handler
from appliance.backends import default_factories
from appliance.backends.base import BackendFactory
from appliance.backends.llamacpp.process import EarlyWorker
from appliance.backends.llamacpp.residency import Residency
from appliance.config import Settings, load_models_file
from appliance.console import routes as console_routes
from appliance.engine.registry import Registry
from appliance.engine.router import Engine
from appliance.engine.types import EngineError
from appliance.memory.embeddings import EmbeddingService
from appliance.observability.access import AccessMiddleware
from appliance.observability.metrics import Metrics
from appliance.observability.tracing import TracedEngine, Tracing, TracingMiddleware, agent_callbacks
from appliance.security.auth import AuthMiddleware
from appliance.security.keys import log_auth_mode
from appliance.security.keys_db import make_key_store
from appliance.security.limits import Limiter, RateLimiter, RateLimitMiddleware
from appliance.security.usage import UsageMiddleware
from appliance.security.usage import routes as usage_routes
from appliance.security.usage_db import make_usage_store

log = logging.getLogger("appliance")

CORS_HEADERS = ["Authorization", "Content-Type", "X-Request-Id", "X-Thread-Id", "OpenAI-Organization"]
CORS_EXPOSE = [
    "X-Request-Id",
    "X-Appliance-Backend",
    "X-Thread-Id",
    "Retry-After",
    *(f"x-ratelimit-{a}-{b}" for a in ("limit", "remaining", "reset") for b in ("requests", "tokens")),
]


def _version() -> str:
    try:
        return version("appliance")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


async def _preload(engine: Engine, embedder: Any, agent: AgentService | None) -> None:
    """APPLIANCE_EMBEDDINGS_PRELOAD: once the default chat model is ready (what /health waits for), load the
    embedding model (a low-priority process) and open the agent, so that their first requests wait less."""
    while not engine.ready:
        await asyncio.sleep(0.2)
    embedder.start()
    if agent is not None:
        await agent.start()


def create_app(
    settings: Settings,
    *,
    backend_factories: Mapping[str, BackendFactory] | None = None,
    embeddings: Any | None = None,
    agent_model_factory: Callable[..., Any] | None = None,
    tracing: Tracing | None = None,
    early_worker: EarlyWorker | None = None,
) -> Starlette:
    # -- the parts ---------------------------------------------------------------------------------
    residency = Residency(settings)  # which GGUF models are in memory (load on use, keep-alive, LRU)
    factories = backend_factories or default_factories(settings, residency, early_worker)
    registry = Registry(settings, load_models_file(settings), factories)
    metrics = Metrics(settings.data_dir, _version())
    tracing = tracing or Tracing.from_settings(settings, _version())  # None unless APPLIANCE_OTEL_ENDPOINT
    if tracing is not None:
        engine: Engine = TracedEngine(registry, settings, hooks=metrics.hooks, tracing=tracing)
    else:
        engine = Engine(registry, settings, hooks=metrics.hooks)
    metrics.engine = engine
    # Several boxes (README "Several boxes"): keys and usage in Postgres, limits in Redis, when set.
    keys = make_key_store(settings)  # the keys file, or the shared database's table
    limiter: Limiter = RateLimiter()  # per node
    if settings.limits_url:
        from appliance.security.limits_redis import RedisLimiter

        limiter = RedisLimiter(settings.limits_url)  # shared by every node
    usage = make_usage_store(settings)  # tokens per key, model and day
    stored_responses: StoredResponses  # Responses API, `store: true`: the local file or the shared database
    if settings.database_url:
        from appliance.api.response_store_pg import PgResponseStore

        stored_responses = PgResponseStore(settings.database_url, settings.max_responses_per_key)
    else:
        stored_responses = ResponseStore(settings.data_dir / "responses.sqlite", settings.max_responses_per_key)
    embedder = embeddings or EmbeddingService(
        wait=settings.embeddings_wait, threads=settings.embeddings_threads, nice=settings.embeddings_nice
    )
    agent = AgentService(settings, engine, embedder, model_factory=agent_model_factory)
    agent.callbacks = agent_callbacks(tracing)  # an agent.node span per graph node; [] without tracing
    register_models(agent, registry, agent=settings.agent_enabled)  # `agent`, `agent:<id>`, the embedding model

    # -- routes --------------------------------------------------------------------------------------
    routes = [
        *health.routes,
        Route("/metrics", metrics.endpoint, methods=["GET"]),
        Route("/openapi.json", openapi.endpoint, methods=["GET"]),
        *openai.routes,
        *responses.routes,
        *embeddings_api.routes,
        *(threads.routes if settings.agent_enabled else []),
        *ollama.routes,
        *extras.routes,
        *usage_routes,
        *console_routes,
    ]

    # -- middleware, outermost first -------------------------------------------------------------------
    middleware = [Middleware(RequestIdMiddleware)]
    if tracing is not None:
        middleware.append(Middleware(TracingMiddleware, tracing=tracing))
    middleware += [
        Middleware(
            AccessMiddleware,
            metrics=metrics,
            log_prompts=settings.log_prompts,
            trusted_proxies=settings.trusted_proxies,
        ),
    ]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                allow_headers=CORS_HEADERS,
                expose_headers=CORS_EXPOSE,
                max_age=600,
            )
        )
    middleware += [
        Middleware(
            AuthMiddleware,
            store=keys,
            metrics_public=settings.metrics_public,
            on_failure=lambda reason: metrics.auth_failures.labels(reason).inc(),
        ),
        Middleware(
            RateLimitMiddleware,
            store=keys,
            limiter=limiter,
            on_limited=lambda key, kind: metrics.rate_limited.labels(key, kind).inc(),
        ),
        Middleware(UsageMiddleware, store=usage),
        Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes),
    ]

    # -- one lifespan: started in order, closed in reverse -------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        async with contextlib.AsyncExitStack() as stack:
            if tracing is not None:
                stack.callback(tracing.shutdown)  # last: flushes the spans of everything closed before
            await residency.start()
            stack.push_async_callback(residency.close)
            await engine.start()  # the default model's worker spawns first: it takes longest
            stack.push_async_callback(engine.close)
            log_auth_mode(settings, keys)
            keys.start()  # the database's keys: re-read every few seconds
            stack.callback(keys.close)
            stack.callback(stored_responses.close)
            usage.start()
            stack.push_async_callback(usage.aclose)
            await stack.enter_async_context(metrics.running())
            stack.callback(embedder.close)
            if settings.agent_enabled:  # opens on its first request (langgraph, Chroma), or preloaded below
                stack.push_async_callback(agent.close)
            if settings.embeddings_preload:
                task = asyncio.create_task(_preload(engine, embedder, agent if settings.agent_enabled else None))
                stack.callback(task.cancel)
            yield

    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            EngineError: engine_error_handler,
            ClientDisconnected: disconnected_handler,
            HTTPException: http_error_handler,
            Exception: unhandled_error_handler,
        },
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.keys = keys
    app.state.usage = usage
    app.state.responses = stored_responses
    app.state.agent = agent
    app.state.embeddings = embedder
    app.state.tracing = tracing
    return app
