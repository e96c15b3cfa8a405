"""Stored Responses API responses in the shared Postgres database (APPLIANCE_DATABASE_URL), for several boxes:
the same rows as `<data_dir>/responses.sqlite` (api/response_store.py) in `appliance_responses`, so that
`GET /v1/responses/{id}` and `previous_response_id` work on whichever node a request reaches.

One connection, opened on first use (after the schema upgrade) and again after an error, used by one worker
thread at a time: never on the event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from appliance.api.response_store import Stored, messages_from_json, messages_to_json
from appliance.engine.types import Message

_INSERT = """
INSERT INTO appliance_responses (id, owner, created, body, context, input) VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, created = excluded.created, body = excluded.body,
    context = excluded.context, input = excluded.input
"""
_TRIM = """
DELETE FROM appliance_responses WHERE owner = %s AND id NOT IN
    (SELECT id FROM appliance_responses WHERE owner = %s ORDER BY created DESC, id DESC LIMIT %s)
"""


class PgResponseStore:
    def __init__(self, url: str, max_per_owner: int = 1000):
        self.url = url
        self.max_per_owner = max_per_owner
        self._conn: Any = None
        self._lock = threading.Lock()

    def _run(self, fn: Any) -> Any:
        """`fn(conn)` in a transaction; the connection is dropped (and reopened next time) on an error."""
        with self._lock:
            if self._conn is None or self._conn.closed:
                from appliance.db.migrations import connect, upgrade

                upgrade(self.url, checkpoints=False)
                self._conn = connect(self.url)
            try:
                with self._conn.transaction():
                    return fn(self._conn)
            except Exception:
                self._conn.close()
                raise

    async def put(self, owner: str, rid: str, body: str, context: list[Message], input: list[Message]) -> None:
        if self.max_per_owner <= 0:
            return
        row = (rid, owner, time.time(), body, messages_to_json(context), messages_to_json(input))

        def put(conn: Any) -> None:
            conn.execute(_INSERT, row)
            conn.execute(_TRIM, (owner, owner, self.max_per_owner))

        await asyncio.to_thread(self._run, put)

    async def get(self, owner: str, rid: str) -> Stored | None:
        def get(conn: Any) -> Any:
            sql = "SELECT body, context, input FROM appliance_responses WHERE id = %s AND owner = %s"
            return conn.execute(sql, (rid, owner)).fetchone()

        row = await asyncio.to_thread(self._run, get)
        return None if row is None else Stored(row[0], messages_from_json(row[1]), messages_from_json(row[2]))

    async def delete(self, owner: str, rid: str) -> bool:
        def delete(conn: Any) -> bool:
            sql = "DELETE FROM appliance_responses WHERE id = %s AND owner = %s"
            return conn.execute(sql, (rid, owner)).rowcount > 0

        return await asyncio.to_thread(self._run, delete)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
