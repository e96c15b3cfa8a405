"""Key roles and ids: admin / user / metrics, the first key an admin, legacy files as users, a stable id per
key (a name revoked and added again starts empty), and per-owner thread ids (no existence oracle).

Fast tier: create_app() with a scripted backend and fake embedder through httpx.ASGITransport. Slow tier:
a real server with real keys over HTTP.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.app import create_app
from appliance.cli import main
from appliance.config import ConfigError, Settings
from appliance.security.keys import KeyStore, derived_key_id, read_keys_file
from appliance.security.limits import key_label
from tests.conftest import REPO, Server, start_server
from tests.fakes import FakeEmbedder, Scripted

CHAT = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
UNLOAD = {"model": "default", "prompt": "", "keep_alive": 0}
LEGACY = """\
[keys.old]
sha256 = "{h1}"
prefix = "sk-app-old"

[keys."old.two"]
sha256 = "{h2}"
requests_per_minute = 5
"""


# -- fakes and helpers -------------------------------------------------------------------------------


def add_key(keys_file: Path, name: str, *args: str) -> str:
    """`appliance keys add` in process; the key it prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["keys", "add", name, "--keys-file", str(keys_file), *args]) == 0
    return out.getvalue().strip()


def revoke_key(keys_file: Path, name: str) -> None:
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(["keys", "revoke", name, "--keys-file", str(keys_file)]) == 0


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def settings_for(tmp: Path, **kw: Any) -> Settings:
    kw.setdefault("agent_enabled", False)
    return Settings(data_dir=tmp / "data", embeddings_preload=False, keys_file=tmp / "keys.toml", **kw)


@contextlib.asynccontextmanager
async def client(settings: Settings, **app_kw: Any) -> AsyncIterator[httpx.AsyncClient]:
    backend = Scripted()
    app = create_app(
        settings, backend_factories={"llamacpp": lambda model_id, spec: backend}, embeddings=FakeEmbedder(), **app_kw
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://appliance") as c:
            c.backend = backend  # type: ignore[attr-defined]
            c.app = app  # type: ignore[attr-defined]
            yield c


def forbidden(r: httpx.Response) -> dict:
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "forbidden"
    return err


# -- the keys file: roles and ids ------------------------------------------------------------------


def test_first_key_is_admin_later_ones_users(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kf = tmp_path / "keys.toml"
    add_key(kf, "first")
    add_key(kf, "second")
    add_key(kf, "prom", "--role", "metrics")
    add_key(kf, "boss", "--role", "admin")
    doc = read_keys_file(kf)
    assert {n: e.role for n, e in doc.keys.items()} == {
        "first": "admin",
        "second": "user",
        "prom": "metrics",
        "boss": "admin",
    }
    ids = [e.id for e in doc.keys.values()]
    assert all(i and i.startswith("key_") for i in ids) and len(set(ids)) == 4
    # an explicit role on an empty file wins over the default
    kf2 = tmp_path / "k2.toml"
    add_key(kf2, "only", "--role", "user")
    assert read_keys_file(kf2).keys["only"].role == "user"
    capsys.readouterr()
    assert main(["keys", "list", "--json", "--keys-file", str(kf)]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["prom"]["role"] == "metrics" and rows["first"]["id"] == doc.keys["first"].id
    assert main(["keys", "list", "--keys-file", str(kf)]) == 0
    out = capsys.readouterr().out
    assert "ROLE" in out and "metrics" in out and doc.keys["boss"].id in out
    with pytest.raises(SystemExit):  # argparse refuses an unknown role
        main(["keys", "add", "x", "--role", "root", "--keys-file", str(kf)])
    capsys.readouterr()
    # `keys role` changes a role, keeping the id
    assert main(["keys", "role", "second", "admin", "--keys-file", str(kf)]) == 0
    assert read_keys_file(kf).keys["second"].role == "admin"
    assert read_keys_file(kf).keys["second"].id == doc.keys["second"].id
    assert main(["keys", "role", "nobody", "admin", "--keys-file", str(kf)]) == 1


def test_legacy_keys_file_loads_as_users(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    kf = tmp_path / "keys.toml"
    text = LEGACY.format(h1="1" * 64, h2="2" * 64)
    kf.write_text(text)
    with caplog.at_level(logging.WARNING, logger="appliance.security"):
        store = KeyStore(kf)
    lines = [r.getMessage() for r in caplog.records if "no role" in r.getMessage()]
    assert len(lines) == 1 and "'user'" in lines[0] and "old, old.two" in lines[0]
    caplog.clear()
    store.check_reload()
    assert not [r for r in caplog.records if "no role" in r.getMessage()]  # said once, not per request
    entry = store.get("old")
    assert entry is not None and entry.effective_role == "user" and entry.role is None
    # the id of a legacy entry is derived from its hash: the same on every load, different per key
    assert entry.key_id == derived_key_id("1" * 64) == KeyStore(kf).get("old").key_id
    assert store.get("old.two").key_id != entry.key_id
    assert kf.read_text() == text  # loading never rewrites the file
    # the next write stores id and role, unchanged
    add_key(kf, "new")
    doc = read_keys_file(kf)
    assert doc.keys["old"].id == derived_key_id("1" * 64) and doc.keys["old"].role == "user"
    assert doc.keys["old.two"].requests_per_minute == 5
    assert doc.keys["new"].role == "user"  # the file was not empty: not the first key
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="appliance.security"):
        KeyStore(kf)
    assert not [r for r in caplog.records if "no role" in r.getMessage()]


def test_duplicate_ids_and_bad_roles_are_refused(tmp_path: Path) -> None:
    kf = tmp_path / "keys.toml"
    same = 'id = "key_00000000"'
    kf.write_text(f'[keys.a]\nsha256 = "{"1" * 64}"\n{same}\n\n[keys.b]\nsha256 = "{"2" * 64}"\n{same}\n')
    with pytest.raises(ConfigError, match="same id"):
        read_keys_file(kf)
    kf.write_text(f'[keys.a]\nsha256 = "{"1" * 64}"\nrole = "root"\n')
    with pytest.raises(ConfigError, match=r"keys\.a\.role"):
        read_keys_file(kf)


def test_readded_name_gets_a_new_id(tmp_path: Path) -> None:
    kf = tmp_path / "keys.toml"
    add_key(kf, "admin")
    add_key(kf, "bob")
    old = read_keys_file(kf).keys["bob"].id
    revoke_key(kf, "bob")
    add_key(kf, "bob")
    new = read_keys_file(kf).keys["bob"].id
    assert old and new and old != new


def test_key_labels_are_bounded() -> None:
    assert key_label("alice", 3) == "alice" and key_label("alice", 100) == "alice"
    assert key_label("alice", 101) == "other"


# -- over HTTP (fast): what each role may do ------------------------------------------------------------


@pytest.fixture
def three_keys(tmp_path: Path) -> dict[str, str]:
    kf = tmp_path / "keys.toml"
    return {
        "admin": add_key(kf, "root"),  # the first key: an admin
        "user": add_key(kf, "alice"),
        "metrics": add_key(kf, "prom", "--role", "metrics"),
    }


async def test_roles_over_http(tmp_path: Path, three_keys: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    admin, user, metrics = (bearer(three_keys[r]) for r in ("admin", "user", "metrics"))
    async with client(settings_for(tmp_path)) as c:
        # an ordinary key: inference yes, admin actions no
        assert (await c.get("/v1/models", headers=user)).status_code == 200
        with caplog.at_level(logging.INFO, logger="appliance.access"):
            assert (await c.post("/v1/chat/completions", json=CHAT, headers=user)).status_code == 200
        fields = [getattr(r, "fields", {}) for r in caplog.records if r.name == "appliance.access"]
        assert fields[-1]["key_name"] == "alice"  # the name in the log, not the id
        err = forbidden(await c.get("/metrics", headers=user))
        assert "admin" in err["message"]
        forbidden(await c.get("/health", params={"verbose": 1}, headers=user))
        r = await c.post("/api/generate", json=UNLOAD, headers=user)
        assert r.status_code == 403 and c.backend.unloaded == 0
        # the request reached the model with the key's id as its principal
        assert c.backend.seen[-1].principal == c.app.state.keys.get("alice").key_id

        # a metrics key: only /metrics
        assert (await c.get("/metrics", headers=metrics)).status_code == 200
        forbidden(await c.get("/v1/models", headers=metrics))
        forbidden(await c.post("/v1/chat/completions", json=CHAT, headers=metrics))
        forbidden(await c.get("/v1/usage", headers=metrics))
        r = await c.get("/api/tags", headers=metrics)
        assert r.status_code == 403 and set(r.json()) == {"error"}  # Ollama's shape on /api/*
        assert len(c.backend.seen) == 1

        # an admin may do all of it
        r = await c.get("/metrics", headers=admin)
        assert r.status_code == 200 and "appliance_" in r.text
        doc = (await c.get("/health", params={"verbose": 1}, headers=admin)).json()
        assert doc["status"] == "ok" and doc["models"]
        r = await c.post("/api/generate", json=UNLOAD, headers=admin)
        assert r.status_code == 200 and r.json()["done_reason"] == "unload" and c.backend.unloaded == 1

        # without a key: /health is plain (verbose is ignored), everything else 401
        doc = (await c.get("/health", params={"verbose": 1})).json()
        assert doc == {"status": "ok"}
        assert (await c.get("/health", params={"verbose": 1}, headers=bearer("sk-app-wrong"))).json() == doc
        assert (await c.get("/metrics")).status_code == 401


async def test_metrics_public_and_no_keys(tmp_path: Path, three_keys: dict[str, str]) -> None:
    async with client(settings_for(tmp_path, metrics_public=True)) as c:
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.get("/metrics", headers=bearer(three_keys["user"]))).status_code == 200
        forbidden(await c.get("/v1/models", headers=bearer(three_keys["metrics"])))
    # no keys configured (a loopback install): everyone is the admin
    bare = tmp_path / "bare"
    async with client(settings_for(bare)) as c:
        assert (await c.get("/metrics")).status_code == 200
        assert "models" in (await c.get("/health", params={"verbose": 1})).json()
        assert (await c.post("/api/generate", json=UNLOAD)).status_code == 200 and c.backend.unloaded == 1
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert c.backend.seen[-1].principal is None


async def test_role_change_applies_without_restart(tmp_path: Path, three_keys: dict[str, str]) -> None:
    user = bearer(three_keys["user"])
    async with client(settings_for(tmp_path)) as c:
        forbidden(await c.get("/metrics", headers=user))
        with contextlib.redirect_stderr(io.StringIO()):
            assert main(["keys", "role", "alice", "metrics", "--keys-file", str(tmp_path / "keys.toml")]) == 0
        assert (await c.get("/metrics", headers=user)).status_code == 200
        forbidden(await c.get("/v1/models", headers=user))


# -- threads and memories belong to the key's id ----------------------------------------------------------


async def test_threads_and_memories_belong_to_the_id_not_the_name(tmp_path: Path) -> None:
    pytest.importorskip("langgraph")
    from tests.test_agent_graph import ScriptedModel

    model = ScriptedModel()
    kf = tmp_path / "keys.toml"
    add_key(kf, "root")
    bob = bearer(add_key(kf, "bob"))
    carol = bearer(add_key(kf, "carol"))
    s = settings_for(tmp_path, agent_enabled=True)
    async with client(s, agent_model_factory=lambda model_id, req: model) as c:
        body = {"model": "agent", "messages": [{"role": "user", "content": "my secret is 1234"}]}
        r = await c.post("/v1/chat/completions", json=body, headers={**bob, "X-Thread-Id": "t1"})
        assert r.status_code == 200, r.text
        r = await c.post("/v1/memories", json={"text": "Bob's locker code is 1234."}, headers=bob)
        assert r.status_code == 201
        assert [t["id"] for t in (await c.get("/v1/threads", headers=bob)).json()["data"]] == ["t1"]
        assert (await c.get("/v1/threads/t1", headers=bob)).status_code == 200

        # another key's thread id is indistinguishable from a new one: no 403 oracle, no content
        missing = await c.get("/v1/threads/t1", headers=carol)
        never = await c.get("/v1/threads/t-never", headers=carol)
        assert missing.status_code == never.status_code == 404
        assert missing.json()["error"]["message"] == "No thread 't1'."
        assert missing.json()["error"]["code"] == never.json()["error"]["code"] == "thread_not_found"
        body2 = {"model": "agent", "messages": [{"role": "user", "content": "what is in this thread?"}]}
        r = await c.post("/v1/chat/completions", json=body2, headers={**carol, "X-Thread-Id": "t1"})
        assert r.status_code == 200 and r.headers["x-thread-id"] == "t1"
        assert "1234" not in model.prompt_text()
        mine = (await c.get("/v1/threads/t1", headers=carol)).json()
        assert [m["content"] for m in mine["messages"] if m["role"] == "user"] == ["what is in this thread?"]
        assert (await c.delete("/v1/threads/t1", headers=carol)).status_code == 200
        assert (await c.get("/v1/threads/t1", headers=bob)).status_code == 200  # bob's is untouched

        # bob is revoked; a new key named bob starts empty
        revoke_key(kf, "bob")
        assert (await c.get("/v1/threads", headers=bob)).status_code == 401
        bob2 = bearer(add_key(kf, "bob"))
        assert (await c.get("/v1/threads", headers=bob2)).json()["data"] == []
        assert (await c.get("/v1/threads/t1", headers=bob2)).status_code == 404
        assert (await c.get("/v1/memories", headers=bob2)).json()["data"] == []
        hits = (await c.get("/v1/memories/search", params={"q": "locker code"}, headers=bob2)).json()["data"]
        assert hits == []
        # `user` may name the key itself (its name or id), nobody else
        assert (await c.get("/v1/memories", params={"user": "bob"}, headers=bob2)).status_code == 200
        forbidden(await c.get("/v1/memories", params={"user": "carol"}, headers=bob2))


async def test_threads_stored_before_namespacing_are_renamed(tmp_path: Path) -> None:
    pytest.importorskip("langgraph")
    from appliance.agent.threads import ThreadStore, stored_id

    path = tmp_path / "threads.sqlite"
    store = ThreadStore(path)
    await store.open()
    try:  # what an older version left: a bare id, and checkpoints under it
        await store.conn.execute(
            "INSERT INTO threads (id, scope, model, title, created_at, updated_at)"
            " VALUES ('t1', 'alice', 'm', 'x', 1, 1)"
        )
        await store.conn.execute(
            "INSERT INTO checkpoints (thread_id, checkpoint_ns, checkpoint_id) VALUES ('t1', '', 'c1')"
        )
        await store.conn.commit()
    finally:
        await store.close()
    store = ThreadStore(path)
    await store.open()
    try:
        meta = await store.get(stored_id("alice", "t1"))
        assert meta is not None and meta.thread_id == "t1" and meta.to_dict()["id"] == "t1"
        assert await store.get("t1") is None
        assert (await store.find("t1", "alice")).id == "alice:t1" and await store.find("t1", "bob") is None
        assert (await store.find("t1", None)).scope == "alice"  # no keys, no user: any owner's
        async with store.conn.execute("SELECT thread_id FROM checkpoints") as cur:
            assert [r[0] for r in await cur.fetchall()] == ["alice:t1"]
    finally:
        await store.close()


# -- slow: a real server with real keys ---------------------------------------------------------------------


slow = pytest.mark.slow


class CliKeys:
    def __init__(self, path: Path):
        self.path = path
        self.values: dict[str, str] = {}

    def add(self, name: str, *args: str) -> None:
        r = subprocess.run(
            [sys.executable, "-m", "appliance.cli", "keys", "add", name, "--keys-file", str(self.path), *args],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        self.values[name] = r.stdout.strip()

    def h(self, name: str) -> dict[str, str]:
        return bearer(self.values[name])


@pytest.fixture(scope="module")
def roles_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, CliKeys]]:
    tmp = tmp_path_factory.mktemp("roles")
    keys = CliKeys(tmp / "keys.toml")
    keys.add("boss")  # first: admin
    keys.add("worker")  # user
    keys.add("prom", "--role", "metrics")
    server = start_server(tmp, "--context-size", "1024", env={"APPLIANCE_KEYS_FILE": str(keys.path)})
    yield server, keys
    server.stop()


@slow
def test_ordinary_key_cannot_do_admin_actions(roles_server: tuple[Server, CliKeys]) -> None:
    server, keys = roles_server
    url = server.base_url
    user, admin = keys.h("worker"), keys.h("boss")
    r = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}, headers=user, timeout=60)
    assert r.status_code == 200, r.text
    forbidden(httpx.get(f"{url}/metrics", headers=user))
    forbidden(httpx.get(f"{url}/health", params={"verbose": 1}, headers=user))
    r = httpx.post(f"{url}/api/generate", json=UNLOAD, headers=user, timeout=60)
    assert r.status_code == 403, r.text
    # the model is still loaded: the next request needs no reload
    assert httpx.get(f"{url}/health", params={"verbose": 1}, headers=admin).json()["models"][0]["backends"][0]["loaded"]
    assert httpx.get(f"{url}/health", params={"verbose": 1}).json() == {"status": "ok"}
    assert httpx.get(f"{url}/metrics", headers=admin).status_code == 200
    r = httpx.post(f"{url}/api/generate", json=UNLOAD, headers=admin, timeout=60)
    assert r.status_code == 200 and r.json()["done_reason"] == "unload"


@slow
def test_metrics_key_reads_only_metrics(roles_server: tuple[Server, CliKeys]) -> None:
    server, keys = roles_server
    url = server.base_url
    forbidden(httpx.get(f"{url}/v1/models", headers=keys.h("prom")))
    r = httpx.get(f"{url}/metrics", headers=keys.h("prom"))
    assert r.status_code == 200 and "appliance_info" in r.text
    assert "auth: on, 3 API keys (1 admin, 1 user, 1 metrics)" in server.log()
