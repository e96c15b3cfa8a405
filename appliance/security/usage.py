"""Usage accounting: requests, prompt and completion tokens and embedding inputs per key, model and UTC day.

Persisted in `<data_dir>/usage.sqlite` (WAL), one row per (day, key id, model), so it survives restarts
and stays small. Recording is a dict update on the event loop (`UsageMiddleware`, from what the handlers
leave on `scope["state"]`: `model`, `prompt_tokens`, `completion_tokens`, `embedding_inputs`); a
background thread adds the counts to the database about once a second, so no sqlite write ever runs on
the event loop. Closing flushes what is left.

Read with `GET /v1/usage` (a user key sees its own rows, an admin everyone's) or `appliance usage`
(security/usage_cli.py).
Several boxes keep the rows in the shared Postgres database instead (APPLIANCE_DATABASE_URL,
security/usage_db.py): each node adds its counts to the same rows, and any node reads everyone's.
Requests made without keys (a loopback install with none configured) are recorded with key id null.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.api.protocol import usage as wire
from appliance.api.protocol.common import client_error
from appliance.api.sse import json_response
from appliance.security.roles import require_role

log = logging.getLogger("appliance.usage")

FLUSH_INTERVAL = 1.0
BUSY_TIMEOUT_MS = 5000
NO_KEY = ""  # the key id column for requests made without keys
COUNTS = ("requests", "prompt_tokens", "completion_tokens", "embedding_inputs")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    key_name TEXT NOT NULL DEFAULT '',
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    embedding_inputs INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, key_id, model)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_by_key ON usage (key_id, day);
"""

_UPSERT = """
INSERT INTO usage (day, key_id, model, key_name, requests, prompt_tokens, completion_tokens, embedding_inputs)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, key_id, model) DO UPDATE SET
    key_name = excluded.key_name,
    requests = requests + excluded.requests,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    embedding_inputs = embedding_inputs + excluded.embedding_inputs
"""


def utc_day(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d")


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    if not readonly:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
    return conn


def _select(conn: Any, since: str | None, key: str | None, key_id: str | None, daily: bool, **db: str) -> list[dict]:
    """Rows per (day,) key and model, oldest day first. `key_id`: only that key; `key`: a name or an id.
    `db`: `ph`, `table`, `cast`: the placeholder, table and SUM cast of Postgres (default SQLite's)."""
    ph, table, cast = db.get("ph", "?"), db.get("table", "usage"), db.get("cast", "")
    where, args = [], []
    if since is not None:
        where.append(f"day >= {ph}")
        args.append(since)
    if key_id is not None:
        where.append(f"key_id = {ph}")
        args.append(key_id)
    if key is not None:
        where.append(f"(key_id = {ph} OR key_name = {ph})")
        args += [key, key]
    group = "day, key_id, model" if daily else "key_id, model"
    sums = ", ".join(f"SUM({c}){cast}" for c in COUNTS)
    sql = (
        f"SELECT {'day' if daily else 'MIN(day)'}, key_id, model, MAX(key_name), {sums} FROM {table}"
        f"{' WHERE ' + ' AND '.join(where) if where else ''} GROUP BY {group} ORDER BY {group}"
    )
    out = []
    for day, kid, model, name, req, pt, ct, ei in conn.execute(sql, args):
        out.append(
            {
                "day": day,
                "key_id": kid or None,
                "key_name": name or None,
                "model": model,
                "requests": req,
                "prompt_tokens": pt,
                "completion_tokens": ct,
                "total_tokens": pt + ct,
                "embedding_inputs": ei,
            }
        )
    return out


def totals(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    t = dict.fromkeys((*COUNTS, "total_tokens"), 0)
    for r in rows:
        for k in t:
            t[k] += r[k]
    return t


class UsageStore:
    """Counts recorded on the event loop, added to SQLite by a background thread."""

    def __init__(self, path: Path, interval: float = FLUSH_INTERVAL):
        self.path = path
        self.interval = interval
        self._pending: dict[tuple[str, str, str], list[Any]] = {}  # (day, key id, model) → [name, *counts]
        self._lock = threading.Lock()  # _pending
        self._db_lock = threading.Lock()  # the connection
        self._conn: sqlite3.Connection | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the flushing thread (it opens the database)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="usage-flush", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def close(self) -> None:
        """Stop the thread, write what is pending, close the database (blocking: call off the loop)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.flush()
        with self._db_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    # -- writing ---------------------------------------------------------------------------------

    def record(
        self,
        key_id: str | None,
        key_name: str | None,
        model: str,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        embedding_inputs: int = 0,
        day: str | None = None,
    ) -> None:
        """Count one request (cheap: a dict update; safe on the event loop)."""
        k = (day or utc_day(), key_id or NO_KEY, model)
        with self._lock:
            row = self._pending.get(k)
            if row is None:
                row = self._pending[k] = [key_name or "", 0, 0, 0, 0]
            row[0] = key_name or row[0]
            row[1] += 1
            row[2] += max(0, int(prompt_tokens))
            row[3] += max(0, int(completion_tokens))
            row[4] += max(0, int(embedding_inputs))

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = _connect(self.path)
        return self._conn

    def flush(self) -> None:
        """Add the pending counts to the database in one transaction (blocking: call off the loop)."""
        with self._db_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
            if not pending:
                return
            try:
                self._write([(*k, *v) for k, v in pending.items()])
            except Exception:
                log.exception("usage: could not write to %s; keeping the counts for the next try", self.where)
                with self._lock:
                    for k, v in pending.items():
                        row = self._pending.setdefault(k, [v[0], 0, 0, 0, 0])
                        for i in range(1, 5):
                            row[i] += v[i]

    @property
    def where(self) -> str:
        return str(self.path)

    def _write(self, rows: list[tuple]) -> None:
        """Add rows (day, key id, model, name, *counts) in one transaction (under _db_lock)."""
        conn = self._db()
        with contextlib.closing(conn.cursor()) as cur:
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.executemany(_UPSERT, rows)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def _read(self, since: str | None, key: str | None, key_id: str | None, daily: bool) -> list[dict[str, Any]]:
        return _select(self._db(), since, key, key_id, daily)

    # -- reading ---------------------------------------------------------------------------------

    def query(
        self, since: str | None = None, key: str | None = None, key_id: str | None = None, daily: bool = True
    ) -> list[dict[str, Any]]:
        """Rows, pending counts included (blocking: call off the loop)."""
        self.flush()
        with self._db_lock:
            return self._read(since, key, key_id, daily)


def read_usage(
    path: Path, since: str | None = None, key: str | None = None, daily: bool = False
) -> list[dict[str, Any]]:
    """The rows of a usage database, read-only (the server may be writing it)."""
    if not path.is_file():
        return []
    conn = _connect(path, readonly=True)
    try:
        return _select(conn, since, key, None, daily)
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []
        raise
    finally:
        conn.close()


# -- the middleware that records -----------------------------------------------------------------


class UsageMiddleware:
    """Record each request that used a model (the handler left `model` on the state) when it has finished."""

    def __init__(self, app: ASGIApp, store: UsageStore):
        self.app = app
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            st = scope.get("state") or {}
            model = st.get("model")
            if model:
                self.store.record(
                    st.get("principal"),
                    st.get("key_name"),
                    str(model),
                    st.get("prompt_tokens") or 0,
                    st.get("completion_tokens") or 0,
                    st.get("embedding_inputs") or 0,
                )


# -- GET /v1/usage -------------------------------------------------------------------------------


async def usage_endpoint(request: Request) -> Response:
    """Usage per UTC day, key and model. A user key sees its own rows (`key` may only name itself); an admin
    sees everyone's, or one key's with `?key=NAME|ID`; `?key=me` is the caller's own, for any role.
    `?since=YYYY-MM-DD` starts at that day."""
    q = wire.UsageQuery.of(request.query_params)
    role = require_role(request, "admin", "user")
    store: UsageStore = request.app.state.usage
    key_id = None
    principal = getattr(request.state, "principal", None)
    if q.key == "me":  # the caller's own usage, whatever its role (the console's status panel)
        key_id, q.key = principal, None
    elif role != "admin":
        if q.key is not None and q.key not in (principal, getattr(request.state, "key_name", None)):
            raise client_error(403, "This API key may only read its own usage.", "forbidden", "key")
        key_id = principal
    rows = await asyncio.to_thread(store.query, q.since, None if key_id else q.key, key_id)
    data = [wire.UsageRow(**r) for r in rows]
    return json_response(wire.UsageList(since=q.since, data=data, totals=wire.UsageTotals(**totals(rows))))


routes = [Route("/v1/usage", usage_endpoint, methods=["GET"])]
