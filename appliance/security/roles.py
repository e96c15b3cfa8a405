"""What each key role may do, and the one check handlers use.

- `admin`: everything — model load/unload, `/health?verbose=1`, `/metrics`, everyone's usage.
- `user`: inference, its own threads, memories and usage.
- `metrics`: only `/metrics` (the auth middleware answers 403 on every other path).

`request.state.role` is set by the auth middleware: the key's role; "admin" when no keys are configured
(a single-user loopback install); None on an open path (e.g. `/health`) called without a valid key.
"""

from __future__ import annotations

from starlette.requests import Request

from appliance.api.protocol.common import client_error


def role_of(request: Request) -> str | None:
    return getattr(request.state, "role", None)


def require_role(request: Request, *roles: str, param: str | None = None) -> str:
    """The caller's role if it is one of `roles`, else a 403 `forbidden` in the caller's dialect."""
    role = role_of(request)
    if role not in roles:
        who = "this request" if role is None else f"a '{role}' key"
        raise client_error(
            403, f"Not allowed for {who}: this needs a key with role {' or '.join(roles)}.", "forbidden", param
        )
    return role
