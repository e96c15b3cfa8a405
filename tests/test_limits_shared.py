"""The Redis-backed per-key limiter (security/limits_redis.py) without Redis: when its server cannot be
reached, requests are admitted and the headers are left out (limits protect the service, they do not stop
it). With Redis, tests/test_cluster.py checks a limit across two nodes."""

from __future__ import annotations

import logging

import pytest

from appliance.config import Settings
from appliance.security.keys import KeyEntry
from appliance.security.limits_redis import RedisLimiter
from tests.conftest import free_port


async def test_unreachable_redis_admits_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    lim = RedisLimiter(f"redis://127.0.0.1:{free_port()}")
    key = KeyEntry(sha256="0" * 64, requests_per_minute=1, tokens_per_minute=5, max_concurrent_streams=1)
    with caplog.at_level(logging.ERROR, logger="appliance.security"):
        assert await lim.admit("key_x", key, generation=False) is None
        assert await lim.admit("key_x", key, generation=False) is None  # rpm 1, but nothing to count in
        assert await lim.aheaders("key_x", key) == []
        await lim.finish("key_x", False, 100)
    assert len([r for r in caplog.records if "Redis unreachable" in r.message]) == 1
    # Streams are per node and need no Redis: the second concurrent generation is refused.
    assert await lim.admit("key_x", key, generation=True) is None
    rejected = await lim.admit("key_x", key, generation=True)
    assert rejected is not None and rejected[0] == "streams"
    await lim.finish("key_x", True, 0)
    assert await lim.admit("key_x", key, generation=True) is None


def test_shared_settings_take_only_their_schemes(tmp_path) -> None:
    ok = Settings(
        data_dir=tmp_path,
        database_url="postgresql://u:p@db/app",
        memory_url="http://chroma:8000",
        limits_url="redis://cache:6379/0",
    )
    assert ok.threads_db_url == "postgresql://u:p@db/app"  # threads follow the database unless set
    assert Settings(data_dir=tmp_path, database_url="", threads_url="postgres://x/y").threads_db_url == "postgres://x/y"
    for field, bad in (("database_url", "mysql://x"), ("memory_url", "chroma:8000"), ("limits_url", "http://r")):
        with pytest.raises(ValueError, match="URL"):
            Settings(data_dir=tmp_path, **{field: bad})
    from appliance.db import redact

    assert redact("postgresql://u:secret@db:5432/app") == "postgresql://u:***@db:5432/app"
    assert redact("postgresql://db/app") == "postgresql://db/app"
