"""Usage records in the shared Postgres database (APPLIANCE_DATABASE_URL), for several boxes: the same
rows as `<data_dir>/usage.sqlite` (security/usage.py) in `appliance_usage`. Each node adds its pending
counts with one upsert per flush (`requests = appliance_usage.requests + excluded.requests`), so counts
from several nodes add up, never overwrite one another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.config import Settings
from appliance.db import redact
from appliance.security.usage import FLUSH_INTERVAL, UsageStore, _select

_UPSERT = """
INSERT INTO appliance_usage
    (day, key_id, model, key_name, requests, prompt_tokens, completion_tokens, embedding_inputs)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (day, key_id, model) DO UPDATE SET
    key_name = excluded.key_name,
    requests = appliance_usage.requests + excluded.requests,
    prompt_tokens = appliance_usage.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = appliance_usage.completion_tokens + excluded.completion_tokens,
    embedding_inputs = appliance_usage.embedding_inputs + excluded.embedding_inputs
"""


def _select_pg(conn: Any, since: str | None, key: str | None, key_id: str | None, daily: bool) -> list[dict]:
    return _select(conn, since, key, key_id, daily, ph="%s", table="appliance_usage", cast="::bigint")


class DbUsageStore(UsageStore):
    """UsageStore whose flushing thread writes to Postgres (one connection, opened on first use and again
    after an error)."""

    def __init__(self, url: str, interval: float = FLUSH_INTERVAL):
        super().__init__(Path("/dev/null"), interval)
        self.url = url

    @property
    def where(self) -> str:
        return redact(self.url)

    def _db(self) -> Any:
        if self._conn is None or self._conn.closed:
            from appliance.db.migrations import connect, upgrade

            upgrade(self.url, checkpoints=False)
            self._conn = connect(self.url)
        return self._conn

    def _write(self, rows: list[tuple]) -> None:
        conn = self._db()
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(_UPSERT, rows)
        except Exception:
            conn.close()  # reopened on the next try
            raise

    def _read(self, since: str | None, key: str | None, key_id: str | None, daily: bool) -> list[dict[str, Any]]:
        conn = self._db()
        try:
            with conn.transaction():
                return _select_pg(conn, since, key, key_id, daily)
        except Exception:
            conn.close()
            raise


def make_usage_store(settings: Settings) -> UsageStore:
    if settings.database_url:
        return DbUsageStore(settings.database_url)
    return UsageStore(settings.data_dir / "usage.sqlite")


def read_usage_db(
    url: str, since: str | None = None, key: str | None = None, daily: bool = False
) -> tuple[str, list[dict[str, Any]]]:
    """(where, rows) of the shared database, for `appliance usage`."""
    from appliance.db.migrations import connect, upgrade

    upgrade(url, checkpoints=False)
    with connect(url) as conn:
        return redact(url), _select_pg(conn, since, key, None, daily)
