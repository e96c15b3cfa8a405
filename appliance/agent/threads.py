"""Conversation threads: the store interface (`ThreadStoreLike`) and its default, SQLite: LangGraph's
AsyncSqliteSaver (checkpoints) plus a small `threads` metadata table (owner, model, title, times), in one
file: `<data_dir>/agent/threads.sqlite`. Several boxes share threads in Postgres instead
(agent/threads_pg.py, APPLIANCE_THREADS_URL); `threads_pg.make_thread_store(settings)` picks one.

Thread ids are namespaced by owner: the client's id `t1` of the key (scope) `key_ab12` is stored as
`key_ab12:t1` (client ids cannot hold a colon, so the split is unambiguous), in the metadata and in the
checkpoints alike. Two keys can each have a thread `t1`, and asking for another key's thread is asking
for one's own (new or missing) thread: there is nothing to tell whether the other exists. Responses
show the client's id (`ThreadMeta.thread_id`). Rows stored before namespacing are renamed at open.

Checkpoints: LangGraph writes one per graph step, each holding the whole history. After every completed
run `prune()` keeps only the thread's latest checkpoint (and its pending writes): all that the API and the
next run read. So a thread's rows hold its history once, and the file grows linearly with it (freed pages
are reused).

One connection and one saver per process, opened in the app's lifespan. WAL journal, `synchronous=FULL`
(a finished turn survives a crash or power loss) and a busy timeout. The metadata statements take the
saver's lock, so they never interleave with a checkpoint transaction on the shared connection.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

THREAD_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
BUSY_TIMEOUT_MS = 5000
CHECKPOINT_TABLES = ("checkpoints", "writes")  # AsyncSqliteSaver's tables, keyed by thread_id


def stored_id(scope: str, thread_id: str) -> str:
    """The id a client's thread is stored under: its owner's scope, a colon, the client's id."""
    return f"{scope}:{thread_id}"


def client_id(stored: str) -> str:
    """The client's id of a stored thread id (ids stored before namespacing are their own)."""
    return stored.rpartition(":")[2]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS threads (
    id TEXT PRIMARY KEY,
    scope TEXT NOT NULL,
    model TEXT NOT NULL,
    title TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS threads_by_update ON threads (updated_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS threads_by_scope ON threads (scope, updated_at DESC, id DESC);
"""


@dataclass
class ThreadMeta:
    id: str
    scope: str
    model: str
    title: str
    created_at: float
    updated_at: float

    @property
    def thread_id(self) -> str:
        """The id the client knows (`id` is the stored, namespaced one)."""
        return client_id(self.id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.thread_id,
            "object": "thread",
            "created_at": int(self.created_at),
            "updated_at": int(self.updated_at),
            "title": self.title,
            "model": self.model,
            "user": self.scope,
        }


def title_of(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def free_id(old_id: str, scope: str, taken: set[str]) -> str:
    """The stored id thread `old_id` gets when it moves to `scope`: its client id there, with `-2`, `-3`, ...
    when that is taken (the result is added to `taken`), within the 128-character bound."""
    cid = client_id(old_id)
    target, n = stored_id(scope, cid), 1
    while target in taken:
        n += 1
        suffix = f"-{n}"
        target = stored_id(scope, cid[: 128 - len(suffix)] + suffix)
    taken.add(target)
    return target


class ThreadStoreLike(Protocol):
    """What the agent, the threads API and `appliance data` use of a thread store (SQLite or Postgres)."""

    saver: Any  # the LangGraph checkpointer, once open

    @property
    def where(self) -> str: ...  # for logs: a path or a redacted URL

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def get(self, thread_id: str) -> ThreadMeta | None: ...
    async def find(self, thread_id: str, scope: str | None) -> ThreadMeta | None: ...
    async def create(self, thread_id: str, scope: str, model: str, title: str, limit: int = 0) -> bool:
        """Record a new thread, unless `scope` already owns `limit` threads (0: no limit): then False.
        The count and the insert are one atomic step, so concurrent requests cannot both take the last place."""
        ...

    async def touch(self, thread_id: str, model: str | None = None) -> None: ...
    async def list(self, scope: str | None, limit: int, after: str | None = None) -> tuple[list[ThreadMeta], bool]: ...
    async def count(self, scope: str) -> int: ...
    async def scope_counts(self) -> dict[str, int]: ...
    async def prune(self, thread_id: str) -> int: ...
    async def move_scope(self, old: str, new: str) -> dict[str, str]: ...
    async def delete(self, thread_id: str) -> None: ...
    async def claim(self, thread_id: str) -> bool:
        """Mark the thread as running a turn for every node sharing the store: False when another node runs
        one. (Within a node the agent service's own set decides; one node's store always says True.)"""
        ...

    async def release(self, thread_id: str) -> None:
        """End a claim; done before the turn's stream ends (the client's next turn may go to another node at
        once), and done even when the turn's task is cancelled meanwhile."""
        ...


class ThreadStore:
    """The SQLite thread store (one box)."""

    def __init__(self, path: Path):
        self.path = path
        self.conn: Any = None
        self.saver: Any = None

    @property
    def where(self) -> str:
        return str(self.path)

    async def open(self) -> None:
        import aiosqlite
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(str(self.path))
        try:
            await conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=FULL")
            await conn.executescript(_SCHEMA)
            await conn.commit()
            saver = AsyncSqliteSaver(conn)
            await saver.setup()
            await self._namespace_old_rows(conn)
        except BaseException:
            await conn.close()
            raise
        self.conn, self.saver = conn, saver

    @staticmethod
    async def _namespace_old_rows(conn: Any) -> None:
        """Threads stored before ids were namespaced (`t1`) become `<scope>:t1`, checkpoints included."""
        async with conn.execute("SELECT id, scope FROM threads WHERE instr(id, ':') = 0") as cur:
            rows = await cur.fetchall()
        if not rows:
            return
        for old, scope in rows:
            new = stored_id(scope, old)
            await conn.execute("UPDATE threads SET id = ? WHERE id = ?", (new, old))
            for table in CHECKPOINT_TABLES:
                await conn.execute(f"UPDATE {table} SET thread_id = ? WHERE thread_id = ?", (new, old))
        await conn.commit()
        logging.getLogger("appliance.agent").info("threads: %d thread ids namespaced by owner", len(rows))

    async def close(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            await conn.close()

    async def pragma(self, name: str) -> Any:
        async with self.conn.execute(f"PRAGMA {name}") as cur:
            row = await cur.fetchone()
        return row[0] if row else None

    # -- metadata ----------------------------------------------------------------------------------

    async def get(self, thread_id: str) -> ThreadMeta | None:
        async with self.conn.execute(
            "SELECT id, scope, model, title, created_at, updated_at FROM threads WHERE id = ?", (thread_id,)
        ) as cur:
            row = await cur.fetchone()
        return ThreadMeta(*row) if row else None

    async def find(self, thread_id: str, scope: str | None) -> ThreadMeta | None:
        """A client's thread: the one of `scope`, or (scope None: no keys, no user given) the most recently
        active one of any owner with that client id."""
        if scope is not None:
            return await self.get(stored_id(scope, thread_id))
        suffix = ":" + thread_id
        async with self.conn.execute(
            "SELECT id, scope, model, title, created_at, updated_at FROM threads"
            " WHERE id = ? OR substr(id, -?) = ? ORDER BY updated_at DESC LIMIT 1",
            (thread_id, len(suffix), suffix),
        ) as cur:
            row = await cur.fetchone()
        return ThreadMeta(*row) if row else None

    async def create(self, thread_id: str, scope: str, model: str, title: str, limit: int = 0) -> bool:
        now = time.time()
        async with self.saver.lock:  # this process is the database's only writer: the lock makes it atomic
            if limit:
                async with self.conn.execute("SELECT count(*) FROM threads WHERE scope = ?", (scope,)) as cur:
                    (n,) = await cur.fetchone()
                if n >= limit:
                    return False
            await self.conn.execute(
                "INSERT OR IGNORE INTO threads (id, scope, model, title, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (thread_id, scope, model, title, now, now),
            )
            await self.conn.commit()
        return True

    async def touch(self, thread_id: str, model: str | None = None) -> None:
        async with self.saver.lock:
            await self.conn.execute(
                "UPDATE threads SET updated_at = ?, model = COALESCE(?, model) WHERE id = ?",
                (time.time(), model, thread_id),
            )
            await self.conn.commit()

    async def list(self, scope: str | None, limit: int, after: str | None = None) -> tuple[list[ThreadMeta], bool]:
        """Most recently active first; `after` is the client's id of the last thread of the previous page.
        Raises KeyError for an unknown cursor."""
        where, args = [], []
        if scope is not None:
            where.append("scope = ?")
            args.append(scope)
        if after is not None:
            cursor = await self.find(after, scope)
            if cursor is None or (scope is not None and cursor.scope != scope):
                raise KeyError(after)
            where.append("(updated_at < ? OR (updated_at = ? AND id < ?))")
            args += [cursor.updated_at, cursor.updated_at, cursor.id]
        sql = "SELECT id, scope, model, title, created_at, updated_at FROM threads"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY updated_at DESC, id DESC LIMIT ?"
        async with self.conn.execute(sql, (*args, limit + 1)) as cur:
            rows = await cur.fetchall()
        return [ThreadMeta(*r) for r in rows[:limit]], len(rows) > limit

    async def count(self, scope: str) -> int:
        """How many threads `scope` owns."""
        async with self.conn.execute("SELECT COUNT(*) FROM threads WHERE scope = ?", (scope,)) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def scope_counts(self) -> dict[str, int]:
        """scope → number of threads, for every owner."""
        async with self.conn.execute("SELECT scope, COUNT(*) FROM threads GROUP BY scope") as cur:
            return {scope: int(n) for scope, n in await cur.fetchall()}

    async def prune(self, thread_id: str) -> int:
        """Delete every checkpoint of the thread but its latest, and the writes of those (called after each
        completed run). Returns the number of checkpoints deleted."""
        async with self.saver.lock:
            async with self.conn.execute(
                "SELECT checkpoint_id FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = ''"
                " ORDER BY checkpoint_id DESC LIMIT 1",
                (thread_id,),
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                return 0
            deleted = 0
            for table in CHECKPOINT_TABLES:
                cur = await self.conn.execute(
                    f"DELETE FROM {table} WHERE thread_id = ? AND checkpoint_id != ?", (thread_id, row[0])
                )
                if table == "checkpoints":
                    deleted = cur.rowcount
                await cur.close()
            await self.conn.commit()
        return deleted

    async def move_scope(self, old: str, new: str) -> dict[str, str]:
        """Give every thread of `old` to `new` (`appliance data assign`): stored ids, owner and checkpoints.
        A client id `new` already uses gets a suffix (`t1-2`). Returns old stored id → new stored id."""
        async with self.conn.execute("SELECT id FROM threads WHERE scope = ? ORDER BY id", (old,)) as cur:
            ids = [r[0] for r in await cur.fetchall()]
        async with self.conn.execute("SELECT id FROM threads WHERE scope = ?", (new,)) as cur:
            taken = {r[0] for r in await cur.fetchall()}
        moved: dict[str, str] = {}
        async with self.saver.lock:
            for old_id in ids:
                target = free_id(old_id, new, taken)
                await self.conn.execute("UPDATE threads SET id = ?, scope = ? WHERE id = ?", (target, new, old_id))
                for table in CHECKPOINT_TABLES:
                    await self.conn.execute(f"UPDATE {table} SET thread_id = ? WHERE thread_id = ?", (target, old_id))
                moved[old_id] = target
            await self.conn.commit()
        return moved

    async def delete(self, thread_id: str) -> None:
        """Remove the thread's checkpoints (adelete_thread) and its metadata."""
        await self.saver.adelete_thread(thread_id)
        async with self.saver.lock:
            await self.conn.execute("DELETE FROM threads WHERE id = ?", (thread_id,))
            await self.conn.commit()

    async def claim(self, thread_id: str) -> bool:
        return True  # one node: the agent service's busy set is the whole truth

    async def release(self, thread_id: str) -> None:
        pass
