"""Everything security and observability add to the app, wired in one place.

    inst = Instrumentation(settings)
    engine = Engine(registry, settings, hooks=inst.hooks)
    inst.attach(engine)
    Starlette(routes=[..., *inst.routes], middleware=inst.middleware(), ...)
    # in the lifespan:  async with inst.running(): ...

Middleware, outermost first: request id → access log + metrics → CORS (when configured) → auth →
rate limits → body limit → the app.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute, Route

from appliance.api import openapi
from appliance.api.middleware import BodyLimitMiddleware, RequestIdMiddleware
from appliance.config import Settings
from appliance.engine.router import Engine
from appliance.observability.access import AccessMiddleware
from appliance.observability.metrics import Metrics
from appliance.security.auth import AuthMiddleware
from appliance.security.keys import KeyStore, describe_auth, is_loopback
from appliance.security.limits import RateLimiter, RateLimitMiddleware

log = logging.getLogger("appliance")

CORS_HEADERS = ["Authorization", "Content-Type", "X-Request-Id", "X-Thread-Id", "OpenAI-Organization"]
CORS_EXPOSE = [
    "X-Request-Id",
    "X-Appliance-Backend",
    "X-Thread-Id",
    "Retry-After",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
]


def _version() -> str:
    try:
        return version("appliance")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


class Instrumentation:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics(settings.data_dir, _version())
        self.keys = KeyStore(settings.keys_path)
        self.limiter = RateLimiter()
        self.hooks = self.metrics.hooks

    def attach(self, engine: Engine) -> None:
        self.metrics.engine = engine

    def middleware(self) -> list[Middleware]:
        return build_middleware(self.settings, self.metrics, self.keys, self.limiter)

    @property
    def routes(self) -> list[BaseRoute]:
        return [
            Route("/metrics", self.metrics.endpoint, methods=["GET"]),
            Route("/openapi.json", openapi.endpoint, methods=["GET"]),
        ]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Log how requests are authenticated; refresh the metrics' background readings."""
        s = self.settings
        (log.info if self.keys.enabled or is_loopback(s.host) else log.warning)(describe_auth(s, self.keys))
        if s.cors_origins:
            log.info("CORS: allowing origins %s", ", ".join(s.cors_origins))
        if s.log_prompts:
            log.warning("APPLIANCE_LOG_PROMPTS is on: prompts and completions are written to the log")
        async with self.metrics.running():
            yield


def build_middleware(
    settings: Settings, metrics: Metrics | None, keys: KeyStore, limiter: RateLimiter | None = None
) -> list[Middleware]:
    stack = [
        Middleware(RequestIdMiddleware),
        Middleware(AccessMiddleware, metrics=metrics, log_prompts=settings.log_prompts),
    ]
    if settings.cors_origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                allow_headers=CORS_HEADERS,
                expose_headers=CORS_EXPOSE,
                max_age=600,
            )
        )
    stack += [
        Middleware(
            AuthMiddleware,
            store=keys,
            metrics_public=settings.metrics_public,
            on_failure=(lambda reason: metrics.auth_failures.labels(reason).inc()) if metrics else None,
        ),
        Middleware(
            RateLimitMiddleware,
            store=keys,
            limiter=limiter,
            on_limited=(lambda key, kind: metrics.rate_limited.labels(key, kind).inc()) if metrics else None,
        ),
        Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes),
    ]
    return stack
