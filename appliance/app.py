"""create_app(): routes, middleware stack and lifespan (start and stop model workers)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from appliance.api import openai
from appliance.api.errors import engine_error_handler, http_error_handler, unhandled_error_handler
from appliance.api.middleware import BodyLimitMiddleware, RequestIdMiddleware
from appliance.api.streaming import ClientDisconnected, disconnected_handler
from appliance.config import Settings, load_models_file
from appliance.engine.registry import Registry
from appliance.engine.router import Engine
from appliance.engine.types import EngineError

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
            {"id": m.id, "aliases": m.aliases, "backends": [b.describe() for b in m.backends]} for m in engine.registry
        ]
    return JSONResponse(doc, status_code=code)


def create_app(settings: Settings) -> Starlette:
    registry = Registry(settings, load_models_file(settings))
    engine = Engine(registry, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        await engine.start()
        try:
            yield
        finally:
            await engine.close()

    app = Starlette(
        routes=[Route("/health", health, methods=["GET"]), *openai.routes],
        middleware=[
            Middleware(RequestIdMiddleware),
            Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes),
        ],
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
    return app
