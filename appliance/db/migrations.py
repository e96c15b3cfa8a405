"""The shared schema, versioned: a list of migrations, each applied once, in order, in its own transaction.

`upgrade(url)` takes a Postgres advisory lock (session-level, on a connection of its own) before it reads
the applied versions, so two nodes starting at once (or two `appliance db upgrade` runs) apply each
migration exactly once: the second waits for the first, then finds nothing left to do. It waits by polling
`pg_try_advisory_lock`, never inside a blocking statement: LangGraph's setup runs CREATE INDEX
CONCURRENTLY, which waits for every open snapshot, a waiter's blocked `pg_advisory_lock()` included (a
deadlock Postgres does not detect). It also runs
LangGraph's own checkpointer migrations (`PostgresSaver.setup()`, versioned in `checkpoint_migrations`)
under the same lock. Every node runs it when it opens the database; `appliance db upgrade` runs it by hand.

Migrations are append-only: never edit one that has shipped; add the next version.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from appliance.db import redact

log = logging.getLogger("appliance.db")

# pg_advisory_lock key of schema upgrades: "applianc" as a big-endian int64.
LOCK_KEY = int.from_bytes(b"applianc", "big")
CONNECT_TIMEOUT = 10  # seconds
LOCK_TIMEOUT = 300.0  # seconds to wait for another node's upgrade
LOCK_POLL = 0.1


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "threads, API keys and usage",
        """
        CREATE TABLE appliance_threads (
            id TEXT PRIMARY KEY,
            scope TEXT NOT NULL,
            model TEXT NOT NULL,
            title TEXT NOT NULL DEFAULT '',
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX appliance_threads_by_update ON appliance_threads (updated_at DESC, id DESC);
        CREATE INDEX appliance_threads_by_scope ON appliance_threads (scope, updated_at DESC, id DESC);
        CREATE TABLE appliance_keys (
            name TEXT PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            sha256 TEXT NOT NULL UNIQUE,
            role TEXT NOT NULL,
            prefix TEXT NOT NULL DEFAULT '',
            created TEXT NOT NULL DEFAULT '',
            requests_per_minute INTEGER,
            tokens_per_minute INTEGER,
            max_concurrent_streams INTEGER
        );
        CREATE TABLE appliance_usage (
            day TEXT NOT NULL,
            key_id TEXT NOT NULL,
            model TEXT NOT NULL,
            key_name TEXT NOT NULL DEFAULT '',
            requests BIGINT NOT NULL DEFAULT 0,
            prompt_tokens BIGINT NOT NULL DEFAULT 0,
            completion_tokens BIGINT NOT NULL DEFAULT 0,
            embedding_inputs BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (day, key_id, model)
        );
        CREATE INDEX appliance_usage_by_key ON appliance_usage (key_id, day);
        """,
    ),
    Migration(
        2,
        "stored Responses API responses",
        """
        CREATE TABLE appliance_responses (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            created DOUBLE PRECISION NOT NULL,
            body TEXT NOT NULL,
            context TEXT NOT NULL,
            input TEXT NOT NULL
        );
        CREATE INDEX appliance_responses_by_owner ON appliance_responses (owner, created DESC);
        """,
    ),
)

_VERSIONS = """
CREATE TABLE IF NOT EXISTS appliance_schema (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


def connect(url: str, **kwargs: Any) -> Any:
    """A psycopg connection (ConfigError-free: the caller reports psycopg.OperationalError)."""
    import psycopg

    return psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT, **kwargs)


def applied(conn: Any) -> list[int]:
    """The versions applied to the database of `conn` (none if it was never upgraded)."""
    row = conn.execute("SELECT to_regclass('appliance_schema')").fetchone()
    if row is None or row[0] is None:
        return []
    return [r[0] for r in conn.execute("SELECT version FROM appliance_schema ORDER BY version")]


def latest() -> int:
    return MIGRATIONS[-1].version


def upgrade(url: str, checkpoints: bool = True) -> list[int]:
    """Apply the migrations the database lacks (and, with `checkpoints`, LangGraph's). Returns the versions
    applied now (empty when it was up to date). Safe to run from several processes at once."""
    with connect(url, autocommit=True) as conn:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while not conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"database {redact(url)}: another schema upgrade held the lock {LOCK_TIMEOUT:.0f} s")
            time.sleep(LOCK_POLL)
        try:
            conn.execute(_VERSIONS)
            done = set(applied(conn))
            if done and max(done) > latest():
                log.warning(
                    "database %s has schema version %d, newer than this appliance's %d: upgrade this node",
                    redact(url),
                    max(done),
                    latest(),
                )
            now: list[int] = []
            for m in MIGRATIONS:
                if m.version in done:
                    continue
                with conn.transaction():
                    conn.execute(m.sql)
                    conn.execute("INSERT INTO appliance_schema (version, name) VALUES (%s, %s)", (m.version, m.name))
                now.append(m.version)
                log.info("database %s: applied migration %d (%s)", redact(url), m.version, m.name)
            if checkpoints:
                _checkpointer_setup(url)
            return now
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


def _checkpointer_setup(url: str) -> None:
    """LangGraph's Postgres checkpointer tables (its own versioned migrations)."""
    from langgraph.checkpoint.postgres import PostgresSaver
    from psycopg.rows import dict_row

    with connect(url, autocommit=True, prepare_threshold=0, row_factory=dict_row) as conn:
        PostgresSaver(conn).setup()
