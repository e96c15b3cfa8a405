"""Stored Responses API responses (`store: true`): what `GET /v1/responses/{id}` returns and what
`previous_response_id` continues from.

`<data_dir>/responses.sqlite`, one row per response: its owner (the API key's id; "" when no keys are
configured), the response object as sent, the conversation it ended (internal messages as JSON), so a
chained request needs one read, and the request's own input (`GET /v1/responses/{id}/input_items`). Each
owner keeps at most `max_per_owner` responses (the setting APPLIANCE_MAX_RESPONSES_PER_KEY): the oldest go
first; 0 stores none. Another owner's id reads as absent. sqlite runs on a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from appliance.engine.types import Message, ToolCall

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created REAL NOT NULL,
    body TEXT NOT NULL,
    context TEXT NOT NULL,
    input TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS responses_by_owner ON responses (owner, created);
"""


def messages_to_json(messages: list[Message]) -> str:
    def one(m: Message) -> dict[str, Any]:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            d["name"] = m.name
        return d

    return json.dumps([one(m) for m in messages])


def messages_from_json(text: str) -> list[Message]:
    out = []
    for d in json.loads(text):
        calls = [ToolCall(c["id"], c["name"], c["arguments"]) for c in d.get("tool_calls", [])] or None
        out.append(Message(d["role"], d["content"], calls, d.get("tool_call_id"), d.get("name")))
    return out


@dataclass(frozen=True, slots=True)
class Stored:
    body: str  # the response object's JSON
    context: list[Message]
    input: list[Message]  # the request's own input items, as internal messages


class StoredResponses(Protocol):
    """Where stored responses live: this file (ResponseStore) or the shared database (PgResponseStore)."""

    async def put(self, owner: str, rid: str, body: str, context: list[Message], input: list[Message]) -> None: ...

    async def get(self, owner: str, rid: str) -> Stored | None: ...

    async def delete(self, owner: str, rid: str) -> bool: ...

    def close(self) -> None: ...


class ResponseStore:
    def __init__(self, path: Path, max_per_owner: int = 1000):
        self.path = path
        self.max_per_owner = max_per_owner
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            if "input" not in {r[1] for r in conn.execute("PRAGMA table_info(responses)")}:  # a store from 0.x
                conn.execute("ALTER TABLE responses ADD COLUMN input TEXT NOT NULL DEFAULT '[]'")
            self._conn = conn
        return self._conn

    def _put(self, owner: str, rid: str, body: str, context: str, input: str) -> None:
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT OR REPLACE INTO responses (id, owner, created, body, context, input) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (rid, owner, time.time(), body, context, input),
                )
                db.execute(
                    "DELETE FROM responses WHERE owner = ? AND id NOT IN "
                    "(SELECT id FROM responses WHERE owner = ? ORDER BY created DESC, rowid DESC LIMIT ?)",
                    (owner, owner, self.max_per_owner),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _get(self, owner: str, rid: str) -> tuple[str, str, str] | None:
        with self._lock:
            db = self._db()
            row = db.execute("SELECT body, context, input FROM responses WHERE id = ? AND owner = ?", (rid, owner))
            return row.fetchone()

    def _delete(self, owner: str, rid: str) -> bool:
        with self._lock:
            return self._db().execute("DELETE FROM responses WHERE id = ? AND owner = ?", (rid, owner)).rowcount > 0

    async def put(self, owner: str, rid: str, body: str, context: list[Message], input: list[Message]) -> None:
        if self.max_per_owner > 0:
            await asyncio.to_thread(self._put, owner, rid, body, messages_to_json(context), messages_to_json(input))

    async def get(self, owner: str, rid: str) -> Stored | None:
        row = await asyncio.to_thread(self._get, owner, rid)
        return None if row is None else Stored(row[0], messages_from_json(row[1]), messages_from_json(row[2]))

    async def delete(self, owner: str, rid: str) -> bool:
        return await asyncio.to_thread(self._delete, owner, rid)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
