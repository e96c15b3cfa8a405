"""Bearer-key authentication as pure-ASGI middleware.

`Authorization: Bearer <key>` (OpenAI SDKs and Ollama clients both send it) is checked against the key
store in constant time; the key's name becomes `scope["state"]["principal"]`. Missing or wrong keys get
an OpenAI-shaped 401 (`code: "invalid_api_key"`). With no keys configured the middleware lets everything
through (the server then only binds loopback unless --allow-unauthenticated).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.security.keys import KeyStore

# Paths served without a key: the health check, the OpenAPI document, and the web console's static files
# (the console asks for a key itself and sends it on its API calls).
OPEN_PATHS = {"/health", "/openapi.json", "/", "/favicon.ico", "/console"}
OPEN_PREFIXES = ("/console/",)


def is_open_path(path: str, metrics_public: bool = False) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or (metrics_public and path == "/metrics")


async def send_error(
    send: Send,
    status: int,
    message: str,
    type: str,
    code: str | None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


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
        if key is not None:
            state["principal"] = key.name
        elif self.store.enabled and not is_open_path(scope["path"], self.metrics_public):
            reason = "missing" if token is None else "invalid"
            self.on_failure(reason)
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            if token is None:
                message = "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            else:
                message = "Incorrect API key provided."
            await send_error(
                send,
                401,
                message,
                "invalid_request_error",
                "invalid_api_key",
                [(b"www-authenticate", b'Bearer realm="appliance"')],
            )
            return
        await self.app(scope, receive, send)
