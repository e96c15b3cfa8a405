"""GET /health: ok/loading/failed for load balancers and systemd; `verbose=1` shows each model's backends.

Who sees the verbose view (model paths, worker pids, load errors, backend URLs): with keys configured,
only an admin key. Without a key (or with an invalid one: /health is an open path) `verbose` is ignored
and the answer is the plain status, so probes never break; a valid non-admin key asking for it gets
403 `forbidden`. With no keys configured (a loopback install) everyone is admin and sees it.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance.api.protocol import health as wire
from appliance.api.sse import json_response
from appliance.backends.base import BackendState
from appliance.engine.router import Engine
from appliance.security.roles import require_role


async def health(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    q = wire.HealthQuery.of(request.query_params)
    if engine.ready:
        status, code = "ok", 200
    else:
        failed = all(b.status().state is BackendState.FAILED for b in engine.registry.default.backends)
        status, code = ("failed" if failed else "loading"), 503
    doc = wire.Health(status=status)
    role = getattr(request.state, "role", None)  # None: no valid key (security/auth.py)
    if q.detailed and role is not None:
        require_role(request, "admin", param="verbose")
        doc.default_model = engine.registry.default.id
        doc.models = [
            wire.ModelHealth(
                id=m.id,
                aliases=m.aliases,
                kind=m.kind,
                backends=[{**b.status().as_dict(), "circuit": engine.breaker(b).describe()} for b in m.backends],
            )
            for m in engine.registry
        ]
    return json_response(doc, status=code)


routes = [Route("/health", health, methods=["GET"])]
