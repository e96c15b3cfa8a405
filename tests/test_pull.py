"""Getting models: `appliance models pull` and Ollama's /api/pull, /api/delete, /api/copy.

Every download comes from a loopback HTTP server (`FileServer`): it serves files with Range support, can cut
the first response short (an interrupted download), and can answer like Hugging Face (a redirect carrying
X-Linked-Etag, the file's sha256). Fast tier: a small GGUF header padded to a few MB, the real `ollama`
client against create_app() over ASGI. Slow tier: the embedded SmolLM2 GGUF pulled into a real server and
chatted with.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import socket
import struct
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from appliance.app import create_app
from appliance.catalog import embedded_smollm2
from appliance.cli import main
from appliance.config import Settings
from appliance.models_pull import PullError, pull, resolve
from tests.conftest import free_port, start_server
from tests.fakes import FakeEmbedder, Scripted


def tiny_gguf(pad: int = 3 << 20) -> bytes:
    """A GGUF v3 header naming an architecture, then `pad` bytes: what the pull checks, at test size."""

    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x)) + x.encode()

    kv = s("general.architecture") + struct.pack("<I", 8) + s("llama")
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv + os.urandom(pad)


class FileServer:
    """Files by URL path; `cut`: the first GET ends after that many bytes; `hf`: /o/r/resolve/<rev>/<file>
    redirects (302 with X-Linked-Etag) to /cdn/<file>. `ranges` records the Range headers seen."""

    def __init__(self, files: dict[str, Path | bytes], cut: int | None = None, hf_sha: dict[str, str] | None = None):
        self.files, self.cut, self.hf_sha = files, cut, hf_sha or {}
        self.ranges: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None: ...

            def do_GET(self) -> None:
                if "/resolve/" in self.path:
                    name = self.path.rsplit("/", 1)[-1]
                    self.send_response(302)
                    self.send_header("Location", f"/cdn/{name}")
                    if name in outer.hf_sha:
                        self.send_header("X-Linked-Etag", f'"{outer.hf_sha[name]}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = outer.files.get(self.path.removeprefix("/cdn"))
                if data is None:
                    self.send_error(404)
                    return
                blob = data.read_bytes() if isinstance(data, Path) else data
                rng = self.headers.get("Range")
                outer.ranges.append(rng)
                start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
                if start >= len(blob):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(blob)}")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
                self.send_header("Content-Length", str(len(blob) - start))
                self.end_headers()
                body = blob[start:]
                if outer.cut is not None:
                    body, outer.cut = body[: outer.cut], None
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-file
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[FileServer] = []

    def start(*args: Any, **kw: Any) -> FileServer:
        servers.append(FileServer(*args, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=tmp_path,
        agent_enabled=False,
        embeddings_preload=False,
        keys_file=tmp_path / "keys.toml",
        **kw,
    )


def models_file(tmp_path: Path) -> dict:
    return tomllib.loads((tmp_path / "models.toml").read_text())


# -- fast: sources ----------------------------------------------------------------------------------------


def test_resolve_sources() -> None:
    hf = resolve("bartowski/Qwen-GGUF/sub/q4.gguf@v1.0", {"HF_ENDPOINT": "http://mirror.local/"})
    assert hf.url == "http://mirror.local/bartowski/Qwen-GGUF/resolve/v1.0/sub/q4.gguf" and hf.filename == "q4.gguf"
    assert hf.hf and hf.alias is None  # '@' is not allowed in a model name
    plain = resolve("hf.co/o/r/m.gguf", {})
    assert plain.url == "https://huggingface.co/o/r/resolve/main/m.gguf" and plain.alias == "hf.co/o/r/m.gguf"
    url = resolve("https://example.com/x/My-Model.Q4.gguf?download=1", {})
    assert (url.filename, url.alias, url.hf) == ("My-Model.Q4.gguf", None, False)
    for bad in ("llama3", "o/r", "o/r/notes.txt", "https://example.com/", "o/../r/m.gguf", "file:///etc/m.gguf"):
        with pytest.raises(PullError) as e:
            resolve(bad, {})
        assert e.value.status == 400


# -- fast: the download -------------------------------------------------------------------------------------


async def test_interrupted_pull_resumes_and_verifies(tmp_path, serve) -> None:
    blob = tiny_gguf()
    digest = hashlib.sha256(blob).hexdigest()
    srv = serve({"/m-Q4.gguf": blob}, cut=1 << 20, hf_sha={"m-Q4.gguf": digest})
    s = settings(tmp_path)
    env = {"HF_ENDPOINT": srv.url}
    with pytest.raises(PullError) as e:
        await pull(s, "acme/m-GGUF/m-Q4.gguf", env=env)
    assert e.value.status in (502, 503) and "resume" in str(e.value)
    partial = tmp_path / "models" / ".m-Q4.gguf.partial"
    assert partial.stat().st_size == 1 << 20 and not (tmp_path / "models" / "m-Q4.gguf").exists()
    seen: list[tuple[str, int, int | None]] = []
    spec, pulled = await pull(s, "acme/m-GGUF/m-Q4.gguf", env=env, progress=lambda *a: seen.append(a))
    assert srv.ranges == [None, f"bytes={1 << 20}-"]  # the second request asked only for the rest
    assert pulled.sha256 == digest and pulled.path.read_bytes() == blob and not partial.exists()
    statuses = [st for st, *_ in seen]
    assert {d for st, _, _, d in seen if st.startswith("downloading")} == {f"sha256:{digest}"}
    assert statuses[0] == "pulling manifest" and statuses[-3:] == [
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]
    downloading = [(done, total) for st, done, total, _ in seen if st.startswith("downloading")]
    assert downloading[0] == (1 << 20, len(blob)) and downloading[-1] == (len(blob), len(blob))
    [entry] = [m for m in models_file(tmp_path)["models"] if m["id"] == "m-q4"]
    assert entry["aliases"] == ["acme/m-GGUF/m-Q4.gguf"]
    assert entry["backends"] == [{"type": "llamacpp", "path": "m-Q4.gguf", "sha256": digest}]
    assert spec.id == "m-q4"


async def test_sha256_mismatch_and_not_a_gguf(tmp_path, serve) -> None:
    blob = tiny_gguf(1000)
    srv = serve({"/a.gguf": blob, "/b.gguf": b"not a model" * 100})
    s = settings(tmp_path)
    with pytest.raises(PullError) as e:
        await pull(s, f"{srv.url}/a.gguf", sha256="0" * 64)
    assert e.value.status == 502 and "sha256 mismatch" in str(e.value)
    with pytest.raises(PullError) as e:
        await pull(s, f"{srv.url}/b.gguf")
    assert e.value.status == 400 and "GGUF" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == []  # nothing left behind
    assert not (tmp_path / "models.toml").exists()


async def test_offline_is_a_clear_error(tmp_path) -> None:
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    with pytest.raises(PullError) as e:
        await pull(settings(tmp_path), "acme/m/m.gguf", env=env)
    assert e.value.status == 503 and "cannot reach 127.0.0.1" in str(e.value) and "HF_ENDPOINT" in str(e.value)


async def test_partial_symlink_is_not_followed(tmp_path, serve) -> None:
    srv = serve({"/a.gguf": tiny_gguf(1000)})
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / ".a.gguf.partial").symlink_to(target)
    with pytest.raises(PullError):
        await pull(settings(tmp_path), f"{srv.url}/a.gguf")
    assert target.read_text() == "keep"


def test_cli_pull(tmp_path, serve) -> None:
    blob = tiny_gguf(1 << 20)
    srv = serve({"/cli.gguf": blob})
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(
            [
                "models",
                "pull",
                f"{srv.url}/cli.gguf",
                "--id",
                "mine",
                "--data-dir",
                str(tmp_path),
                "--sha256",
                hashlib.sha256(blob).hexdigest(),
            ]
        )
    assert rc == 0, err.getvalue()
    assert out.getvalue().startswith("pulled mine:") and "success" in err.getvalue()
    assert (tmp_path / "models" / "cli.gguf").read_bytes() == blob
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main(["models", "pull", "not a source", "--data-dir", str(tmp_path)]) == 1


# -- fast: the Ollama API, with the ollama client -------------------------------------------------------------


@contextlib.asynccontextmanager
async def appliance(tmp_path: Path, **kw: Any):
    s = settings(tmp_path, **kw)
    backend = Scripted()
    app = create_app(s, backend_factories={"llamacpp": lambda mid, spec: backend}, embeddings=FakeEmbedder())
    async with app.router.lifespan_context(app):
        yield app, ollama.AsyncClient(host="http://x", transport=httpx.ASGITransport(app=app))


async def test_api_pull_copy_delete(tmp_path, serve, monkeypatch) -> None:
    blob = tiny_gguf()
    srv = serve({"/p.gguf": blob}, hf_sha={"p.gguf": hashlib.sha256(blob).hexdigest()})
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    async with appliance(tmp_path) as (_app, client):
        lines = [p async for p in await client.pull("acme/p/p.gguf", stream=True)]
        names = [m.model for m in (await client.list()).models]
        r = await client.chat(model="acme/p/p.gguf", messages=[{"role": "user", "content": "hi"}])
        await client.copy("p", "p-copy")
        copied = [m.model for m in (await client.list()).models]
        await client.delete("p")
        after = [m.model for m in (await client.list()).models]
        kept = (tmp_path / "models" / "p.gguf").exists()  # p-copy still uses the file
        with pytest.raises(ollama.ResponseError) as e:
            await client.delete("p")
        assert e.value.status_code == 404
        await client.delete("p-copy")
    statuses = [ln.status for ln in lines]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success" and "verifying sha256 digest" in statuses
    dl = [ln for ln in lines if ln.status.startswith("downloading")]
    assert dl and dl[-1].completed == dl[-1].total == len(blob) and dl[0].digest.startswith("sha256:")
    assert "p" in names and r.message.content == "Hello"
    assert "p-copy" in copied and "p" not in after and "p-copy" in after and kept
    assert not (tmp_path / "models" / "p.gguf").exists()  # the last entry using it went: the file too
    assert {m["id"] for m in models_file(tmp_path)["models"]} == {"smollm2-135m-instruct"}


async def test_api_pull_errors(tmp_path, serve) -> None:
    srv = serve({})
    async with appliance(tmp_path) as (_app, client):
        with pytest.raises(ollama.ResponseError) as e:
            await client.pull("llama3", stream=False)
        assert e.value.status_code == 400
        with pytest.raises(ollama.ResponseError) as e:
            [p async for p in await client.pull(f"{srv.url}/missing.gguf", stream=True)]
        assert "not found" in str(e.value)
        with pytest.raises(ollama.ResponseError) as e:
            await client.delete("smollm2-135m-instruct")
        assert e.value.status_code == 400 and "default" in str(e.value)


async def test_api_pull_is_admin_only(tmp_path) -> None:
    keys = tmp_path / "keys.toml"
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
        assert main(["keys", "add", "admin", "--keys-file", str(keys)]) == 0  # the first key is the admin
        assert main(["keys", "add", "u", "--keys-file", str(keys), "--role", "user"]) == 0
    user = out.getvalue().split()[-1]
    async with appliance(tmp_path) as (app, _):
        c = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x")
        h = {"Authorization": f"Bearer {user}"}
        r = await c.post("/api/pull", json={"model": "o/r/m.gguf"}, headers=h)
        d = await c.request("DELETE", "/api/delete", json={"model": "default"}, headers=h)
        cp = await c.post("/api/copy", json={"source": "default", "destination": "x"}, headers=h)
    assert r.status_code == d.status_code == cp.status_code == 403
    assert set(r.json()) == {"error"}


# -- slow: the real model, pulled into a running server ---------------------------------------------------------


@pytest.mark.slow
def test_pull_real_gguf_into_running_server(tmp_path, serve) -> None:
    src, digest = embedded_smollm2()
    copy = tmp_path / "SmolLM2-copy.gguf"
    shutil.copyfile(src, copy)
    srv = serve(
        {"/smol.gguf": copy},
        cut=20 << 20,
        hf_sha={"smol.gguf": digest or hashlib.sha256(copy.read_bytes()).hexdigest()},
    )
    server = start_server(tmp_path / "srv", env={"HF_ENDPOINT": srv.url, "APPLIANCE_AGENT_ENABLED": "false"})
    try:
        client = ollama.Client(host=server.base_url)
        with pytest.raises(ollama.ResponseError):
            list(client.pull("acme/smol/smol.gguf", stream=True))  # cut after 20 MB
        lines = list(client.pull("acme/smol/smol.gguf", stream=True))  # resumes
        assert lines[-1].status == "success" and srv.ranges[-1] == f"bytes={20 << 20}-"
        r = client.chat(
            model="acme/smol/smol.gguf",
            messages=[{"role": "user", "content": "Say hi"}],
            options={"num_predict": 8, "temperature": 0},
        )
        assert r.message.content.strip()
        assert (server.data_dir / "models" / "smol.gguf").stat().st_size == copy.stat().st_size
    finally:
        server.stop()
