"""The shared parts of several boxes, started for real on loopback for tests/test_cluster.py: a throwaway
Postgres cluster (initdb + pg_ctl as an unprivileged user when the tests run as root, since Postgres refuses
root), a Redis server, a Chroma server from the chromadb package.

A part that cannot be started is a skip with the reason outside CI, and a failure in CI (env CI=true),
where .ci/run installs them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

IN_CI = os.environ.get("CI", "").lower() == "true"


def missing(reason: str) -> None:
    """Skip (with the reason) outside CI; fail in CI, where every part must be there."""
    if IN_CI:
        pytest.fail(f"CI: {reason}")
    pytest.skip(reason)


def wait_port(port: int, proc: subprocess.Popen | None, what: str, log: Path | None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        time.sleep(0.1)
    text = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not start on port {port}:\n{text}")


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- Postgres ------------------------------------------------------------------------------------------


def pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class Postgres:
    port: int
    root: Path

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    """A Postgres cluster in a temp dir on a free port, trust auth on 127.0.0.1, removed afterwards."""
    bindir = pg_bin()
    if bindir is None:
        missing("Postgres is not installed (Debian: apt-get install postgresql; CI: .ci/run installs it)")
    assert bindir is not None
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="appliance-pg-"))
    if os.geteuid() == 0:  # Postgres refuses to run as root: run it as `nobody`
        runuser = shutil.which("runuser") or shutil.which("setpriv")
        if runuser is None:
            shutil.rmtree(root, ignore_errors=True)
            missing("running as root without runuser/setpriv: cannot start Postgres as an unprivileged user")
        import pwd

        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        as_user = (
            [runuser, "-u", "nobody", "--"]
            if runuser.endswith("runuser")
            else [runuser, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
        )
    port = free_port()
    data, log = root / "data", root / "postgres.log"
    try:
        subprocess.run(
            [*as_user, bindir / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        subprocess.run(
            [*as_user, bindir / "pg_ctl", "-D", data, "-o", opts, "-l", log, "-w", "-t", "60", "start"],
            check=True, capture_output=True, timeout=90,
        )  # fmt: skip
    except subprocess.CalledProcessError as e:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"Postgres did not start: {e.stderr.decode(errors='replace')}") from None
    try:
        yield Postgres(port, root)
    finally:
        subprocess.run(
            [*as_user, bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60
        )
        shutil.rmtree(root, ignore_errors=True)


# -- Redis ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    exe = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/local/bin")
    if exe is None:
        missing("redis-server is not installed (Debian: apt-get install redis-server; CI: .ci/run installs it)")
    port = free_port()
    log = tmp / "redis.log"
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_port(port, proc, "redis-server", log)
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop(proc)


# -- Chroma --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def chroma_server(tmp: Path) -> Iterator[str]:
    """`chroma run` from the chromadb package (its Rust server, shipped in the wheel)."""
    exe = shutil.which("chroma", path=str(Path(sys.executable).parent)) or shutil.which("chroma")
    if exe is None:
        missing("the `chroma` command of the chromadb package is not on PATH")
    port = free_port()
    log = tmp / "chroma.log"
    proc = subprocess.Popen(
        [exe, "run", "--path", tmp / "chroma", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=tmp,
    )  # fmt: skip
    try:
        wait_port(port, proc, "chroma", log, timeout=60)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/api/v2/heartbeat", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"chroma not healthy:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        stop(proc)
