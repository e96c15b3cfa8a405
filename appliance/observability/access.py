"""Access log and HTTP metrics: one pure-ASGI middleware, one JSON line per request when it has finished.

The line (logger `appliance.access`) carries the request id, key name, method, route template, path,
model, backend, status, token counts, TTFT and duration — never headers, keys, prompts or completions.
Only with APPLIANCE_LOG_PROMPTS=true does it add `prompt` and `completion` text (truncated), for debugging:
the handlers leave them on the request's state from the internal request and events (api/streaming.py);
nothing here parses the bytes that were sent.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.observability.metrics import Metrics

access_log = logging.getLogger("appliance.access")


def _template(route: Any) -> str | None:
    path = getattr(route, "path", None)
    if path is None:
        return None
    if isinstance(route, Mount):
        return (path.rstrip("/") or "") + "/{path}"
    return path or "/"


def route_template(scope: Scope) -> str:
    """The matched route's path template (`/v1/models/{model_id:path}`), to keep label cardinality bounded."""
    route = scope.get("route")
    if route is None:  # answered before routing (401, 429, 413): match it ourselves
        app = scope.get("app")
        for r in getattr(app, "routes", ()):
            try:
                match, _ = r.matches(scope)
            except Exception:
                continue
            if match is not Match.NONE:
                route = r
                break
    return _template(route) or "unmatched"


class AccessMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics | None = None, log_prompts: bool = False):
        self.app = app
        self.metrics = metrics
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        sent = 0
        if self.log_prompts:
            scope.setdefault("state", {})["capture"] = True  # handlers keep prompt and completion text

        async def send_wrapper(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        m = self.metrics
        if m is not None:
            m.http_in_flight.inc()
        error = False
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            error = True
            raise
        finally:
            duration = time.perf_counter() - started
            if not status:
                status = 500 if error else 499  # no response: a crash, or the client left first
            route = route_template(scope)
            if m is not None:
                m.http_in_flight.dec()
                m.observe_http(route, scope["method"], status, duration)
            self._log(scope, route, status, duration, sent)

    def _log(self, scope: Scope, route: str, status: int, duration: float, sent: int) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        st = scope.get("state") or {}
        client = scope.get("client")
        fields: dict[str, Any] = {
            "request_id": st.get("request_id"),
            "key_name": st.get("key_name"),
            "client": client[0] if client else None,
            "method": scope["method"],
            "route": route,
            "path": scope["path"],
            "status": status,
            "model": st.get("model"),
            "backend": st.get("backend"),
            "prompt_tokens": st.get("prompt_tokens"),
            "completion_tokens": st.get("completion_tokens"),
            "ttft_ms": round(st["ttft"] * 1000, 1) if st.get("ttft") is not None else None,
            "duration_ms": round(duration * 1000, 1),
            "bytes_sent": sent,
        }
        if self.log_prompts:
            fields["prompt"] = st.get("prompt")
            fields["completion"] = st.get("completion")
        fields = {k: v for k, v in fields.items() if v is not None}
        access_log.info(
            "%s %s %s %.0fms", scope["method"], scope["path"], status, duration * 1000, extra={"fields": fields}
        )
