"""Usage accounting: tokens, requests and embedding inputs per key id, model and UTC day in
`<data_dir>/usage.sqlite`, written off the event loop, surviving restarts; `GET /v1/usage` (own rows for a
user key, everyone's for an admin) and `appliance usage`; embeddings under a key's token and stream limits.

Fast tier: the store alone, and create_app() with a scripted backend (tests/test_roles.py's fakes). Slow
tier: a real server, a known workload, a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from appliance.cli import main
from appliance.security.keys import KeyEntry, KeysFile, KeyStore, hash_key, write_keys_file
from appliance.security.limits import RateLimitMiddleware
from appliance.security.usage import UsageMiddleware, UsageStore, read_usage, utc_day
from tests.conftest import Server, start_server
from tests.test_roles import CHAT, CliKeys, add_key, bearer, client, forbidden, settings_for

EMBED = {"model": "all-minilm-l6-v2", "input": ["one two three", "four five"]}  # 5 tokens (one per word), 2 inputs


def cli(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["usage", *args]) == 0
    return out.getvalue()


# -- the store ---------------------------------------------------------------------------------------


def test_store_counts_flushes_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite"
    store = UsageStore(path, interval=3600)  # no background flush: this test flushes by hand
    store.record("key_a", "alice", "m1", 10, 3)
    store.record("key_a", "alice", "m1", 5, 2)
    store.record("key_a", "alice", "emb", 7, 0, 4)
    store.record("key_b", "bob", "m1", 1, 1, day="2020-01-01")
    store.record(None, None, "m1", 2, 2)
    assert not path.exists()  # recording writes nothing: only a flush does
    rows = store.query()  # a query includes what is pending
    by = {(r["key_id"], r["model"], r["day"]): r for r in rows}
    a = by[("key_a", "m1", utc_day())]
    assert (a["requests"], a["prompt_tokens"], a["completion_tokens"], a["total_tokens"]) == (2, 15, 5, 20)
    assert a["key_name"] == "alice"
    assert by[("key_a", "emb", utc_day())]["embedding_inputs"] == 4
    assert by[(None, "m1", utc_day())]["requests"] == 1  # without keys: key id null
    assert [r["day"] for r in store.query(since="2021-01-01", key="bob")] == []
    assert len(store.query(key="bob")) == 1 and len(store.query(key="key_b")) == 1
    assert {r["model"] for r in store.query(key_id="key_a")} == {"m1", "emb"}
    store.close()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    # a new store on the same file (a restart) adds to the same rows
    again = UsageStore(path, interval=3600)
    again.record("key_a", "alice", "m1", 1, 1)
    again.close()
    totals = {(r["key_id"], r["model"]): r for r in read_usage(path)}
    assert totals[("key_a", "m1")]["requests"] == 3 and totals[("key_a", "m1")]["prompt_tokens"] == 16
    assert totals[("key_b", "m1")]["day"] == "2020-01-01"


def test_background_flush_writes_off_the_caller_thread(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite"
    store = UsageStore(path, interval=0.05)
    writers: list[str] = []
    real = store.flush

    def spy() -> None:
        with store._lock:
            pending = bool(store._pending)
        if pending:
            writers.append(threading.current_thread().name)
        real()

    store.flush = spy  # type: ignore[method-assign]
    store.start()
    try:
        store.record("key_a", "alice", "m1", 1, 1)
        deadline = time.monotonic() + 5
        while not read_usage(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert read_usage(path)[0]["requests"] == 1
        assert writers == ["usage-flush"]
    finally:
        store.close()


def test_a_failed_write_keeps_the_counts(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    store = UsageStore(blocker / "usage.sqlite", interval=3600)
    store.record("key_a", "alice", "m1", 1, 1)
    store.flush()  # cannot create the directory: logged, counts kept
    assert store._pending
    store._stop.set()
    store._pending.clear()
    store.close()


async def test_middleware_records_what_handlers_leave(tmp_path: Path) -> None:
    async def handler(request: Request) -> PlainTextResponse:
        st = request.state
        st.principal, st.key_name = "key_x", "xavier"
        if request.url.path == "/work":
            st.model, st.prompt_tokens, st.completion_tokens, st.embedding_inputs = "m", 4, 6, 3
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/work", handler), Route("/idle", handler)])
    store = UsageStore(tmp_path / "usage.sqlite", interval=3600)
    transport = httpx.ASGITransport(app=UsageMiddleware(app, store))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        for path in ("/work", "/work", "/idle"):
            assert (await c.get(path)).status_code == 200
    (row,) = await asyncio.to_thread(store.query)
    assert (row["key_id"], row["key_name"], row["model"], row["requests"]) == ("key_x", "xavier", "m", 2)
    assert (row["prompt_tokens"], row["completion_tokens"], row["embedding_inputs"]) == (8, 12, 6)
    store.close()


# -- over HTTP (fast) ---------------------------------------------------------------------------------------


@pytest.fixture
def two_keys(tmp_path: Path) -> dict[str, str]:
    kf = tmp_path / "keys.toml"
    return {"admin": add_key(kf, "root"), "user": add_key(kf, "alice")}


async def test_usage_endpoint_and_restart(tmp_path: Path, two_keys: dict[str, str]) -> None:
    admin, user = bearer(two_keys["admin"]), bearer(two_keys["user"])
    s = settings_for(tmp_path)
    async with client(s) as c:
        for _ in range(3):
            assert (await c.post("/v1/chat/completions", json=CHAT, headers=user)).status_code == 200
        r = await c.post("/api/chat", json={**CHAT, "stream": False}, headers=user)
        assert r.status_code == 200
        assert (await c.post("/v1/chat/completions", json=CHAT, headers=admin)).status_code == 200
        assert (await c.post("/v1/embeddings", json=EMBED, headers=user)).status_code == 200
        assert (await c.get("/v1/models", headers=user)).status_code == 200  # no model used: not counted

        doc = (await c.get("/v1/usage", headers=user)).json()
        assert doc["object"] == "list" and {r["key_name"] for r in doc["data"]} == {"alice"}
        chat = next(r for r in doc["data"] if r["model"] == "smollm2-135m-instruct")
        assert (chat["requests"], chat["prompt_tokens"], chat["completion_tokens"]) == (4, 20, 8)
        assert chat["day"] == utc_day() and chat["key_id"].startswith("key_")
        emb = next(r for r in doc["data"] if r["model"] == "all-minilm-l6-v2")
        assert (emb["requests"], emb["prompt_tokens"], emb["completion_tokens"]) == (1, 5, 0)
        assert doc["totals"] == {
            "requests": 5,
            "prompt_tokens": 25,
            "completion_tokens": 8,
            "total_tokens": 33,
            "embedding_inputs": emb["embedding_inputs"],
        }
        # a user sees only its own; an admin everyone's, or one key's
        forbidden(await c.get("/v1/usage", params={"key": "root"}, headers=user))
        assert (await c.get("/v1/usage", params={"key": "alice"}, headers=user)).status_code == 200
        everyone = (await c.get("/v1/usage", headers=admin)).json()
        assert {r["key_name"] for r in everyone["data"]} == {"alice", "root"} and everyone["totals"]["requests"] == 6
        only = (await c.get("/v1/usage", params={"key": "alice"}, headers=admin)).json()
        assert only["totals"] == doc["totals"]
        # `me` (the console's status panel): the caller's own, admins included
        mine = (await c.get("/v1/usage", params={"key": "me"}, headers=admin)).json()
        assert {r["key_name"] for r in mine["data"]} == {"root"} and mine["totals"]["requests"] == 1
        assert (await c.get("/v1/usage", params={"key": "me"}, headers=user)).json()["totals"] == doc["totals"]
        later = (await c.get("/v1/usage", params={"since": "2999-01-01"}, headers=admin)).json()
        assert later["data"] == [] and later["since"] == "2999-01-01"
        r = await c.get("/v1/usage", params={"since": "yesterday"}, headers=admin)
        assert r.status_code == 400 and r.json()["error"]["param"] == "since"
        assert (await c.get("/v1/usage")).status_code == 401
        before = doc["totals"]

    # a restart: the counts were flushed at shutdown and are read back
    async with client(s) as c:
        doc = (await c.get("/v1/usage", headers=user)).json()
        assert doc["totals"] == before
        assert (await c.post("/v1/chat/completions", json=CHAT, headers=user)).status_code == 200
        doc = (await c.get("/v1/usage", headers=user)).json()
        assert doc["totals"]["requests"] == before["requests"] + 1

    # `appliance usage`
    data_dir = ["--data-dir", str(s.data_dir)]
    out = json.loads(cli("--json", *data_dir))
    assert out["totals"]["requests"] == 7 and out["totals"]["prompt_tokens"] == 35
    out = json.loads(cli("--json", "--key", "alice", *data_dir))
    assert out["totals"]["requests"] == 6 and {r["key_name"] for r in out["data"]} == {"alice"}
    assert json.loads(cli("--json", "--since", "2999-01-01", *data_dir))["data"] == []
    table = cli(*data_dir)
    assert "alice" in table and "root" in table and "TOTAL" in table and "smollm2-135m-instruct" in table
    assert utc_day() in cli("--daily", *data_dir)
    assert "no usage recorded" in cli("--data-dir", str(tmp_path / "elsewhere"))
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        main(["usage", "--since", "01/02/2025", *data_dir])


async def test_embedding_inputs_are_counted(tmp_path: Path, two_keys: dict[str, str]) -> None:
    """Needs the handlers to leave `request.state.embedding_inputs = len(texts)` (both APIs)."""
    user = bearer(two_keys["user"])
    async with client(settings_for(tmp_path)) as c:
        assert (await c.post("/v1/embeddings", json=EMBED, headers=user)).status_code == 200
        r = await c.post("/api/embed", json={"model": "all-minilm-l6-v2", "input": ["a", "b", "c"]}, headers=user)
        assert r.status_code == 200
        (row,) = (await c.get("/v1/usage", headers=user)).json()["data"]
    assert row["requests"] == 2 and row["prompt_tokens"] == 8 and row["embedding_inputs"] == 5


async def test_no_keys_usage_is_everyones(tmp_path: Path) -> None:
    async with client(settings_for(tmp_path)) as c:
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        (row,) = (await c.get("/v1/usage")).json()["data"]
    assert row["key_id"] is None and row["key_name"] is None and row["requests"] == 1


# -- embeddings under a key's limits ----------------------------------------------------------------------


async def test_embeddings_count_against_token_and_stream_limits(tmp_path: Path) -> None:
    kf = tmp_path / "keys.toml"
    add_key(kf, "root")
    tight = bearer(add_key(kf, "tight", "--tpm", "5"))
    async with client(settings_for(tmp_path)) as c:
        assert (await c.post("/v1/embeddings", json=EMBED, headers=tight)).status_code == 200  # 5 tokens
        r = await c.post("/v1/embeddings", json=EMBED, headers=tight)
        assert r.status_code == 429 and r.json()["error"]["type"] == "tokens"
        r = await c.post("/api/embed", json=EMBED, headers=tight)
        assert r.status_code == 429 and "tokens per minute" in r.json()["error"]
        assert r.headers["x-ratelimit-remaining-tokens"] == "0"
        metrics = (await c.get("/metrics", headers=bearer(add_key(kf, "admin2", "--role", "admin")))).text
        assert 'appliance_rate_limited_total{key="tight",limit="tokens"} 2.0' in metrics


async def test_embeddings_hold_a_stream(tmp_path: Path) -> None:
    from appliance.security.limits import RateLimiter

    gate = asyncio.Event()

    async def embed(request: Request) -> PlainTextResponse:
        await gate.wait()
        return PlainTextResponse("ok")

    path = tmp_path / "keys.toml"
    k = "sk-app-" + "s" * 43
    write_keys_file(path, KeysFile(keys={"one": KeyEntry(sha256=hash_key(k), max_concurrent_streams=1)}))
    store = KeyStore(path)

    async def with_key(scope, receive, send):  # stands in for the auth middleware
        scope.setdefault("state", {}).update(principal=store.get("one").key_id, key_name="one", role="user")
        await limited(scope, receive, send)

    app = Starlette(
        routes=[Route("/v1/embeddings", embed, methods=["POST"]), Route("/api/embed", embed, methods=["POST"])]
    )
    limited = RateLimitMiddleware(app, store, RateLimiter())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=with_key), base_url="http://t") as c:
        first = asyncio.create_task(c.post("/v1/embeddings"))
        await asyncio.sleep(0.05)
        r = await c.post("/api/embed")
        assert r.status_code == 429 and "concurrent" in r.json()["error"]
        gate.set()
        assert (await first).status_code == 200


async def test_per_key_labels_stop_beyond_100_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    keys = {f"k{i}": KeyEntry(sha256=hash_key(f"key-{i}"), requests_per_minute=1) for i in range(101)}
    write_keys_file(path, KeysFile(keys=keys))
    store = KeyStore(path)
    seen: list[tuple[str, str]] = []

    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    limited = RateLimitMiddleware(
        Starlette(routes=[Route("/x", ok)]), store, on_limited=lambda k, t: seen.append((k, t))
    )

    async def with_key(scope, receive, send):
        scope.setdefault("state", {}).update(principal=store.get("k7").key_id, key_name="k7", role="user")
        await limited(scope, receive, send)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=with_key), base_url="http://t") as c:
        assert (await c.get("/x")).status_code == 200
        assert (await c.get("/x")).status_code == 429
    assert seen == [("other", "requests")]


# -- slow: a real server, a known workload, a restart --------------------------------------------------------


@pytest.mark.slow
def test_usage_after_a_workload_and_a_restart(tmp_path: Path) -> None:
    keys = CliKeys(tmp_path / "keys.toml")
    keys.add("boss")
    keys.add("worker")
    env = {"APPLIANCE_KEYS_FILE": str(keys.path)}
    server: Server = start_server(tmp_path, "--context-size", "1024", env=env)
    expected: dict[str, Any] = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    try:
        url = server.base_url
        for i in range(3):
            body = {**CHAT, "max_tokens": 4 + i, "temperature": 0}
            r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=keys.h("worker"), timeout=60)
            assert r.status_code == 200, r.text
            u = r.json()["usage"]
            expected["requests"] += 1
            expected["prompt_tokens"] += u["prompt_tokens"]
            expected["completion_tokens"] += u["completion_tokens"]
        r = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}, headers=keys.h("boss"), timeout=60)
        assert r.status_code == 200
        doc = httpx.get(f"{url}/v1/usage", headers=keys.h("worker")).json()
        assert {k: doc["totals"][k] for k in expected} == expected
        assert {r["key_name"] for r in doc["data"]} == {"worker"}
        assert httpx.get(f"{url}/v1/usage", headers=keys.h("boss")).json()["totals"]["requests"] == 4
    finally:
        assert server.stop() == 0
    out = json.loads(cli("--json", "--key", "worker", "--data-dir", str(server.data_dir)))
    assert {k: out["totals"][k] for k in expected} == expected
    server = start_server(tmp_path, "--context-size", "1024", env=env)
    try:
        doc = httpx.get(f"{server.base_url}/v1/usage", headers=keys.h("worker")).json()
        assert {k: doc["totals"][k] for k in expected} == expected
    finally:
        server.stop()
