"""Several boxes as one service, with the real parts on loopback: Postgres (threads, keys, usage), a Chroma
server (memory), Redis (limits), two `appliance serve` processes and a real nginx with
nginx/appliance-cluster.conf in front of them.

The tests share one cluster and run in file order; the last one kills a node. Outside CI a missing part
(Postgres, redis-server, nginx, openssl) skips them with the reason; in CI it fails them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.cluster_parts import Postgres, chroma_server, missing, postgres, redis_server, stop, wait_port
from tests.conftest import REPO, Server, free_port, start_server
from tests.test_ops import NGINX, tls_cert  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow

CLUSTER_SITE = REPO / "nginx" / "appliance-cluster.conf"


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def render_cluster_nginx(prefix: Path, tls: Path, node_ports: list[int], https_port: int) -> Path:
    """nginx.conf under `prefix` including the cluster site with its nodes on loopback ports."""
    site = CLUSTER_SITE.read_text()
    servers = "".join(f"    server 127.0.0.1:{p} max_fails=2 fail_timeout=10s;\n" for p in node_ports)
    site, n = re.subn(r"(?m)(^    server 10\.0\.0\.\d+:8000 [^\n]*\n)+", servers, site)
    assert n == 2, "both upstreams list the nodes: update this test"
    for old, new in [
        ("listen 80;", f"listen 127.0.0.1:{free_port()};"),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;"),
        ("/etc/appliance/tls/", f"{tls}/"),
    ]:
        assert old in site, f"{old!r} not in the cluster site: update this test"
        site = site.replace(old, new)
    site = re.sub(r"(?m)^\s*listen \[::\].*$", "", site)
    (prefix / "cluster.conf").write_text(site)
    temps = " ".join(f"{k}_temp_path {prefix}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"daemon off;\nmaster_process off;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log info;\n"
        "events { worker_connections 256; }\n"
        f"http {{\n  access_log {prefix}/access.log;\n  {temps}\n  include {prefix}/cluster.conf;\n}}\n"
    )
    return conf


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    with postgres() as p:
        yield p


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg: Postgres
) -> Iterator[SimpleNamespace]:
    if NGINX is None or shutil.which("openssl") is None:
        missing("nginx or openssl is not installed (Debian: apt-get install nginx openssl; CI: .ci/run does)")
    tls: Path = request.getfixturevalue("tls_cert")
    tmp = tmp_path_factory.mktemp("cluster")
    db = pg.create_db("appliance")
    with redis_server(tmp) as redis_url, chroma_server(tmp) as chroma_url:
        shared = {
            "APPLIANCE_DATABASE_URL": db,
            "APPLIANCE_MEMORY_URL": chroma_url,
            "APPLIANCE_LIMITS_URL": redis_url,
        }
        # Keys first, from the command line, into the shared database (no node runs yet).
        keys = {}
        for name, extra in (("admin", ["--role", "admin"]), ("alice", []), ("bob", []), ("carol", ["--rpm", "3"])):
            r = cli("keys", "add", name, *extra, env=shared)
            assert r.returncode == 0, r.stderr
            keys[name] = r.stdout.strip()
        env = {
            **shared,
            "APPLIANCE_CONTEXT_SIZE": "2048",
            "APPLIANCE_PARALLEL": "2",
            "APPLIANCE_THREADS": "1",
            "APPLIANCE_EMBEDDINGS_PRELOAD": "true",
            "APPLIANCE_EMBEDDINGS_WAIT": "240",
            "APPLIANCE_AGENT_TIMEOUT": "300",
            "APPLIANCE_AGENT_TOOL_ROUNDS": "0",  # one model call per turn: these tests are about state
            "APPLIANCE_DRAIN_TIMEOUT": "3",
        }
        # Both nodes start at once: each upgrades the shared schema at start, under the advisory lock.
        nodes = [start_server(tmp / name, env=env, wait=False) for name in ("a", "b")]
        nginx_proc = None
        try:
            for node in nodes:
                node.wait_ready(timeout=240)
            for node in nodes:  # the agent needs each node's embedding model: wait for it here, not in a turn
                wait_embeddings(node, keys["admin"])
            https_port = free_port()
            prefix = tmp / "nginx"
            prefix.mkdir()
            conf = render_cluster_nginx(prefix, tls, [n.port for n in nodes], https_port)
            nginx_proc = subprocess.Popen(
                [NGINX, "-c", conf, "-p", f"{prefix}/", "-e", prefix / "error.log"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            wait_port(https_port, nginx_proc, "nginx", prefix / "error.log", timeout=15)
            yield SimpleNamespace(
                nodes=nodes, url=f"https://127.0.0.1:{https_port}", keys=keys, env=shared, db=db, pg=pg
            )
        finally:
            if nginx_proc is not None:
                stop(nginx_proc)
            for node in nodes:
                node.stop()


def wait_embeddings(node: Server, admin: str, timeout: float = 600) -> None:
    from appliance.memory.embeddings import EMBEDDING_MODEL_ID

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{node.base_url}/health", params={"verbose": 1}, headers=auth(admin), timeout=30)
        entry = next(m for m in r.json()["models"] if m["id"] == EMBEDDING_MODEL_ID)
        state = entry["backends"][0]["state"]
        assert state != "failed", entry
        if state == "ready":
            return
        if state in ("idle", "stopped", "unloaded"):  # not preloaded: the first request loads it
            body = {"model": EMBEDDING_MODEL_ID, "input": "warm up"}
            httpx.post(f"{node.base_url}/v1/embeddings", json=body, headers=auth(admin), timeout=timeout)
        time.sleep(0.5)
    raise TimeoutError(f"the embedding model of {node.base_url} did not load in {timeout}s:\n{node.log()[-3000:]}")


def auth(key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


def turn(base: str, key: str, thread: str, text: str, rid: str | None = None) -> httpx.Response:
    body = {"model": "agent", "messages": [{"role": "user", "content": text}], "max_tokens": 12, "temperature": 0}
    headers = auth(key, **{"X-Thread-Id": thread, "X-Request-Id": rid or uuid.uuid4().hex})
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=300, verify=False)


def user_texts(base: str, key: str, thread: str) -> list[str]:
    r = httpx.get(f"{base}/v1/threads/{thread}", headers=auth(key), timeout=60, verify=False)
    assert r.status_code == 200, r.text
    return [m["content"] for m in r.json()["messages"] if m["role"] == "user"]


def served_by(nodes: list[Server], rid: str, wait: float = 5.0) -> list[Server]:
    """The nodes whose access log has the request (written as the response ends: poll a little)."""
    deadline = time.monotonic() + wait
    while not (found := [n for n in nodes if rid in n.log()]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def test_db_upgrade_twice_at_once_is_safe(pg: Postgres) -> None:
    url = pg.create_db("upgrade_race")
    env = {"APPLIANCE_DATABASE_URL": url}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: cli("db", "upgrade", env=env), range(2)))
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    outs = sorted(r.stdout for r in runs)
    assert "already up to date" in outs[0] and "(applied 1, 2)" in outs[1], outs  # one applied, the other waited
    again = cli("db", "upgrade", env=env)
    assert again.returncode == 0 and "already up to date" in again.stdout
    import psycopg

    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT version FROM appliance_schema ORDER BY version").fetchall() == [(1,), (2,)]
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"appliance_threads", "appliance_keys", "appliance_usage", "appliance_responses", "checkpoints"} <= tables
    status = cli("db", "status", env=env)
    assert status.returncode == 0 and "schema version 2 of 2" in status.stdout


async def test_a_thread_runs_one_turn_at_a_time_across_nodes(pg: Postgres) -> None:
    """Two stores (two nodes) on one database: a thread claimed by one is refused to the other until it is
    released, or until the claiming node's connection ends (a node that dies frees its threads)."""
    from appliance.agent.threads_pg import PostgresThreadStore

    url = pg.create_db("claims_unit")
    a, b = PostgresThreadStore(url), PostgresThreadStore(url)
    try:
        assert await a.claim("u1/t1") and await a.claim("u1/t2")
        assert not await b.claim("u1/t1") and not await b.claim("u1/t2")
        assert await b.claim("u1/t3")  # another thread is free
        await a.release("u1/t1")
        assert await b.claim("u1/t1")  # released before release() returns: the next turn may go anywhere
        await a._claims.close()  # node a's connection ends: so do its locks, once its server session has ended
        for _ in range(100):
            if await b.claim("u1/t2"):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("node a's locks outlived its connection")
        assert not await a.claim("u1/t3")  # a reconnects for its next claim; b still holds t3
    finally:
        await a.close()
        await b.close()


async def test_postgres_response_store(pg: Postgres) -> None:
    """Stored Responses API responses in the shared database: per owner, bounded, deletable, with the
    conversation and the request's input, from either of two stores (nodes) on it."""
    from appliance.api.response_store_pg import PgResponseStore
    from appliance.engine.types import Message, ToolCall

    url = pg.create_db("responses_unit")
    a, b = PgResponseStore(url, max_per_owner=2), PgResponseStore(url, max_per_owner=2)
    try:
        convo = [Message("user", "weather?"), Message("assistant", "", [ToolCall("call_1", "w", '{"c": 1}')])]
        for i in range(3):
            await a.put("alice", f"resp_{i}", f'{{"id": "resp_{i}"}}', convo, convo[:1])
        await b.put("bob", "resp_b", "{}", [], [])
        got = await b.get("alice", "resp_2")
        assert got is not None and got.body == '{"id": "resp_2"}'
        assert got.context == convo and got.input == convo[:1]
        assert await b.get("alice", "resp_0") is None  # the oldest went: two per owner
        assert await b.get("bob", "resp_2") is None and await a.get("alice", "resp_b") is None
        assert not await a.delete("bob", "resp_2") and await b.delete("alice", "resp_2")
        assert await a.get("alice", "resp_2") is None and await a.get("alice", "resp_1") is not None
    finally:
        a.close()
        b.close()


async def test_postgres_thread_store_prunes_lists_and_moves(pg: Postgres, tmp_path: Path) -> None:
    """The Postgres store's contract without a model: two services (two "nodes") on one database, a scripted
    engine. After each run only the thread's latest checkpoint and the blobs it points at are left."""
    import psycopg

    from appliance.agent.service import AgentService
    from appliance.agent.threads import stored_id
    from appliance.agent.threads_pg import PostgresThreadStore
    from appliance.engine.router import Engine
    from appliance.engine.types import Finish, GenerateRequest, Message
    from tests.fakes import ScriptedBackend, ok, scripted_registry, settings
    from tests.test_agent_graph import WordsEmbedder

    url = pg.create_db("threads_unit")
    svcs = []
    for name in ("a", "b"):
        s = settings(data_dir=tmp_path / name, threads_url=url, embeddings_preload=False, agent_timeout=180)
        engine = Engine(scripted_registry(s, {"m": [ScriptedBackend("llamacpp", default=ok("Noted."))]}), s)
        svc = AgentService(s, engine=engine, embeddings=WordsEmbedder())
        assert isinstance(svc.threads, PostgresThreadStore)
        await svc.start()
        await svc.ready()
        svcs.append(svc)
    try:
        for i, svc in enumerate([svcs[0], svcs[1], svcs[0]]):
            req = GenerateRequest(model="agent", messages=[Message("user", f"turn {i}")], thread_id="t1", user="u1")
            events = [ev async for ev in svc.generate(req, "agent", "m")]
            assert isinstance(events[-1], Finish), events
        key = stored_id("u1", "t1")
        state = await svcs[1].graph.aget_state({"configurable": {"thread_id": key}})
        said = [m.content for m in state.values["messages"] if m.type == "human"]
        assert said == ["turn 0", "turn 1", "turn 2"]
        with psycopg.connect(url) as conn:
            q = "SELECT count(*) FROM {} WHERE thread_id = %s"
            assert conn.execute(q.format("checkpoints"), (key,)).fetchone()[0] == 1
            blobs = conn.execute(q.format("checkpoint_blobs"), (key,)).fetchone()[0]
            versions = conn.execute(
                "SELECT count(*) FROM checkpoints c, jsonb_each_text(c.checkpoint -> 'channel_versions') v"
                " WHERE c.thread_id = %s",
                (key,),
            ).fetchone()[0]
            assert 0 < blobs <= versions  # only what the latest checkpoint points at
        a, b = (svc.threads for svc in svcs)
        meta = await b.find("t1", "u1")
        assert meta is not None and meta.title == "turn 0" and (await a.find("t1", None)).id == key
        assert await b.count("u1") == 1 and await a.scope_counts() == {"u1": 1}
        await a.create(stored_id("u1", "t2"), "u1", "agent", "second")
        page, more = await b.list("u1", 1)
        assert [t.thread_id for t in page] == ["t2"] and more
        page, more = await b.list("u1", 1, after="t2")
        assert [t.thread_id for t in page] == ["t1"] and not more
        with pytest.raises(KeyError):
            await b.list("u1", 1, after="nope")
        moved = await b.move_scope("u1", "u2")
        assert moved == {key: stored_id("u2", "t1"), stored_id("u1", "t2"): stored_id("u2", "t2")}
        state = await svcs[0].graph.aget_state({"configurable": {"thread_id": stored_id("u2", "t1")}})
        assert len(state.values["messages"]) == 6
        await a.delete(stored_id("u2", "t1"))
        assert await b.get(stored_id("u2", "t1")) is None
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM checkpoint_blobs").fetchone()[0] == 0
    finally:
        for svc in svcs:
            await svc.close()


def test_usage_of_two_stores_adds_up_and_keys_roles_change_in_the_database(pg: Postgres) -> None:
    from appliance.security.keys_db import DbKeys, DbKeyStore
    from appliance.security.usage_db import DbUsageStore, read_usage_db

    url = pg.create_db("stores_unit")
    stores = [DbUsageStore(url), DbUsageStore(url)]
    for i, store in enumerate(stores):
        store.record("key_1", "alice", "m", prompt_tokens=10, completion_tokens=i + 1, day="2026-01-02")
        store.record(None, None, "m", embedding_inputs=3, day="2026-01-02")
        store.close()  # flushes
    where, rows = read_usage_db(url, key="alice")
    assert "127.0.0.1" in where
    assert [(r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [(2, 20, 3)]
    _, rows = read_usage_db(url, since="2026-01-03")
    assert rows == []
    env = {"APPLIANCE_DATABASE_URL": url}
    assert cli("keys", "add", "ops", env=env).returncode == 0
    assert cli("keys", "add", "ops", env=env).returncode == 1  # the name is taken
    assert cli("keys", "role", "ops", "metrics", env=env).returncode == 0
    assert DbKeys(url).read().keys["ops"].role == "metrics"
    store = DbKeyStore(url, refresh=0.05)
    assert store.enabled and store.get("ops").role == "metrics" and "***" not in store.path
    assert cli("keys", "revoke", "ops", env=env).returncode == 0
    store.start()
    try:
        deadline = time.monotonic() + 10
        while store.get("ops") is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.get("ops") is None and store.enabled  # revoked everywhere; auth stays on
    finally:
        store.close()


def test_a_thread_alternated_between_nodes_keeps_its_history(cluster: SimpleNamespace) -> None:
    a, b = (n.base_url for n in cluster.nodes)
    key, tid = cluster.keys["alice"], "alternating"
    said = ["My name is Zed.", "I live in Oslo.", "What is my name?"]
    for base, text in zip([a, b, a], said, strict=True):
        r = turn(base, key, tid, text)
        assert r.status_code == 200, r.text
        assert r.headers["x-thread-id"] == tid
    # The whole history, in order, whichever node is asked.
    assert user_texts(b, key, tid) == said
    assert user_texts(a, key, tid) == said
    # The list and deletes work from any node; another key sees none of it.
    listed = httpx.get(f"{b}/v1/threads", headers=auth(key), timeout=30).json()
    assert tid in [t["id"] for t in listed["data"]]
    other = httpx.get(f"{a}/v1/threads", headers=auth(cluster.keys["bob"]), timeout=30).json()
    assert tid not in [t["id"] for t in other["data"]]
    assert httpx.get(f"{a}/v1/threads/{tid}", headers=auth(cluster.keys["bob"]), timeout=30).status_code == 404
    assert httpx.delete(f"{a}/v1/threads/{tid}", headers=auth(key), timeout=30).status_code == 200
    assert httpx.get(f"{b}/v1/threads/{tid}", headers=auth(key), timeout=30).status_code == 404


def test_a_thread_busy_on_one_node_is_refused_on_the_other(cluster: SimpleNamespace) -> None:
    a, b = (n.base_url for n in cluster.nodes)
    key, tid = cluster.keys["alice"], "one-at-a-time"
    msgs = [{"role": "user", "content": "Tell me a story."}]
    body = {"model": "agent", "messages": msgs, "max_tokens": 48, "stream": True}
    headers = auth(key, **{"X-Thread-Id": tid})
    with httpx.stream("POST", f"{a}/v1/chat/completions", json=body, headers=headers, timeout=300) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # admitted: node a runs the turn
        other = turn(b, key, tid, "Meanwhile, on node b?")
        rest = list(lines)
    assert other.status_code == 409, other.text
    assert other.json()["error"]["code"] == "thread_busy" and "another node" in other.json()["error"]["message"]
    assert "data: [DONE]" in rest
    again = turn(b, key, tid, "Now on node b.")  # the turn on node a is over: node b may run the next
    assert again.status_code == 200, again.text


def test_a_rate_limit_holds_across_nodes(cluster: SimpleNamespace) -> None:
    a, b = (n.base_url for n in cluster.nodes)
    key = cluster.keys["carol"]  # --rpm 3
    codes = [httpx.get(f"{base}/v1/models", headers=auth(key), timeout=30) for base in (a, b, a, b)]
    assert [r.status_code for r in codes] == [200, 200, 200, 429], [r.text for r in codes]
    assert codes[1].headers["x-ratelimit-remaining-requests"] == "1"  # node b saw node a's request
    limited = codes[3].json()["error"]
    assert limited["code"] == "rate_limit_exceeded" and limited["type"] == "requests"
    assert 0 < float(codes[3].headers["retry-after"]) <= 60


def test_a_memory_saved_on_one_node_is_recalled_on_the_other(cluster: SimpleNamespace) -> None:
    a, b = (n.base_url for n in cluster.nodes)
    alice, bob = cluster.keys["alice"], cluster.keys["bob"]
    r = httpx.post(f"{a}/v1/memories", json={"text": "Alice's cat is called Pixel."}, headers=auth(alice), timeout=300)
    assert r.status_code in (200, 201), r.text
    found = httpx.get(f"{b}/v1/memories/search", params={"q": "name of my cat"}, headers=auth(alice), timeout=300)
    assert found.status_code == 200, found.text
    assert [m["text"] for m in found.json()["data"]][:1] == ["Alice's cat is called Pixel."]
    # Per-key isolation holds on the shared server: bob, on either node, finds nothing of alice's.
    for base in (a, b):
        theirs = httpx.get(f"{base}/v1/memories/search", params={"q": "cat"}, headers=auth(bob), timeout=300)
        assert theirs.status_code == 200 and theirs.json()["data"] == []


def test_a_response_stored_on_one_node_is_read_and_continued_on_the_other(cluster: SimpleNamespace) -> None:
    a, b = (n.base_url for n in cluster.nodes)
    alice, bob = auth(cluster.keys["alice"]), auth(cluster.keys["bob"])
    body = {"model": "default", "input": "Say hello.", "max_output_tokens": 8, "temperature": 0}
    first = httpx.post(f"{a}/v1/responses", json=body, headers=alice, timeout=300)
    assert first.status_code == 200, first.text
    rid = first.json()["id"]
    got = httpx.get(f"{b}/v1/responses/{rid}", headers=alice, timeout=30)
    assert got.status_code == 200 and got.json() == first.json()
    items = httpx.get(f"{b}/v1/responses/{rid}/input_items", headers=alice, timeout=30).json()
    assert [i["content"][0]["text"] for i in items["data"]] == ["Say hello."]
    chained = {**body, "input": "Again.", "previous_response_id": rid}
    second = httpx.post(f"{b}/v1/responses", json=chained, headers=alice, timeout=300)
    assert second.status_code == 200 and second.json()["previous_response_id"] == rid, second.text
    assert httpx.get(f"{a}/v1/responses/{rid}", headers=bob, timeout=30).status_code == 404
    assert httpx.delete(f"{a}/v1/responses/{rid}", headers=alice, timeout=30).status_code == 200
    assert httpx.get(f"{b}/v1/responses/{rid}", headers=alice, timeout=30).status_code == 404


def test_keys_and_usage_commands_read_the_shared_database(cluster: SimpleNamespace) -> None:
    listed = cli("keys", "list", "--json", env=cluster.env)
    assert listed.returncode == 0, listed.stderr
    assert {k["name"] for k in json.loads(listed.stdout)} == {"admin", "alice", "bob", "carol"}
    time.sleep(2.5)  # both nodes flush their counts about once a second
    usage = cli("usage", "--json", "--key", "alice", env=cluster.env)
    assert usage.returncode == 0, usage.stderr
    rows = json.loads(usage.stdout)["data"]
    agent = [r for r in rows if r["model"] == "agent"]
    assert agent and agent[0]["requests"] >= 3  # three turns, served by two nodes, in one row
    # A key revoked on the command line stops working on every node within the refresh interval.
    assert cli("keys", "revoke", "bob", env=cluster.env).returncode == 0
    time.sleep(3.0)  # each node re-reads the keys every 2 s
    for node in cluster.nodes:
        r = httpx.get(f"{node.base_url}/v1/models", headers=auth(cluster.keys["bob"]), timeout=30)
        assert r.status_code == 401, (node.base_url, r.text)


def test_doctor_checks_the_shared_parts(cluster: SimpleNamespace) -> None:
    r = cli("doctor", env={**cluster.env, "APPLIANCE_PORT": str(free_port())}, timeout=120)
    shared = [ln for ln in r.stdout.splitlines() if re.match(r"\w+\s+(database|limits|chroma) ", ln)]
    assert [ln.split()[0] for ln in shared] == ["OK", "OK", "OK"], r.stdout
    assert "schema version" in shared[0] and "PING" in shared[1] and "heartbeat" in shared[2]


def test_nginx_keeps_a_thread_on_one_node_and_fails_over_when_it_dies(cluster: SimpleNamespace) -> None:
    key, tid, url = cluster.keys["alice"], "failover", cluster.url
    rids = [uuid.uuid4().hex for _ in range(3)]
    for rid, text in zip(rids[:2], ["Remember the number 42.", "And the colour green."], strict=True):
        r = turn(url, key, tid, text, rid)
        assert r.status_code == 200, r.text
    homes = [served_by(cluster.nodes, rid) for rid in rids[:2]]
    assert all(len(h) == 1 for h in homes) and homes[0] == homes[1], "a thread's turns go to one node"
    home = homes[0][0]
    survivor = next(n for n in cluster.nodes if n is not home)
    # Requests without X-Thread-Id are spread by load, not pinned.
    plain = [f"plain-{i}-{uuid.uuid4().hex}" for i in range(4)]
    for rid in plain:
        r = httpx.get(f"{url}/v1/models", headers=auth(key, **{"X-Request-Id": rid}), verify=False, timeout=30)
        assert r.status_code == 200
    assert {id(n) for rid in plain for n in served_by(cluster.nodes, rid)} == {id(n) for n in cluster.nodes}
    # Kill the thread's node mid-conversation: the next turn goes to the other, with the history intact.
    home.stop(signal.SIGKILL)
    started = time.monotonic()
    r = turn(url, key, tid, "What did I ask you to remember?", rids[2])
    assert r.status_code == 200, r.text
    assert time.monotonic() - started < 120
    assert served_by([survivor], rids[2]) == [survivor]
    assert user_texts(url, key, tid) == [
        "Remember the number 42.",
        "And the colour green.",
        "What did I ask you to remember?",
    ]
