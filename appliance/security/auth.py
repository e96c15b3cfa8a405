"""Bearer-key authentication as pure-ASGI middleware.

`Authorization: Bearer <key>` (OpenAI SDKs and Ollama clients both send it) is checked against the key
store in constant time. On `scope["state"]` it leaves:

- `principal`: the key's stable id (`key_…`): what threads, memories, limits and usage belong to;
- `key_name`: the key's name, for logs and metrics;
- `role`: `admin`, `user` or `metrics` (security/roles.py).

Missing or wrong keys get an OpenAI-shaped 401 (`code: "invalid_api_key"`). Roles are enforced here by
path where a path says it all: a `metrics` key may call only `/metrics`, and `/metrics` needs an admin or
metrics key (unless APPLIANCE_METRICS_PUBLIC); anything else → 403 `forbidden`. Handlers check the rest
(security/roles.py `require_role`). With no keys configured everything passes with principal None and role
"admin" (the server then only binds loopback unless --allow-unauthenticated). On an open path called
without a valid key, principal and role are None.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.api.errors import send_error
from appliance.engine.types import Error
from appliance.security.keys import KeyStore

# Paths served without a key: the health check, the OpenAPI document, and the web console's static files
# (the console asks for a key itself and sends it on its API calls).
OPEN_PATHS = {"/health", "/openapi.json", "/", "/favicon.ico", "/console"}
OPEN_PREFIXES = ("/console/",)


def is_open_path(path: str, metrics_public: bool = False) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or (metrics_public and path == "/metrics")


def role_allows(role: str, path: str, metrics_public: bool = False) -> bool:
    """The checks a path alone decides: `metrics` keys read only /metrics; /metrics needs admin or metrics."""
    if role == "metrics":
        return path == "/metrics"
    if path == "/metrics" and not metrics_public:
        return role == "admin"
    return True


def bearer_token(scope: Scope) -> str | None:
    for k, v in scope["headers"]:
        if k == b"authorization":
            scheme, _, token = v.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


class AuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        store: KeyStore,
        metrics_public: bool = False,
        on_failure: Callable[[str], None] | None = None,
    ):
        self.app = app
        self.store = store
        self.metrics_public = metrics_public
        self.on_failure = on_failure or (lambda reason: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        self.store.check_reload()
        state = scope.setdefault("state", {})
        token = bearer_token(scope)
        key = self.store.verify(token) if token else None
        path = scope["path"]
        if key is not None:
            state["principal"], state["key_name"], state["role"] = key.id, key.name, key.role
            if not role_allows(key.role, path, self.metrics_public):
                await self._forbidden(scope, receive, send, key.role, path)
                return
        elif not self.store.enabled:
            state["principal"], state["key_name"], state["role"] = None, None, "admin"
        elif not is_open_path(path, self.metrics_public):
            reason = "missing" if token is None else "invalid"
            self.on_failure(reason)
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            if token is None:
                message = "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            else:
                message = "Incorrect API key provided."
            err = Error(401, message, "invalid_request_error", "invalid_api_key")
            await send_error(scope, receive, send, err, {"WWW-Authenticate": 'Bearer realm="appliance"'})
            return
        else:
            state["principal"], state["key_name"], state["role"] = None, None, None
        await self.app(scope, receive, send)

    async def _forbidden(self, scope: Scope, receive: Receive, send: Send, role: str, path: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if role == "metrics":
            message = "A 'metrics' key may only read /metrics."
        else:
            message = f"A '{role}' key may not read {path}: it needs an 'admin' or 'metrics' key."
        await send_error(scope, receive, send, Error(403, message, "invalid_request_error", "forbidden"))
