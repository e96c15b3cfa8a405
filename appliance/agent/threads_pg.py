"""Conversation threads in Postgres (APPLIANCE_THREADS_URL, else APPLIANCE_DATABASE_URL), shared by every
node: LangGraph's AsyncPostgresSaver over a psycopg connection pool, plus the `appliance_threads` metadata
table (owner, model, title, times) of the shared schema (appliance/db/migrations.py).

The same contract as the SQLite store (agent/threads.py): namespaced ids, most-recent-first listing with a
cursor, and pruning after every completed run down to the thread's latest checkpoint. Postgres keeps
channel values in `checkpoint_blobs` by version, so pruning also drops the blobs the latest checkpoint no
longer points at (its `channel_versions`). A thread started on one node continues on any other: every
node reads the same rows.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

from appliance.agent.threads import ThreadMeta, ThreadStore, ThreadStoreLike, free_id, stored_id
from appliance.config import Settings
from appliance.db import redact

log = logging.getLogger("appliance.agent")
POOL_MIN, POOL_MAX = 1, 10
CHECKPOINT_TABLES = ("checkpoints", "checkpoint_blobs", "checkpoint_writes")
_COLS = "id, scope, model, title, created_at, updated_at"


def make_thread_store(settings: Settings) -> ThreadStoreLike:
    """Postgres when APPLIANCE_THREADS_URL (or APPLIANCE_DATABASE_URL) is set, else SQLite in the data dir."""
    url = settings.threads_db_url
    if url:
        return PostgresThreadStore(url)
    return ThreadStore(settings.data_dir / "agent" / "threads.sqlite")


class PostgresThreadStore:
    def __init__(self, url: str, pool_max: int = POOL_MAX):
        self.url = url
        self.pool_max = pool_max
        self.pool: Any = None
        self.saver: Any = None
        self._claims: Any = None  # one connection holding this node's thread locks (session advisory locks)
        self._claims_lock = asyncio.Lock()
        self._releases: set[asyncio.Task] = set()

    @property
    def where(self) -> str:
        return redact(self.url)

    async def open(self) -> None:
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
        from psycopg.rows import dict_row
        from psycopg_pool import AsyncConnectionPool

        from appliance.db.migrations import upgrade

        await asyncio.to_thread(upgrade, self.url)  # the schema and LangGraph's tables, under a lock
        pool = AsyncConnectionPool(
            self.url,
            min_size=POOL_MIN,
            max_size=self.pool_max,
            open=False,
            kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
        )
        await pool.open(wait=True, timeout=30)
        self.pool, self.saver = pool, AsyncPostgresSaver(pool)

    async def close(self) -> None:
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        if self._claims is not None:
            claims, self._claims = self._claims, None
            await claims.close()  # a session's advisory locks end with it
        if self.pool is not None:
            pool, self.pool = self.pool, None
            await pool.close()

    # -- a turn at a time per thread, across nodes ---------------------------------------------------------
    # A session-level advisory lock per running thread, all on one connection of this node's: a node that
    # dies (or loses that connection) releases its threads with it, so nothing stays "busy" after a crash.

    @staticmethod
    def _lock_key(thread_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(thread_id.encode(), digest_size=8).digest(), "big", signed=True)

    async def _locked(self, sql: str, thread_id: str) -> bool:
        from psycopg import AsyncConnection

        async with self._claims_lock:
            if self._claims is None or self._claims.closed:
                self._claims = await AsyncConnection.connect(self.url, autocommit=True, connect_timeout=10)
            try:
                cur = await self._claims.execute(sql, (self._lock_key(thread_id),))
                row = await cur.fetchone()
            except Exception:
                await self._claims.close()  # its locks go with it; the next claim reconnects
                raise
            return bool(row and row[0])

    async def claim(self, thread_id: str) -> bool:
        return await self._locked("SELECT pg_try_advisory_lock(%s)", thread_id)

    async def release(self, thread_id: str) -> None:
        async def unlock() -> None:
            try:
                await self._locked("SELECT pg_advisory_unlock(%s)", thread_id)
            except Exception as e:  # the connection is closed by now, and the lock with it
                log.warning("thread %s: unlocking failed (%s); its lock ended with the connection", thread_id, e)

        task = asyncio.get_running_loop().create_task(unlock())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        await asyncio.shield(task)  # a cancelled turn stops waiting here; the unlock still runs

    async def _rows(self, sql: str, args: tuple | list = ()) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, args)
            return list(await cur.fetchall())

    async def _exec(self, sql: str, args: tuple | list = ()) -> int:
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, args)
            return cur.rowcount

    @staticmethod
    def _meta(row: dict[str, Any]) -> ThreadMeta:
        return ThreadMeta(
            row["id"], row["scope"], row["model"], row["title"], float(row["created_at"]), float(row["updated_at"])
        )

    # -- metadata ----------------------------------------------------------------------------------

    async def get(self, thread_id: str) -> ThreadMeta | None:
        rows = await self._rows(f"SELECT {_COLS} FROM appliance_threads WHERE id = %s", (thread_id,))
        return self._meta(rows[0]) if rows else None

    async def find(self, thread_id: str, scope: str | None) -> ThreadMeta | None:
        if scope is not None:
            return await self.get(stored_id(scope, thread_id))
        suffix = ":" + thread_id
        rows = await self._rows(
            f"SELECT {_COLS} FROM appliance_threads WHERE id = %s OR right(id, %s) = %s"
            " ORDER BY updated_at DESC LIMIT 1",
            (thread_id, len(suffix), suffix),
        )
        return self._meta(rows[0]) if rows else None

    async def create(self, thread_id: str, scope: str, model: str, title: str, limit: int = 0) -> bool:
        now = time.time()
        async with self.pool.connection() as conn:  # one transaction: the scope's lock, the count, the insert
            if limit:
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"appliance_threads:{scope}",))
                cur = await conn.execute("SELECT count(*) AS n FROM appliance_threads WHERE scope = %s", (scope,))
                row = await cur.fetchone()
                if row is not None and row["n"] >= limit:
                    return False
            await conn.execute(
                "INSERT INTO appliance_threads (id, scope, model, title, created_at, updated_at)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                (thread_id, scope, model, title, now, now),
            )
        return True

    async def touch(self, thread_id: str, model: str | None = None) -> None:
        await self._exec(
            "UPDATE appliance_threads SET updated_at = %s, model = COALESCE(%s, model) WHERE id = %s",
            (time.time(), model, thread_id),
        )

    async def list(self, scope: str | None, limit: int, after: str | None = None) -> tuple[list[ThreadMeta], bool]:
        where: list[str] = []
        args: list[Any] = []
        if scope is not None:
            where.append("scope = %s")
            args.append(scope)
        if after is not None:
            cursor = await self.find(after, scope)
            if cursor is None or (scope is not None and cursor.scope != scope):
                raise KeyError(after)
            where.append("(updated_at < %s OR (updated_at = %s AND id < %s))")
            args += [cursor.updated_at, cursor.updated_at, cursor.id]
        sql = f"SELECT {_COLS} FROM appliance_threads"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY updated_at DESC, id DESC LIMIT %s"
        rows = await self._rows(sql, (*args, limit + 1))
        return [self._meta(r) for r in rows[:limit]], len(rows) > limit

    async def count(self, scope: str) -> int:
        rows = await self._rows("SELECT COUNT(*) AS n FROM appliance_threads WHERE scope = %s", (scope,))
        return int(rows[0]["n"]) if rows else 0

    async def scope_counts(self) -> dict[str, int]:
        rows = await self._rows("SELECT scope, COUNT(*) AS n FROM appliance_threads GROUP BY scope")
        return {r["scope"]: int(r["n"]) for r in rows}

    async def prune(self, thread_id: str) -> int:
        """Keep the thread's latest checkpoint, its writes and the blobs it points at; delete the rest."""
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT checkpoint_id FROM checkpoints WHERE thread_id = %s AND checkpoint_ns = ''"
                " ORDER BY checkpoint_id DESC LIMIT 1",
                (thread_id,),
            )
            row = await cur.fetchone()
            if row is None:
                return 0
            latest = row["checkpoint_id"]
            cur = await conn.execute(
                "DELETE FROM checkpoints WHERE thread_id = %s AND checkpoint_id <> %s", (thread_id, latest)
            )
            deleted = cur.rowcount
            await conn.execute(
                "DELETE FROM checkpoint_writes WHERE thread_id = %s AND checkpoint_id <> %s", (thread_id, latest)
            )
            await conn.execute(
                "DELETE FROM checkpoint_blobs b WHERE b.thread_id = %s AND NOT EXISTS ("
                " SELECT 1 FROM checkpoints c WHERE c.thread_id = b.thread_id AND c.checkpoint_ns = b.checkpoint_ns"
                " AND c.checkpoint -> 'channel_versions' ->> b.channel = b.version)",
                (thread_id,),
            )
        return deleted

    async def move_scope(self, old: str, new: str) -> dict[str, str]:
        """Give every thread of `old` to `new` (`appliance data assign`), in one transaction."""
        moved: dict[str, str] = {}
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute("SELECT id FROM appliance_threads WHERE scope = %s ORDER BY id", (old,))
            ids = [r["id"] for r in await cur.fetchall()]
            cur = await conn.execute("SELECT id FROM appliance_threads WHERE scope = %s", (new,))
            taken = {r["id"] for r in await cur.fetchall()}
            for old_id in ids:
                target = free_id(old_id, new, taken)
                await conn.execute(
                    "UPDATE appliance_threads SET id = %s, scope = %s WHERE id = %s", (target, new, old_id)
                )
                for table in CHECKPOINT_TABLES:
                    await conn.execute(f"UPDATE {table} SET thread_id = %s WHERE thread_id = %s", (target, old_id))
                moved[old_id] = target
        return moved

    async def delete(self, thread_id: str) -> None:
        await self.saver.adelete_thread(thread_id)
        await self._exec("DELETE FROM appliance_threads WHERE id = %s", (thread_id,))
