"""The built-in web console: static HTML/CSS/JS shipped in the package, served at `/` and `/console/*`.

No build step, no framework, no CDN or external font: the console works fully offline. It talks to the
appliance's own API from the browser (same origin) and asks for an API key when a call answers 401,
keeping it in `sessionStorage` only. Every console response carries a strict CSP (no inline script or
style, connections to this origin only) and the usual hardening headers.

Caching: the asset URLs are not fingerprinted, so a long `max-age` would let a browser run an old
console.js against a new index.html (or API) after an upgrade. Everything is served `no-cache` instead:
the browser revalidates each time and gets a cheap 304 thanks to StaticFiles' ETag / Last-Modified.
"""

from __future__ import annotations

from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from appliance.api.errors import client_error, error_response

STATIC_DIR = Path(__file__).parent / "static"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
CACHE_CONTROL = "no-cache"  # revalidate every time (ETag/Last-Modified → 304); see the module docstring


class ConsoleFiles:
    """ASGI app serving files from STATIC_DIR (or always `index`), with the console's headers on every
    response, errors included."""

    def __init__(self, directory: Path = STATIC_DIR, index: str | None = None):
        self.static = StaticFiles(directory=directory, html=True)  # /console/ → index.html
        self.index = index

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        path = self.index or self.static.get_path(scope)
        response: Response
        try:
            response = await self.static.get_response(path, scope)
            response.headers["Cache-Control"] = CACHE_CONTROL
        except HTTPException as e:
            # the appliance's one error shape, here too ("Not Found", "Method Not Allowed")
            response = error_response(client_error(e.status_code, str(e.detail)).error, headers=e.headers)
        response.headers.update(SECURITY_HEADERS)
        await response(scope, receive, send)


async def favicon(request: Request) -> Response:
    """Browsers ask for /favicon.ico on their own; the page links its SVG icon, so answer with nothing."""
    return Response(status_code=204, headers={**SECURITY_HEADERS, "Cache-Control": "public, max-age=86400"})


routes: list[BaseRoute] = [
    Route("/", ConsoleFiles(index="index.html")),
    Route("/favicon.ico", favicon, methods=["GET"]),
    Mount("/console", app=ConsoleFiles()),
]
