"""create_app(): routes, middleware stack and lifespan (start and stop model workers)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from appliance.agent.service import setup_agent
from appliance.api import ollama, openai
from appliance.api.errors import engine_error_handler, http_error_handler, unhandled_error_handler
from appliance.api.streaming import ClientDisconnected, disconnected_handler
from appliance.config import Settings, load_models_file
from appliance.console import routes as console_routes
from appliance.engine.registry import Registry
from appliance.engine.router import Engine
from appliance.engine.types import EngineError
from appliance.observability.setup import Instrumentation

log = logging.getLogger("appliance")


async def health(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    if engine.ready:
        status, code = "ok", 200
    else:
        failed = all(b.state == "failed" for b in engine.registry.default.backends)
        status, code = ("failed" if failed else "loading"), 503
    doc: dict = {"status": status}
    if request.query_params.get("verbose") in ("1", "true", "yes"):
        doc["default_model"] = engine.registry.default.id
        doc["models"] = [
            {
                "id": m.id,
                "aliases": m.aliases,
                "kind": m.kind,
                "backends": [{**b.describe(), "circuit": engine.breaker(b).describe()} for b in m.backends],
            }
            for m in engine.registry
        ]
    return JSONResponse(doc, status_code=code)


def create_app(settings: Settings) -> Starlette:
    registry = Registry(settings, load_models_file(settings))
    inst = Instrumentation(settings)  # keys, metrics, logs: the middleware stack (appliance/observability/setup.py)
    engine = Engine(registry, settings, hooks=inst.hooks)
    inst.attach(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        await engine.start()
        try:
            async with inst.running():
                yield
        finally:
            await engine.close()

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            *inst.routes,
            *openai.routes,
            *ollama.routes,
            *console_routes,
        ],
        middleware=inst.middleware(),
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
    app.state.instrumentation = inst
    setup_agent(app, engine, settings)  # agent, threads, memory, embeddings (appliance/agent/service.py)
    return app
