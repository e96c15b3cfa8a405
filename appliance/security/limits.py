"""Per-key limits: requests per minute, tokens per minute, concurrent generation requests.

Sliding 60-second windows, kept in memory (one API process, so with several boxes each node counts on
its own, unless APPLIANCE_LIMITS_URL puts requests and tokens in Redis: security/limits_redis.py, through
the `limits` library). A request is admitted when its key has
request budget left, has not used up its token budget, and has a free stream; its tokens
(`request.state.prompt_tokens + completion_tokens`, set by the adapters) are counted when it ends, so a
key can overshoot its token budget by the requests it already has in flight. Embedding calls count like
generations (their prompt tokens, and a stream while they run). Over a limit → 429:

    {"error": {"message": ..., "type": "requests" | "tokens" | "streams", "param": null,
               "code": "rate_limit_exceeded"}}

with `Retry-After` and OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers (which
responses of limited keys always carry).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.api.errors import send_error
from appliance.engine.types import Error
from appliance.security.auth import is_open_path
from appliance.security.keys import KeyEntry, KeyStore

WINDOW = 60.0

# Requests that do model work (they hold a model or the embedder while they run, and spend tokens): POSTs
# to these paths or below them. They count against a key's token budget and concurrent streams.
GENERATION_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
)
# Prometheus gets a `key` label per key only while there are at most this many keys; beyond, "other".
MAX_KEY_LABELS = 100


def key_label(name: str, n_keys: int) -> str:
    return name if n_keys <= MAX_KEY_LABELS else "other"


def is_generation(method: str, path: str) -> bool:
    return method == "POST" and any(path == p or path.startswith(p + "/") for p in GENERATION_PATHS)


class Window:
    """Amounts used in the last WINDOW seconds."""

    __slots__ = ("events", "total")

    def __init__(self) -> None:
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0

    def prune(self, now: float) -> None:
        while self.events and self.events[0][0] <= now - WINDOW:
            self.total -= self.events.popleft()[1]

    def add(self, now: float, amount: int) -> None:
        if amount > 0:
            self.events.append((now, amount))
            self.total += amount

    def wait_until_below(self, now: float, limit: int) -> float:
        """Seconds until the used amount drops below `limit` (0 if it already is)."""
        total = self.total
        for t, amount in self.events:
            if total < limit:
                break
            total -= amount
            if total < limit:
                return max(0.0, t + WINDOW - now)
        return 0.0

    def wait_until_empty(self, now: float) -> float:
        return max(0.0, self.events[-1][0] + WINDOW - now) if self.events else 0.0


Rejection = tuple[str, str, float] | None  # (type, message, retry_after) of a 429, None when admitted


class Limiter(Protocol):
    async def admit(self, name: str, key: KeyEntry, generation: bool, display: str | None = None) -> Rejection: ...
    async def finish(self, name: str, generation: bool, tokens: int) -> None: ...
    async def aheaders(self, name: str, key: KeyEntry) -> list[tuple[bytes, bytes]]: ...


def _duration(seconds: float) -> str:
    """OpenAI's reset format: '1s', '6m0s', '0.5s'."""
    if seconds >= 60:
        m, s = divmod(seconds, 60)
        return f"{int(m)}m{s:.0f}s"
    return f"{seconds:.0f}s" if seconds >= 10 or seconds == int(seconds) else f"{seconds:.1f}s"


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.requests: dict[str, Window] = {}
        self.tokens: dict[str, Window] = {}
        self.streams: dict[str, int] = {}

    def _windows(self, name: str, now: float) -> tuple[Window, Window]:
        r = self.requests.setdefault(name, Window())
        t = self.tokens.setdefault(name, Window())
        r.prune(now)
        t.prune(now)
        return r, t

    def check(
        self, name: str, key: KeyEntry, generation: bool, display: str | None = None
    ) -> tuple[str, str, float] | None:
        """None if admitted, else (type, message, retry_after). `name`: the bucket (the key's id);
        `display`: how messages name the key (default `name`)."""
        now = self.clock()
        r, t = self._windows(name, now)
        bucket, name = name, display or name
        rpm, tpm, streams = key.requests_per_minute, key.tokens_per_minute, key.max_concurrent_streams
        if rpm is not None and len(r.events) >= rpm:
            return (
                "requests",
                f"Rate limit reached for key '{name}' on requests per minute: limit {rpm}, used {len(r.events)}.",
                r.wait_until_below(now, rpm),
            )
        if tpm is not None and generation and t.total >= tpm:
            return (
                "tokens",
                f"Rate limit reached for key '{name}' on tokens per minute: limit {tpm}, used {t.total}.",
                t.wait_until_below(now, tpm),
            )
        if streams is not None and generation and self.streams.get(bucket, 0) >= streams:
            return (
                "streams",
                f"Too many concurrent requests for key '{name}': limit {streams} at a time.",
                1.0,
            )
        return None

    def begin(self, name: str, generation: bool) -> None:
        now = self.clock()
        self.requests.setdefault(name, Window()).add(now, 1)
        if generation:
            self.streams[name] = self.streams.get(name, 0) + 1

    def end(self, name: str, generation: bool, tokens: int) -> None:
        if generation:
            self.streams[name] = max(0, self.streams.get(name, 0) - 1)
        self.tokens.setdefault(name, Window()).add(self.clock(), tokens)

    # The async interface the middleware uses (the Redis limiter implements the same three).

    async def admit(self, name: str, key: KeyEntry, generation: bool, display: str | None = None) -> Rejection:
        """check() and, when admitted, begin()."""
        rejected = self.check(name, key, generation, display)
        if rejected is None:
            self.begin(name, generation)
        return rejected

    async def finish(self, name: str, generation: bool, tokens: int) -> None:
        self.end(name, generation, tokens)

    async def aheaders(self, name: str, key: KeyEntry) -> list[tuple[bytes, bytes]]:
        return self.headers(name, key)

    def headers(self, name: str, key: KeyEntry) -> list[tuple[bytes, bytes]]:
        now = self.clock()
        r, t = self._windows(name, now)
        out: list[tuple[str, str]] = []
        if key.requests_per_minute is not None:
            out += [
                ("x-ratelimit-limit-requests", str(key.requests_per_minute)),
                ("x-ratelimit-remaining-requests", str(max(0, key.requests_per_minute - len(r.events)))),
                ("x-ratelimit-reset-requests", _duration(r.wait_until_empty(now))),
            ]
        if key.tokens_per_minute is not None:
            out += [
                ("x-ratelimit-limit-tokens", str(key.tokens_per_minute)),
                ("x-ratelimit-remaining-tokens", str(max(0, key.tokens_per_minute - t.total))),
                ("x-ratelimit-reset-tokens", _duration(t.wait_until_empty(now))),
            ]
        return [(k.encode(), v.encode()) for k, v in out]


class RateLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        store: KeyStore,
        limiter: Limiter | None = None,
        on_limited: Callable[[str, str], None] | None = None,
    ):
        self.app = app
        self.store = store
        self.limiter = limiter or RateLimiter()
        self.on_limited = on_limited or (lambda key, kind: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get("state", {}) if scope["type"] == "http" else {}
        name, key_id = state.get("key_name"), state.get("principal")
        key = self.store.get(name) if name else None
        if not key_id or key is None or not key.limited or is_open_path(scope["path"], True):
            await self.app(scope, receive, send)
            return
        lim = self.limiter
        generation = is_generation(scope["method"], scope["path"])
        # Windows are kept per key id: a name revoked and added again starts afresh.
        rejected = await lim.admit(key_id, key, generation, name)
        if rejected is not None:
            kind, message, retry_after = rejected
            self.on_limited(key_label(name, len(self.store)), kind)
            headers = {k.decode(): v.decode() for k, v in await lim.aheaders(key_id, key)}
            err = Error(429, message, kind, "rate_limit_exceeded", retry_after=retry_after)
            await send_error(scope, receive, send, err, headers)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *await lim.aheaders(key_id, key)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            tokens = (state.get("prompt_tokens") or 0) + (state.get("completion_tokens") or 0)
            await lim.finish(key_id, generation, tokens)
