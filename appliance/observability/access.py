"""Access log and HTTP metrics: one pure-ASGI middleware, one JSON line per request when it has finished.

The line (logger `appliance.access`) carries the request id, key name, method, route template, path,
model, backend, status, token counts, TTFT and duration — never headers, keys, prompts or completions.
Only with APPLIANCE_LOG_PROMPTS=true does it add `prompt` and `completion` text (truncated), for debugging.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.observability.metrics import Metrics

access_log = logging.getLogger("appliance.access")
CAPTURE_LIMIT = 64 * 1024  # bytes of request/response body kept for APPLIANCE_LOG_PROMPTS
TEXT_LIMIT = 8 * 1024  # characters of prompt/completion text logged


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


def _prompt_text(body: bytes) -> str | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    for key in ("messages", "prompt", "input", "content"):
        if key in doc:
            v = doc[key]
            return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    return None


def _completion_text(content_type: str, body: bytes) -> str | None:
    """The generated text of an OpenAI JSON/SSE or Ollama JSON/NDJSON response."""
    text = body.decode("utf-8", "replace")
    docs: list[Any] = []
    if "event-stream" in content_type:
        for line in text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                with contextlib.suppress(ValueError):
                    docs.append(json.loads(line[6:]))
    else:
        for line in text.splitlines() if "ndjson" in content_type else [text]:
            with contextlib.suppress(ValueError):
                docs.append(json.loads(line))
    parts: list[str] = []
    for d in docs:
        if not isinstance(d, dict):
            continue
        for c in d.get("choices") or []:
            if isinstance(c, dict):
                msg = c.get("message") or c.get("delta") or {}
                parts.append(str(msg.get("content") or "") if isinstance(msg, dict) else "")
                parts.append(str(c.get("text") or ""))
        msg = d.get("message")
        if isinstance(msg, dict):
            parts.append(str(msg.get("content") or ""))
        if isinstance(d.get("response"), str):
            parts.append(d["response"])
    return "".join(parts) if docs else None


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
        content_type = ""
        req_body: list[bytes] = []
        resp_body: list[bytes] = []
        capture = self.log_prompts

        async def receive_wrapper() -> Message:
            msg = await receive()
            if capture and msg["type"] == "http.request" and sum(map(len, req_body)) < CAPTURE_LIMIT:
                req_body.append(msg.get("body", b""))
            return msg

        async def send_wrapper(message: Message) -> None:
            nonlocal status, sent, content_type
            if message["type"] == "http.response.start":
                status = message["status"]
                if capture:
                    for k, v in message.get("headers", []):
                        if k.lower() == b"content-type":
                            content_type = v.decode("latin-1")
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                sent += len(body)
                if capture and sum(map(len, resp_body)) < CAPTURE_LIMIT:
                    resp_body.append(body)
            await send(message)

        m = self.metrics
        if m is not None:
            m.http_in_flight.inc()
        error = False
        try:
            await self.app(scope, receive_wrapper if capture else receive, send_wrapper)
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
            self._log(scope, route, status, duration, sent, content_type, req_body, resp_body)

    def _log(
        self,
        scope: Scope,
        route: str,
        status: int,
        duration: float,
        sent: int,
        content_type: str,
        req_body: list[bytes],
        resp_body: list[bytes],
    ) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        st = scope.get("state") or {}
        client = scope.get("client")
        fields: dict[str, Any] = {
            "request_id": st.get("request_id"),
            "key_name": st.get("principal"),
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
            prompt = _prompt_text(b"".join(req_body)) if req_body else None
            completion = _completion_text(content_type, b"".join(resp_body)) if resp_body else None
            fields["prompt"] = prompt[:TEXT_LIMIT] if prompt is not None else None
            fields["completion"] = completion[:TEXT_LIMIT] if completion is not None else None
        fields = {k: v for k, v in fields.items() if v is not None}
        access_log.info(
            "%s %s %s %.0fms", scope["method"], scope["path"], status, duration * 1000, extra={"fields": fields}
        )
