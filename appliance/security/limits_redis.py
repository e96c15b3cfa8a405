"""Per-key limits shared by several boxes (APPLIANCE_LIMITS_URL=redis://…), through the `limits` library
with its Redis storage, not a limiter of our own:

- requests per minute: a moving window (`MovingWindowRateLimiter`): an exact 60-second sliding window,
  checked and counted in one atomic step on the Redis server, so two nodes cannot both take the last one;
- tokens per minute: a fixed one-minute window (`FixedWindowRateLimiter`): a request is admitted while the
  key has used less than its budget this minute, and its tokens are added when it ends, overshoot
  included (a moving window would refuse to record what exceeds the limit);
- concurrent streams stay per node (a crashed node must not leave streams counted for ever).

The headers and 429 bodies are the same as the in-memory limiter's (security/limits.py). If Redis cannot
be reached, requests are admitted (and the error logged at most every 30 s): the limits are protection,
not a reason to stop serving. Redis calls time out after 1 s without retries, and after a failure Redis
is left alone for `BACKOFF` seconds, so an outage costs requests no waiting.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from appliance.security.keys import KeyEntry
from appliance.security.limits import Rejection, _duration

log = logging.getLogger("appliance.security")

LOG_EVERY = 30.0  # seconds between logged Redis errors
BACKOFF = 5.0  # seconds Redis is not asked after a failure
TIMEOUT = 1.0  # seconds to connect to Redis, and for one command


class RedisLimiter:
    def __init__(self, url: str):
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        storage = RedisStorage(
            "async+" + url,
            implementation="redispy",
            socket_connect_timeout=TIMEOUT,
            socket_timeout=TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        self.requests = MovingWindowRateLimiter(storage)
        self.tokens = FixedWindowRateLimiter(storage)
        self.storage = storage
        self.streams: dict[str, int] = {}  # per node
        self._tpm: dict[str, Any] = {}  # key id → its token item at admission (the item's amount is in its key)
        self._logged = 0.0
        self._down_until = 0.0  # monotonic time until which Redis is not asked (after a failure)

    @staticmethod
    def _items(key: KeyEntry) -> tuple[Any, Any]:
        from limits import RateLimitItemPerMinute

        r, t = key.requests_per_minute, key.tokens_per_minute
        rpm = RateLimitItemPerMinute(r, namespace="appliance-rpm") if r else None
        tpm = RateLimitItemPerMinute(t, namespace="appliance-tpm") if t else None
        return rpm, tpm

    def _up(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, e: Exception) -> None:
        now = time.monotonic()
        self._down_until = now + BACKOFF
        if now - self._logged >= LOG_EVERY:
            self._logged = now
            log.error("limits: Redis unreachable, admitting requests unlimited meanwhile: %s", e)

    async def admit(self, name: str, key: KeyEntry, generation: bool, display: str | None = None) -> Rejection:
        rpm, tpm = self._items(key)
        shown = display or name
        if tpm is not None:
            self._tpm[name] = tpm
        streams = key.max_concurrent_streams  # per node: checked without Redis
        if streams is not None and generation and self.streams.get(name, 0) >= streams:
            return ("streams", f"Too many concurrent requests for key '{shown}': limit {streams} at a time.", 1.0)
        try:
            if not self._up():
                pass  # Redis failed a moment ago: admit
            elif tpm is not None and generation and not await self.tokens.test(tpm, name):
                stats = await self.tokens.get_window_stats(tpm, name)
                used = tpm.amount - stats.remaining
                return (
                    "tokens",
                    f"Rate limit reached for key '{shown}' on tokens per minute: limit {tpm.amount}, used {used}+.",
                    max(0.0, stats.reset_time - time.time()),
                )
            if rpm is not None and self._up() and not await self.requests.hit(rpm, name):
                stats = await self.requests.get_window_stats(rpm, name)
                return (
                    "requests",
                    f"Rate limit reached for key '{shown}' on requests per minute: limit {rpm.amount}, "
                    f"used {rpm.amount - stats.remaining}.",
                    max(0.0, stats.reset_time - time.time()),
                )
        except Exception as e:  # Redis down: serve unlimited rather than not at all
            self._failed(e)
        if generation:
            self.streams[name] = self.streams.get(name, 0) + 1
        return None

    async def finish(self, name: str, generation: bool, tokens: int) -> None:
        if generation:
            self.streams[name] = max(0, self.streams.get(name, 0) - 1)
        tpm = self._tpm.get(name)
        if tokens <= 0 or tpm is None or not self._up():
            return
        try:
            await self.tokens.hit(tpm, name, cost=tokens)  # counted even past the limit (fixed window: INCRBY)
        except Exception as e:
            self._failed(e)

    async def aheaders(self, name: str, key: KeyEntry) -> list[tuple[bytes, bytes]]:
        rpm, tpm = self._items(key)
        out: list[tuple[str, str]] = []
        now = time.time()
        if not self._up():
            return []
        try:
            for kind, item, lim in (("requests", rpm, self.requests), ("tokens", tpm, self.tokens)):
                if item is None:
                    continue
                stats = await lim.get_window_stats(item, name)
                out += [
                    (f"x-ratelimit-limit-{kind}", str(item.amount)),
                    (f"x-ratelimit-remaining-{kind}", str(max(0, stats.remaining))),
                    (f"x-ratelimit-reset-{kind}", _duration(max(0.0, stats.reset_time - now))),
                ]
        except Exception as e:
            self._failed(e)
            return []
        return [(k.encode(), v.encode()) for k, v in out]
