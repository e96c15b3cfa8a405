"""API keys, auth, per-key limits, CORS and the loopback-only rule without keys."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.cli import main
from appliance.config import ConfigError, Settings
from appliance.security.keys import (
    KeyEntry,
    KeysFile,
    KeyStore,
    check_serve_security,
    hash_key,
    is_loopback,
    new_key,
    read_keys_file,
    write_keys_file,
)
from appliance.security.limits import RateLimiter, Window, is_generation
from tests.conftest import REPO, Server, free_port, start_server

MSG = [{"role": "user", "content": "hi"}]


# -- unit: keys file, store, limiter ------------------------------------------------------------------


def test_new_keys_are_random_and_hashed(tmp_path: Path) -> None:
    k1, k2 = new_key(), new_key()
    assert k1 != k2 and k1.startswith("sk-app-") and len(k1) >= 40
    path = tmp_path / "keys.toml"
    write_keys_file(path, KeysFile(keys={"a": KeyEntry(sha256=hash_key(k1), prefix=k1[:12], requests_per_minute=5)}))
    assert k1 not in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    store = KeyStore(path)
    assert store.enabled and len(store) == 1
    key = store.verify(k1)
    assert key is not None and key.name == "a" and key.entry.requests_per_minute == 5
    assert store.verify(k2) is None
    assert store.verify("") is None
    assert store.verify("x" * 10_000) is None


def test_keys_file_json_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    write_keys_file(path, KeysFile(keys={"svc": KeyEntry(sha256=hash_key("k"), tokens_per_minute=9)}))
    assert json.loads(path.read_text())["keys"]["svc"]["tokens_per_minute"] == 9
    assert read_keys_file(path).keys["svc"].tokens_per_minute == 9
    assert read_keys_file(tmp_path / "absent.toml").keys == {}
    bad = tmp_path / "bad.toml"
    bad.write_text('[keys.x]\nsha256 = "nothex"\n')
    with pytest.raises(ConfigError, match=r"keys\.x\.sha256"):
        read_keys_file(bad)
    bad.write_text("[keys\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        read_keys_file(bad)


def test_store_reloads_on_change_and_stays_on(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    store = KeyStore(path)
    assert not store.enabled
    k = new_key()
    write_keys_file(path, KeysFile(keys={"a": KeyEntry(sha256=hash_key(k))}))
    store.check_reload()
    assert store.enabled and store.verify(k) is not None
    path.write_text("not toml [")  # a broken edit keeps the previous keys
    store.check_reload()
    assert store.verify(k) is not None
    write_keys_file(path, KeysFile())  # every key revoked: auth stays on, nothing is accepted
    store.check_reload()
    assert store.enabled and store.verify(k) is None


def test_loopback_rule(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        assert not is_loopback(host), host
    s = Settings(data_dir=tmp_path, host="0.0.0.0")
    with pytest.raises(ConfigError, match="--allow-unauthenticated"):
        check_serve_security(s)
    check_serve_security(s.model_copy(update={"allow_unauthenticated": True}))
    check_serve_security(Settings(data_dir=tmp_path, host="127.0.0.1"))
    write_keys_file(tmp_path / "keys.toml", KeysFile(keys={"a": KeyEntry(sha256=hash_key("k"))}))
    check_serve_security(s)


def test_window_and_limiter() -> None:
    now = [1000.0]
    lim = RateLimiter(clock=lambda: now[0])
    key = KeyEntry(sha256="0" * 64, requests_per_minute=2, tokens_per_minute=100, max_concurrent_streams=1)
    assert lim.check("a", key, True) is None
    lim.begin("a", True)
    assert lim.check("a", key, True)[0] == "streams"
    assert lim.check("a", key, False) is None  # non-generation requests hold no stream
    lim.end("a", True, 150)
    kind, _, retry = lim.check("a", key, True)
    assert kind == "tokens" and 59 <= retry <= 60
    assert lim.check("a", key, False) is None  # the token budget only gates generation
    lim.begin("a", False)
    lim.end("a", False, 0)
    kind, _, retry = lim.check("a", key, False)
    assert kind == "requests" and 59 <= retry <= 60
    headers = dict(lim.headers("a", key))
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    assert headers[b"x-ratelimit-limit-tokens"] == b"100"
    now[0] += 61
    assert lim.check("a", key, True) is None
    w = Window()
    for t in range(5):
        w.add(float(t), 10)
    assert w.wait_until_below(10.0, 30) == pytest.approx(52.0)  # after t=2's event leaves: 20 < 30
    assert is_generation("POST", "/v1/chat/completions") and is_generation("POST", "/api/chat")
    assert is_generation("POST", "/v1/embeddings") and is_generation("POST", "/api/embed")  # they spend tokens too
    assert not is_generation("GET", "/v1/models") and not is_generation("GET", "/v1/usage")


def test_keys_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kf = ["--keys-file", str(tmp_path / "k.toml")]
    assert main(["keys", "add", "alice", "--rpm", "10", "--max-streams", "2", *kf]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-app-")
    assert main(["keys", "add", "alice", *kf]) == 1
    assert main(["keys", "add", "bad name", *kf]) == 2
    capsys.readouterr()
    assert main(["keys", "list", *kf]) == 0
    out = capsys.readouterr().out
    assert "alice" in out and key[:12] in out and key not in out and "10" in out
    assert hash_key(key) not in out
    assert main(["keys", "list", "--json", *kf]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "alice" and row["requests_per_minute"] == 10 and row["max_concurrent_streams"] == 2
    assert row["role"] == "admin" and row["id"].startswith("key_")  # the first key of an empty file
    assert KeyStore(tmp_path / "k.toml").verify(key).name == "alice"
    assert main(["keys", "revoke", "alice", *kf]) == 0
    assert main(["keys", "revoke", "alice", *kf]) == 1
    assert read_keys_file(tmp_path / "k.toml").keys == {}


def test_non_loopback_without_keys_exits_2(tmp_path: Path) -> None:
    env = {"APPLIANCE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "appliance.cli", "serve", "--host", "0.0.0.0", "--port", str(free_port())]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--allow-unauthenticated" in lines[0]


def test_allow_unauthenticated_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import appliance.server

    seen = []

    async def fake_serve(settings: Settings, early_worker=None) -> None:
        seen.append(settings)
        if early_worker is not None:  # `serve` spawned the model's worker before importing the HTTP layer
            early_worker.process.proc.kill()
            early_worker.process.proc.wait()

    monkeypatch.setattr(appliance.server, "serve", fake_serve)
    monkeypatch.setattr("appliance.observability.logging.setup_logging", lambda *a, **k: None)
    args = ["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)]
    assert main(args) == 2 and not seen
    assert main([*args, "--allow-unauthenticated"]) == 0
    assert seen[0].allow_unauthenticated and seen[0].host == "0.0.0.0"


# -- end to end: a server with keys, limits and CORS ------------------------------------------------------


class Keys:
    def __init__(self, server: Server, path: Path):
        self.server, self.path = server, path
        self.values: dict[str, str] = {}

    def add(self, name: str, *limits: str) -> str:
        r = subprocess.run(
            [sys.executable, "-m", "appliance.cli", "keys", "add", name, "--keys-file", str(self.path), *limits],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        self.values[name] = r.stdout.strip()
        return self.values[name]

    def headers(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.values[name]}"}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Keys]]:
    tmp = tmp_path_factory.mktemp("secured")
    keys_path = tmp / "keys.toml"
    keys = Keys(None, keys_path)  # type: ignore[arg-type]
    keys.add("admin")
    keys.add("tight", "--rpm", "3")
    keys.add("tokens", "--tpm", "20")
    keys.add("one", "--max-streams", "1")
    server = start_server(
        tmp,
        "--context-size",
        "1024",
        "--parallel",
        "2",
        env={"APPLIANCE_KEYS_FILE": str(keys_path), "APPLIANCE_CORS_ORIGINS": "https://console.example"},
    )
    keys.server = server
    yield server, keys
    server.stop()


slow = pytest.mark.slow


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    return err


@slow
def test_missing_and_wrong_keys_get_401(secured: tuple[Server, Keys]) -> None:
    server, keys = secured
    url = server.base_url
    err = _error(httpx.get(f"{url}/v1/models"), 401, "invalid_api_key")
    assert err["type"] == "invalid_request_error"
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "default", "messages": MSG})
    _error(r, 401, "invalid_api_key")
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.headers["x-request-id"]
    wrong = "sk-app-" + "x" * 43
    err = _error(httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {wrong}"}), 401, "invalid_api_key")
    assert wrong not in err["message"]
    _error(httpx.get(f"{url}/v1/models", headers={"Authorization": keys.values["admin"]}), 401, "invalid_api_key")
    r = httpx.get(f"{url}/api/tags")  # Ollama routes too, in Ollama's error shape
    assert r.status_code == 401 and set(r.json()) == {"error"} and "API key" in r.json()["error"]
    _error(httpx.get(f"{url}/no/such/route"), 401, "invalid_api_key")
    _error(httpx.get(f"{url}/metrics"), 401, "invalid_api_key")
    assert httpx.get(f"{url}/metrics", headers=keys.headers("admin")).status_code == 200


@slow
def test_open_paths_and_valid_key(secured: tuple[Server, Keys]) -> None:
    server, keys = secured
    url = server.base_url
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/openapi.json").status_code == 200
    assert httpx.get(f"{url}/v1/models", headers=keys.headers("admin")).status_code == 200
    from openai import AuthenticationError, OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=keys.values["admin"], max_retries=0)
    r = client.chat.completions.create(model="default", messages=MSG, max_tokens=4)
    assert r.choices[0].message.content is not None
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{url}/v1", api_key="sk-app-nope", max_retries=0).models.list()
    # The access log names the key, never the key itself.
    time.sleep(0.2)
    log = server.log()
    assert '"key_name": "admin"' in log
    assert all(v not in log for v in keys.values.values())
    assert "authorization" not in log.lower().replace("invalid_api_key", "")


@slow
def test_revoke_and_add_without_restart(secured: tuple[Server, Keys]) -> None:
    server, keys = secured
    url = server.base_url
    keys.add("temp")
    assert httpx.get(f"{url}/v1/models", headers=keys.headers("temp")).status_code == 200
    subprocess.run(
        [sys.executable, "-m", "appliance.cli", "keys", "revoke", "temp", "--keys-file", str(keys.path)],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    _error(httpx.get(f"{url}/v1/models", headers=keys.headers("temp")), 401, "invalid_api_key")
    assert httpx.get(f"{url}/v1/models", headers=keys.headers("admin")).status_code == 200


@slow
def test_requests_per_minute(secured: tuple[Server, Keys]) -> None:
    server, keys = secured
    h = keys.headers("tight")
    r = httpx.get(f"{server.base_url}/v1/models", headers=h)
    assert r.status_code == 200
    assert r.headers["x-ratelimit-limit-requests"] == "3" and r.headers["x-ratelimit-remaining-requests"] == "2"
    for _ in range(2):
        assert httpx.get(f"{server.base_url}/v1/models", headers=h).status_code == 200
    r = httpx.get(f"{server.base_url}/v1/models", headers=h)
    err = _error(r, 429, "rate_limit_exceeded")
    assert err["type"] == "requests"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    # /health is never limited, and other keys are not affected.
    assert httpx.get(f"{server.base_url}/health", headers=h).status_code == 200
    assert httpx.get(f"{server.base_url}/v1/models", headers=keys.headers("admin")).status_code == 200
    metrics = httpx.get(f"{server.base_url}/metrics", headers=keys.headers("admin")).text
    assert 'appliance_rate_limited_total{key="tight",limit="requests"} 1.0' in metrics


@slow
def test_tokens_per_minute(secured: tuple[Server, Keys]) -> None:
    server, keys = secured
    body = {"model": "default", "messages": MSG, "max_tokens": 4}
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=keys.headers("tokens"), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] >= 20
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=keys.headers("tokens"), timeout=60)
    err = _error(r, 429, "rate_limit_exceeded")
    assert err["type"] == "tokens"
    assert r.headers["x-ratelimit-limit-tokens"] == "20" and r.headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(r.headers["retry-after"]) >= 1
    # Listing models spends no tokens, so it still works.
    assert httpx.get(f"{server.base_url}/v1/models", headers=keys.headers("tokens")).status_code == 200


@slow
def test_max_concurrent_streams(secured: tuple[Server, Keys]) -> None:
    server, keys = secured
    h = keys.headers("one")
    # A long stream (counting rarely stops early) holds the key's one stream.
    long = {"model": "default", "prompt": "1, 2, 3, 4, 5, 6, 7,", "max_tokens": 400, "stream": True, "temperature": 0}
    body = {"model": "default", "messages": MSG, "max_tokens": 2}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=long, headers=h, timeout=60) as s:
        assert s.status_code == 200
        lines = s.iter_lines()  # one iterator: dropping an httpx line iterator closes the connection
        next(lines)  # the stream is running
        r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=h, timeout=60)
        err = _error(r, 429, "rate_limit_exceeded")
        assert err["type"] == "streams" and r.headers["retry-after"] == "1"
        r = httpx.post(f"{server.base_url}/v1/completions", json={"model": "default", "prompt": "x"}, headers=h)
        _error(r, 429, "rate_limit_exceeded")
        # Requests that generate nothing are not held back by it.
        assert httpx.get(f"{server.base_url}/v1/models", headers=h).status_code == 200
    # Leaving the stream (the client disconnects) frees the key's stream within moments.
    deadline = time.monotonic() + 30
    while True:
        r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=h, timeout=60)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text


@slow
def test_cors(secured: tuple[Server, Keys]) -> None:
    server, keys = secured
    pre = {
        "Origin": "https://console.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    r = httpx.options(f"{server.base_url}/v1/chat/completions", headers=pre)  # preflights carry no key
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://console.example"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.options(f"{server.base_url}/v1/chat/completions", headers={**pre, "Origin": "https://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.get(
        f"{server.base_url}/v1/models", headers={"Origin": "https://console.example", **keys.headers("admin")}
    )
    assert r.headers["access-control-allow-origin"] == "https://console.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    # Without a key the 401 still carries CORS headers, so a browser can read it.
    r = httpx.get(f"{server.base_url}/v1/models", headers={"Origin": "https://console.example"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://console.example"


@slow
def test_cors_is_off_by_default(appliance_server: Server) -> None:
    r = httpx.get(f"{appliance_server.base_url}/v1/models", headers={"Origin": "https://console.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
