"""Access log and HTTP metrics: one pure-ASGI middleware, one JSON line per request when it has finished.

The line (logger `appliance.access`) carries the request id, key name, method, route template, path,
model, backend, status, token counts, TTFT and duration — never headers, keys, prompts or completions.
Only with APPLIANCE_LOG_PROMPTS=true does it add `prompt` and `completion` text (truncated), for debugging:
the handlers leave them on the request's state from the internal request and events (api/streaming.py);
nothing here parses the bytes that were sent.

The `client` field is the direct peer's address, or, when that peer is a trusted proxy
(APPLIANCE_TRUSTED_PROXIES, default loopback: nginx on the same host), the right-most address in
`X-Forwarded-For` that is not itself a trusted proxy. From any other peer the header is ignored, so a
client cannot put someone else's address in the log.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterable
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


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_TRUSTED_PROXIES = ("127.0.0.1", "::1")


def _parse_ip(text: str) -> IPAddress | None:
    """An address from a peer or an X-Forwarded-For entry (`1.2.3.4`, `::1`, `[::1]:80`, `1.2.3.4:80`)."""
    text = text.strip()
    if text.startswith("["):  # [v6]:port
        text = text[1 : text.find("]")] if "]" in text else text
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])  # no zone ids
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack socket's ::ffff:127.0.0.1 is 127.0.0.1
    return ip


class ClientAddress:
    """Who the client is, given the direct peer and the trusted proxies in front of the app."""

    def __init__(self, trusted_proxies: Iterable[str] = DEFAULT_TRUSTED_PROXIES):
        self.networks: list[IPNetwork] = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]

    def trusted(self, ip: IPAddress | None) -> bool:
        return ip is not None and any(ip.version == n.version and ip in n for n in self.networks)

    def __call__(self, scope: Scope) -> str | None:
        client = scope.get("client")
        peer = client[0] if client else None
        if not peer or not self.networks:
            return peer
        hop = _parse_ip(peer)
        if not self.trusted(hop):
            return peer  # a direct client: whatever it says in X-Forwarded-For is ignored
        entries: list[str] = []
        for name, value in scope.get("headers") or ():
            if name == b"x-forwarded-for":
                entries += value.decode("latin-1").split(",")
        # Right to left: each trusted hop vouches for the entry on its left; the first address that is not
        # a trusted proxy is the client. Entries further left were written by that client: not believed.
        for entry in reversed(entries):
            ip = _parse_ip(entry)
            if ip is None:
                break  # garbage where a trusted hop should have written an address: stop at that hop
            hop = ip
            if not self.trusted(ip):
                break
        return str(hop)


class AccessMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics | None = None,
        log_prompts: bool = False,
        trusted_proxies: Iterable[str] = DEFAULT_TRUSTED_PROXIES,
    ):
        self.app = app
        self.metrics = metrics
        self.log_prompts = log_prompts
        self.client_address = ClientAddress(trusted_proxies)

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
        fields: dict[str, Any] = {
            "request_id": st.get("request_id"),
            "key_name": st.get("key_name"),
            "client": self.client_address(scope),
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
