"""Production install: the systemd unit, the nginx site, install.sh/uninstall.sh and `appliance doctor`."""

from __future__ import annotations

import io
import itertools
import os
import re
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from appliance import doctor
from appliance.config import LlamaCppBackendSpec, OllamaBackendSpec, RemoteBackendSpec, Settings
from tests.conftest import busy_port, free_port

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "appliance.service"
GPU_DROPIN = REPO / "systemd" / "gpu.conf"
ENV_EXAMPLE = REPO / "systemd" / "appliance.env"
SITE = REPO / "nginx" / "appliance.conf"
INSTALL = REPO / "scripts" / "install.sh"
UNINSTALL = REPO / "scripts" / "uninstall.sh"
MiB = 1024 * 1024


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment of a systemd unit file, repeated keys included."""
    entries, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(path: Path, key: str) -> list[str]:
    return [v for _, k, v in unit_entries(path) if k == key]


# --- the systemd unit ------------------------------------------------------------------------------

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt-get install systemd)"
)


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at a binary that exists here (verify checks it), plus gpu.conf."""
    text = UNIT.read_text()
    text, n = re.subn(r"(?m)^ExecStart=/opt/appliance/\.venv/bin/appliance ", "ExecStart=/bin/sh ", text)
    assert n == 1, "ExecStart line changed: update this test"
    (tmp_path / "appliance.service").write_text(text)
    (tmp_path / "appliance.service.d").mkdir()
    shutil.copy(GPU_DROPIN, tmp_path / "appliance.service.d" / "gpu.conf")
    return tmp_path


def systemd_analyze(unit_dir: Path, *args: str, dropins: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0"}
    if dropins:  # the drop-in directory is only read for units found on the unit path
        env["SYSTEMD_UNIT_PATH"] = f"{unit_dir}:"
        target = "appliance.service"
    else:
        target = str(unit_dir / "appliance.service")
        shutil.rmtree(unit_dir / "appliance.service.d")
    return subprocess.run(["systemd-analyze", *args, target], capture_output=True, text=True, env=env, timeout=60)


@needs_systemd_analyze
@pytest.mark.parametrize("dropins", [False, True], ids=["unit", "unit+gpu.conf"])
def test_unit_verifies_cleanly(unit_dir: Path, dropins: bool) -> None:
    proc = systemd_analyze(unit_dir, "verify", dropins=dropins)
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "appliance" in line or "gpu.conf" in line]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("dropins", [False, True], ids=["unit", "unit+gpu.conf"])
def test_unit_security_exposure_at_most_2(unit_dir: Path, dropins: bool) -> None:
    proc = systemd_analyze(unit_dir, "security", "--offline=true", "--no-pager", dropins=dropins)
    m = re.search(r"Overall exposure level for appliance\.service: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= 2.0, proc.stdout


def test_unit_settings() -> None:
    def one(key: str) -> str:
        values = unit_values(UNIT, key)
        assert len(values) == 1, f"{key}: {values}"
        return values[0]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("User") == "appliance"
    assert one("ExecStart") == "/opt/appliance/.venv/bin/appliance serve"
    assert one("StateDirectory") == "appliance"
    assert one("ConfigurationDirectory") == "appliance"
    assert one("EnvironmentFile") == "-/etc/appliance/appliance.env"
    assert one("Restart") == "on-failure"
    env = dict(v.split("=", 1) for v in unit_values(UNIT, "Environment"))
    assert env["APPLIANCE_HOST"] == "127.0.0.1" and env["APPLIANCE_PORT"] == "8000"
    assert env["APPLIANCE_DATA_DIR"] == env["HOME"] == "/var/lib/appliance"
    assert env["HF_HUB_OFFLINE"] == "1"
    # The environment file is read after Environment= so the admin's values win.
    keys = [k for _, k, _ in unit_entries(UNIT)]
    assert keys.index("EnvironmentFile") > max(i for i, k in enumerate(keys) if k == "Environment")
    stop = one("TimeoutStopSec")
    assert stop.endswith("s") and float(stop[:-1]) > Settings.model_fields["drain_timeout"].default
    assert one("MemoryDenyWriteExecute") == "yes"
    assert one("PrivateDevices") == "yes"
    assert set(one("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}


def test_unit_bounds_and_read_only_settings() -> None:
    assert unit_values(UNIT, "WatchdogSec") == ["60s"]
    assert unit_values(UNIT, "MemoryMax") == ["90%"]
    assert unit_values(UNIT, "TasksMax") == ["1024"]
    # The keys and models files live in /etc/appliance: read-only to the service, whatever a drop-in
    # does to ProtectSystem=; only the state directory is writable.
    read_only = " ".join(unit_values(UNIT, "ReadOnlyPaths")).split()
    assert "/etc/appliance" in read_only
    assert not unit_values(UNIT, "ReadWritePaths")
    assert unit_values(UNIT, "ProtectSystem") == ["strict"] and unit_values(UNIT, "StateDirectory") == ["appliance"]
    assert "keys add" in UNIT.read_text() and "sudo" in UNIT.read_text()  # how admins change them
    env = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line.startswith("APPLIANCE_"))
    assert env["APPLIANCE_KEYS_FILE"] == "/etc/appliance/keys.toml"


def test_gpu_dropin_opens_only_nvidia_devices() -> None:
    assert unit_values(GPU_DROPIN, "PrivateDevices") == ["no"]
    assert unit_values(GPU_DROPIN, "DevicePolicy") == ["closed"]
    allowed = unit_values(GPU_DROPIN, "DeviceAllow")
    assert allowed and all("nvidia" in a for a in allowed)
    assert not unit_values(UNIT, "DeviceAllow")  # nothing opened by default


def test_env_example_names_real_settings_with_their_defaults() -> None:
    fields = Settings.model_fields
    seen = 0
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^#?APPLIANCE_([A-Z_]+)=(.*)$", line)
        if not m:
            continue
        seen += 1
        name, value = m.group(1).lower(), m.group(2)
        assert name in fields, f"appliance.env names an unknown setting APPLIANCE_{m.group(1)}"
        default = fields[name].default
        if isinstance(default, bool) or not isinstance(default, int | float | str):
            continue  # a factory or None default: the file shows an example value
        assert type(default)(value) == default, f"APPLIANCE_{m.group(1)}={value}, the default is {default}"
    assert seen >= 10


# --- the nginx site --------------------------------------------------------------------------------


def test_site_settings() -> None:
    text = SITE.read_text()
    body = re.search(r"client_max_body_size (\d+)m;", text)
    assert body and int(body.group(1)) * MiB == Settings.model_fields["max_body_bytes"].default
    assert re.search(r"upstream appliance \{[^}]*server 127\.0\.0\.1:8000;[^}]*keepalive \d+;", text)
    for directive in (
        "proxy_buffering off;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header X-Request-Id $appliance_request_id;",
        "map $http_x_request_id $appliance_request_id",
        "return 301 https://$host$request_uri;",
        "ssl_certificate     /etc/appliance/tls/fullchain.pem;",
    ):
        assert directive in text, directive
    read_timeout = re.search(r"proxy_read_timeout (\d+)s;", text)
    assert read_timeout and int(read_timeout.group(1)) >= 600
    metrics = re.search(r"location = /metrics \{([^}]*)\}", text)
    assert metrics and "allow 127.0.0.1;" in metrics.group(1) and "deny all;" in metrics.group(1)


def directive(text: str, name: str) -> list[str]:
    return [m.strip() for m in re.findall(rf"(?m)^\s*{name}\s+([^;]*);", text)]


def test_site_pins_modern_tls() -> None:
    text = SITE.read_text()
    assert directive(text, "ssl_protocols") == ["TLSv1.2 TLSv1.3"]
    (ciphers,) = directive(text, "ssl_ciphers")
    suites = ciphers.split(":")
    assert suites and all(c.startswith("ECDHE-") and ("GCM" in c or "CHACHA20" in c) for c in suites), suites
    assert directive(text, "ssl_prefer_server_ciphers") == ["off"]
    assert directive(text, "ssl_session_tickets") == ["off"]


def test_site_rate_limits() -> None:
    text = SITE.read_text()
    (req_zone,) = directive(text, "limit_req_zone")
    (conn_zone,) = directive(text, "limit_conn_zone")
    assert req_zone.startswith("$binary_remote_addr zone=appliance_req:") and re.search(r"rate=\d+r/s", req_zone)
    assert conn_zone.startswith("$binary_remote_addr zone=appliance_conn:")
    assert directive(text, "limit_req_status") == ["429"] and directive(text, "limit_conn_status") == ["429"]
    (api,) = [b for b in re.findall(r"location / \{([^}]*)\}", text) if "proxy_pass" in b]  # the HTTPS server's
    burst = re.search(r"limit_req zone=appliance_req burst=(\d+)", api)
    conns = re.search(r"limit_conn appliance_conn (\d+);", api)
    assert burst and int(burst.group(1)) >= 20 and conns and int(conns.group(1)) >= 16  # generous for streams
    assert "proxy_buffering off;" in text  # streaming stays unbuffered


# Debian puts nginx in /usr/sbin, which is not on a normal user's PATH.
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
needs_nginx = pytest.mark.skipif(
    NGINX is None or shutil.which("openssl") is None,
    reason="nginx or openssl not installed (CI: apt-get install nginx openssl)",
)


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for 127.0.0.1: fullchain.pem and privkey.pem in the returned dir."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", "/CN=127.0.0.1", "-keyout", d / "privkey.pem", "-out", d / "fullchain.pem"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return d


def render_nginx(prefix: Path, tls: Path, upstream_port: int, http_port: int, https_port: int) -> Path:
    """nginx.conf under `prefix` that includes the site, on loopback ports; returns its path."""
    site = SITE.read_text()
    for old, new in [
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};"),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;"),
        ("/etc/appliance/tls/", f"{tls}/"),
    ]:
        assert old in site, f"{old!r} not in the site: update this test"
        site = site.replace(old, new)
    site = re.sub(r"(?m)^\s*listen \[::\].*$", "", site)  # CI containers may lack IPv6
    (prefix / "appliance.conf").write_text(site)
    temps = " ".join(
        f"{kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"daemon off;\nmaster_process off;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log info;\n"
        "events { worker_connections 64; }\n"
        f"http {{\n  access_log {prefix}/access.log;\n  {temps}\n  include {prefix}/appliance.conf;\n}}\n"
    )
    return conf


@needs_nginx
def test_nginx_config_passes_nginx_t(tmp_path: Path, tls_cert: Path) -> None:
    conf = render_nginx(tmp_path, tls_cert, 8000, free_port(), free_port())
    proc = subprocess.run(
        [NGINX, "-t", "-c", conf, "-p", f"{tmp_path}/", "-e", tmp_path / "error.log"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "syntax is ok" in proc.stderr and "test is successful" in proc.stderr


@pytest.fixture
def nginx_proxy(tmp_path: Path, tls_cert: Path, appliance_server) -> Iterator[SimpleNamespace]:
    """A real nginx (child process, TLS on a free loopback port) in front of the appliance."""
    http_port, https_port = free_port(), free_port()
    conf = render_nginx(tmp_path, tls_cert, appliance_server.port, http_port, https_port)
    proc = subprocess.Popen(
        [NGINX, "-c", conf, "-p", f"{tmp_path}/", "-e", tmp_path / "error.log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", https_port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"nginx did not start:\n{(tmp_path / 'error.log').read_text()}")
                time.sleep(0.05)
        yield SimpleNamespace(url=f"https://127.0.0.1:{https_port}", http_url=f"http://127.0.0.1:{http_port}")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@needs_nginx
@pytest.mark.slow
def test_nginx_streams_incrementally(nginx_proxy: SimpleNamespace) -> None:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Count from 1 to 50"}],
        "stream": True,
        "max_tokens": 64,
        "temperature": 0,  # sampled, the answer was sometimes a few tokens long (6 events, seen in CI)
    }
    with httpx.Client(base_url=nginx_proxy.url, verify=False, timeout=120) as client:
        start = time.monotonic()
        arrivals: list[float] = []
        with client.stream("POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": "ops-e2e-1"}) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers.get("x-request-id") == "ops-e2e-1"
            for line in r.iter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.monotonic())
        assert len(arrivals) >= 8, f"only {len(arrivals)} SSE events"
        # Buffered by the proxy, the events would arrive together (in one or a few bursts) at the end; on a
        # busy machine the client may read a few at once, so count bursts (gaps over 5 ms), not events.
        spread = arrivals[-1] - arrivals[0]
        bursts = 1 + sum(1 for a, b in itertools.pairwise(arrivals) if b - a > 0.005)
        assert spread > 0.1 and bursts >= 5, (
            f"{len(arrivals)} events in {bursts} bursts over {spread:.3f}s, the first after {arrivals[0] - start:.3f}s"
        )

        # nginx makes up a request id when the client sends none (or a malformed one).
        generated = client.get("/health", headers={"X-Request-Id": "bad id\twith spaces"})
        assert re.fullmatch(r"[0-9a-f]{32}", generated.headers.get("x-request-id", "")), generated.headers

        # Bodies over client_max_body_size (4m) stop at nginx.
        big = client.post(
            "/v1/chat/completions", content=b"x" * (5 * MiB), headers={"content-type": "application/json"}
        )
        assert big.status_code == 413

    redirect = httpx.get(f"{nginx_proxy.http_url}/v1/models", follow_redirects=False, timeout=10)
    assert redirect.status_code == 301 and redirect.headers["location"].startswith("https://")


@pytest.fixture
def nginx_fake_upstream(tmp_path: Path, tls_cert: Path) -> Iterator[SimpleNamespace]:
    """nginx with the site in front of a tiny HTTP server (no model): TLS and rate-limit checks."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = f"xff={self.headers.get('X-Forwarded-For')}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    from http.server import ThreadingHTTPServer

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=upstream.serve_forever, args=(0.05,), daemon=True).start()
    https_port = free_port()
    conf = render_nginx(tmp_path, tls_cert, upstream.server_port, free_port(), https_port)
    proc = subprocess.Popen(
        [NGINX, "-c", conf, "-p", f"{tmp_path}/", "-e", tmp_path / "error.log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", https_port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"nginx did not start:\n{(tmp_path / 'error.log').read_text()}")
                time.sleep(0.05)
        yield SimpleNamespace(port=https_port, url=f"https://127.0.0.1:{https_port}")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        upstream.shutdown()


def tls_handshake(port: int, version: str, ciphers: str | None = None) -> str | None:
    """The negotiated cipher, or None if the server refuses this TLS version / cipher list."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
    if ciphers:
        ctx.set_ciphers(ciphers)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
            return tls.cipher()[0]
    except (ssl.SSLError, ConnectionResetError):
        return None


@needs_nginx
def test_nginx_tls_and_rate_limits(nginx_fake_upstream: SimpleNamespace) -> None:
    port = nginx_fake_upstream.port
    assert tls_handshake(port, "TLSv1_3") is not None
    assert tls_handshake(port, "TLSv1_2", "ECDHE-ECDSA-AES128-GCM-SHA256") == "ECDHE-ECDSA-AES128-GCM-SHA256"
    assert tls_handshake(port, "TLSv1_2", "ECDHE-ECDSA-AES128-SHA") is None  # CBC suites: refused
    assert tls_handshake(port, "TLSv1_2", "ECDHE-ECDSA-AES256-SHA384") is None

    with httpx.Client(base_url=nginx_fake_upstream.url, verify=False, timeout=10) as client:
        # The upstream sees the client's own X-Forwarded-For with nginx's view of the peer appended.
        r = client.get("/v1/models", headers={"X-Forwarded-For": "6.6.6.6"})
        assert r.status_code == 200 and r.text == "xff=6.6.6.6, 127.0.0.1"
        # Sent together, so the zone's 10 r/s refill cannot keep pace even on a slow machine (sent one by one,
        # 80 requests at 50 ms each never left the 40-request burst).
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(lambda _: client.get("/v1/models"), range(200)))
    limited = [r for r in statuses if r.status_code == 429]
    assert limited, [r.status_code for r in statuses]
    assert sum(r.status_code == 200 for r in statuses) >= 20  # the burst passes
    err = limited[0].json()["error"]
    assert err["code"] == "rate_limit_exceeded" and limited[0].headers["retry-after"] == "1"


# --- install.sh / uninstall.sh ---------------------------------------------------------------------


def run_script(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "DESTDIR"} | (env or {})
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, env=full_env, timeout=120)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("script", [INSTALL, UNINSTALL], ids=["install", "uninstall"])
def test_scripts_help_and_bad_options(script: Path) -> None:
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    shown = run_script(script, "--help")
    assert shown.returncode == 0 and "Usage:" in shown.stdout and "--root" in shown.stdout
    bad = run_script(script, "--no-such-option")
    assert bad.returncode != 0 and "unknown option" in bad.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_pass_shellcheck() -> None:
    proc = subprocess.run(["shellcheck", INSTALL, UNINSTALL], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_install_root_stages_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = run_script(INSTALL, "--root", str(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    app = root / "opt/appliance"
    assert (app / "appliance/config.py").read_bytes() == (REPO / "appliance/config.py").read_bytes()
    assert (app / "uv.lock").is_file() and (app / "systemd/appliance.service").is_file()
    for absent in (".git", ".venv", "data", ".env"):
        assert not (app / absent).exists(), absent
    assert not list(app.rglob("__pycache__"))

    unit = root / "etc/systemd/system/appliance.service"
    assert unit.read_bytes() == UNIT.read_bytes() and mode(unit) == 0o644
    env = root / "etc/appliance/appliance.env"
    assert env.read_bytes() == ENV_EXAMPLE.read_bytes() and mode(env) == 0o640
    assert (root / "var/lib/appliance").is_dir() and mode(root / "var/lib/appliance") == 0o750
    assert mode(root / "etc/appliance") == 0o750
    assert not (root / "etc/nginx").exists()
    assert not (root / "etc/systemd/system/appliance.service.d").exists()

    # Nothing of this machine (the checkout, the staging dir) is written into the files it installs.
    for f in [*(root / "etc").rglob("*"), app / "pyproject.toml"]:
        if f.is_file():
            text = f.read_text()
            assert str(REPO) not in text and str(tmp_path) not in text, f


def test_install_root_keys_and_models_files_read_only_to_the_service(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert run_script(INSTALL, "--root", str(root)).returncode == 0
    etc = root / "etc/appliance"
    keys = etc / "keys.toml"
    assert keys.is_file() and mode(keys) == 0o640 and mode(etc) == 0o750
    assert "\nAPPLIANCE_KEYS_FILE=/etc/appliance/keys.toml\n" in (etc / "appliance.env").read_text()
    assert not (etc / "models.toml").exists()  # the embedded model needs no models file
    keys.chmod(0o600)
    (etc / "models.toml").write_text("[[models]]\n")
    (etc / "models.toml").chmod(0o644)
    assert run_script(INSTALL, "--root", str(root)).returncode == 0
    assert mode(keys) == 0o640 and mode(etc / "models.toml") == 0o640  # fixed on every run
    # (Owners: root:appliance on a real host; a staged tree stays owned by whoever ran the script.)


def test_install_moves_keys_and_models_out_of_the_data_dir(tmp_path: Path) -> None:
    """An older install kept them in /var/lib/appliance, writable by the service: an upgrade moves them."""
    root = tmp_path / "root"
    assert run_script(INSTALL, "--root", str(root)).returncode == 0
    etc, data = root / "etc/appliance", root / "var/lib/appliance"
    env = etc / "appliance.env"
    old_env = "".join(line for line in env.read_text().splitlines(True) if not line.startswith("APPLIANCE_KEYS"))
    env.write_text(old_env + "APPLIANCE_PORT=9000\n")
    (etc / "keys.toml").unlink()
    (data / "keys.toml").write_text('[keys.alice]\nsha256 = "x"\n')
    (data / "keys.toml").chmod(0o600)
    (data / "models.toml").write_text("[[models]]\n")

    proc = run_script(INSTALL, "--root", str(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (data / "keys.toml").exists() and not (data / "models.toml").exists()
    assert (etc / "keys.toml").read_text() == '[keys.alice]\nsha256 = "x"\n' and mode(etc / "keys.toml") == 0o640
    assert (etc / "models.toml").read_text() == "[[models]]\n" and mode(etc / "models.toml") == 0o640
    text = env.read_text()
    assert text.startswith(old_env + "APPLIANCE_PORT=9000\n")  # the admin's edits are kept
    assert "\nAPPLIANCE_KEYS_FILE=/etc/appliance/keys.toml\n" in text
    assert "\nAPPLIANCE_MODELS_FILE=/etc/appliance/models.toml\n" in text
    assert run_script(INSTALL, "--root", str(root)).returncode == 0
    assert env.read_text() == text  # added once


def test_install_pins_uv_outside_the_system_python() -> None:
    text = INSTALL.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "--break-system-packages" not in code
    version = re.search(r"(?m)^UV_VERSION=(\d+\.\d+\.\d+)$", text)
    assert version, "install.sh pins uv with UV_VERSION=X.Y.Z"
    pip_installs = re.findall(r"(?m)^.*pip install.*$", code)
    assert pip_installs and all('"$APP/.uv/bin/python" -m pip install' in line for line in pip_installs)
    assert '"uv==$UV_VERSION"' in code and 'python3 -m venv "$APP/.uv"' in code
    assert '"$UV" "${sync_args[@]}"' in code and not re.search(r"(?m)^\s*\(?cd [^)]*&& uv ", code)
    # An upgrade keeps the uv environment like the app's own .venv.
    assert "! -name .uv" in code and "--exclude=./.uv" in code


def test_install_root_is_idempotent_and_keeps_local_edits(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert run_script(INSTALL, env={"DESTDIR": str(root)}).returncode == 0  # DESTDIR works like --root
    env = root / "etc/appliance/appliance.env"
    env.write_text(env.read_text() + "APPLIANCE_PORT=9000\n")
    stale = root / "opt/appliance/appliance/removed_in_this_version.py"
    stale.write_text("")

    proc = run_script(INSTALL, "--root", str(root), "--nginx", "--gpu", "cuda")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert env.read_text().endswith("APPLIANCE_PORT=9000\n") and "keeping" in proc.stdout
    assert not stale.exists()
    site = root / "etc/nginx/sites-available/appliance.conf"
    assert site.read_bytes() == SITE.read_bytes()
    link = root / "etc/nginx/sites-enabled/appliance.conf"
    assert link.is_symlink() and os.readlink(link) == "../sites-available/appliance.conf"
    dropin = root / "etc/systemd/system/appliance.service.d/gpu.conf"
    assert dropin.read_bytes() == GPU_DROPIN.read_bytes()
    assert "-DGGML_CUDA=on" in (root / "opt/appliance/pyproject.toml").read_text()
    if shutil.which("openssl"):
        assert mode(root / "etc/appliance/tls/privkey.pem") == 0o600

    # A plain re-run remembers --gpu cuda; an edited site is kept, the new one put next to it.
    site.write_text(site.read_text().replace("appliance.example.com", "llm.example.org"))
    assert run_script(INSTALL, "--root", str(root), "--nginx").returncode == 0
    assert dropin.is_file() and "llm.example.org" in site.read_text()
    assert (root / "etc/nginx/sites-available/appliance.conf.dist").read_bytes() == SITE.read_bytes()

    assert run_script(INSTALL, "--root", str(root), "--gpu", "cpu").returncode == 0
    assert not dropin.exists()
    assert "GGML_CUDA" not in (root / "opt/appliance/pyproject.toml").read_text()


def test_uninstall_root_keeps_data_unless_purge(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert run_script(INSTALL, "--root", str(root), "--nginx", "--gpu", "cuda").returncode == 0
    model = root / "var/lib/appliance/models/mine.gguf"
    model.parent.mkdir()
    model.write_bytes(b"GGUF")

    proc = run_script(UNINSTALL, "--root", str(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for gone in (
        "opt/appliance",
        "etc/systemd/system/appliance.service",
        "etc/systemd/system/appliance.service.d",
        "etc/nginx/sites-available/appliance.conf",
        "etc/nginx/sites-enabled/appliance.conf",
    ):
        assert not (root / gone).exists() and not (root / gone).is_symlink(), gone
    assert model.read_bytes() == b"GGUF"
    assert (root / "etc/appliance/appliance.env").is_file()

    assert run_script(UNINSTALL, "--root", str(root), "--purge").returncode == 0
    assert not (root / "var/lib/appliance").exists() and not (root / "etc/appliance").exists()


# --- appliance doctor ------------------------------------------------------------------------------


def make_settings(tmp_path: Path, models_toml: str | None = None, **kw) -> Settings:
    models_file = None
    if models_toml is not None:
        models_file = tmp_path / "models.toml"
        models_file.write_text(models_toml)
    values = {"data_dir": tmp_path / "data", "port": free_port(), "models_file": models_file, **kw}
    return Settings(_env_file=None, **values)


def run(settings: Settings | None = None, **kw) -> tuple[int, str]:
    out = io.StringIO()
    code = doctor.run_doctor(settings, out=out, **kw)
    return code, out.getvalue()


def lines(text: str, status: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(rf"{status}\s+{re.escape(name)}:", line)]


def test_doctor_all_ok_on_the_builtin_model(tmp_path: Path) -> None:
    code, text = run(make_settings(tmp_path))
    assert code == 0, text
    assert lines(text, "OK", "port") and lines(text, "OK", "data dir") and lines(text, "OK", "config")
    assert "sha256 ok" in lines(text, "OK", "model smollm2-135m-instruct")[0]
    assert not lines(text, "FAIL", ".*")


def test_doctor_fails_when_a_shared_part_is_unreachable(tmp_path: Path) -> None:
    """Several boxes: a database, Redis or Chroma server that does not answer is a FAIL naming it (the
    password never printed); with none set there are no such lines (the built-in test above)."""
    closed = free_port()
    settings = make_settings(
        tmp_path,
        database_url=f"postgresql://app:s3cret@127.0.0.1:{closed}/appliance",
        limits_url=f"redis://127.0.0.1:{closed}/0",
        memory_url=f"http://127.0.0.1:{closed}",
    )
    code, text = run(settings)
    assert code == 1
    assert lines(text, "FAIL", f"database postgresql://app:***@127.0.0.1:{closed}/appliance"), text
    assert lines(text, "FAIL", f"limits redis://127.0.0.1:{closed}/0"), text
    assert lines(text, "FAIL", f"chroma http://127.0.0.1:{closed}"), text
    assert "s3cret" not in text


def test_doctor_fails_on_a_bad_models_file(tmp_path: Path) -> None:
    code, text = run(make_settings(tmp_path, "this is [not toml"))
    assert code == 1 and lines(text, "FAIL", "config"), text


def test_doctor_fails_on_bad_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("APPLIANCE_PORT", "not-a-port")
    code, text = run(None)
    assert code == 1 and "APPLIANCE_PORT" in lines(text, "FAIL", "config")[0], text


def test_doctor_checks_model_files(tmp_path: Path) -> None:
    (tmp_path / "data/models").mkdir(parents=True)
    (tmp_path / "data/models/good.gguf").write_bytes(b"GGUF" + bytes(64))
    (tmp_path / "not-gguf.bin").write_bytes(b"PK\x03\x04")
    toml = f"""
[[models]]
id = "good"
backends = [{{ type = "llamacpp", path = "good.gguf" }}]
[[models]]
id = "missing"
backends = [{{ type = "llamacpp", path = "{tmp_path}/missing.gguf" }}]
[[models]]
id = "zip"
backends = [{{ type = "llamacpp", path = "{tmp_path}/not-gguf.bin" }}]
"""
    code, text = run(make_settings(tmp_path, toml, default_model="good"))
    assert code == 1
    assert lines(text, "OK", "model good"), text
    assert "not found" in lines(text, "FAIL", "model missing")[0]
    assert "not a GGUF" in lines(text, "FAIL", "model zip")[0]


def test_doctor_fails_on_a_checksum_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = doctor.embedded_smollm2()
    monkeypatch.setattr(doctor, "embedded_smollm2", lambda: (real[0], "0" * 64))
    code, text = run(make_settings(tmp_path))
    assert code == 1 and "sha256" in lines(text, "FAIL", "model smollm2-135m-instruct")[0], text


def test_doctor_port_free_and_busy(tmp_path: Path) -> None:
    report = Recorder()
    port = free_port()
    doctor.check_port(report, "127.0.0.1", port)
    with busy_port() as busy:
        doctor.check_port(report, "127.0.0.1", busy)
        code, text = run(make_settings(tmp_path, port=busy))
    assert report.calls[0] == ("OK", "port", f"127.0.0.1:{port} is free")
    assert report.calls[1][0] == "FAIL" and "in use" in report.calls[1][2]
    assert code == 1 and lines(text, "FAIL", "port"), text


def test_doctor_data_dir(tmp_path: Path) -> None:
    report = Recorder()
    doctor.check_data_dir(report, tmp_path)
    doctor.check_data_dir(report, tmp_path / "new" / "dir")
    (tmp_path / "file").write_text("")
    doctor.check_data_dir(report, tmp_path / "file")
    assert [c[0] for c in report.calls] == ["OK", "OK", "FAIL"], report.calls


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, status: str, name: str, message: str) -> None:
        self.calls.append((status, name, message))


def test_doctor_cpu_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c amx_tile\n\nprocessor\t: 1\n")
    flags = doctor.cpu_flags(cpuinfo)
    assert {"avx2", "fma", "f16c", "amx_tile"} <= flags
    monkeypatch.setattr(doctor.platform, "machine", lambda: "x86_64")
    report = Recorder()
    doctor.check_cpu(report, flags)
    doctor.check_cpu(report, {"sse2", "avx"})
    assert report.calls[0][0] == "OK" and "amx present" in report.calls[0][2]
    assert report.calls[1][0] == "WARN" and "avx2" in report.calls[1][2]


def test_doctor_llama_build_against_a_lesser_cpu() -> None:
    report = Recorder()
    all_flags = {flag for flag in doctor.BUILD_FEATURES.values()}
    doctor.check_llama_build(report, all_flags)
    assert report.calls[0][0] == "OK", report.calls
    if "AVX2" in report.calls[0][2]:
        doctor.check_llama_build(report, all_flags - {"avx2"})
        assert report.calls[1][0] == "FAIL" and "AVX2" in report.calls[1][2]


def test_doctor_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tmp_path)
    report = Recorder()
    monkeypatch.setenv("PATH", str(tmp_path))
    assert doctor.check_gpu(report, settings) is False and report.calls[-1][0] == "OK"
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200, 143771 MiB'\n")
    smi.chmod(0o755)
    assert doctor.check_gpu(report, settings) is True
    assert report.calls[-1][0] == "OK" and "NVIDIA H200, 143771 MiB" in report.calls[-1][2]
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert doctor.check_gpu(report, settings) is None and report.calls[-1][0] == "WARN"


def test_doctor_http_backends() -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        up = RemoteBackendSpec(type="remote", base_url=f"http://127.0.0.1:{server.server_port}/v1", model="x")
        down = OllamaBackendSpec(type="ollama", base_url=f"http://127.0.0.1:{free_port()}", model="x")
        local = LlamaCppBackendSpec(type="llamacpp", path="embedded:smollm2")
        models = SimpleNamespace(models=[SimpleNamespace(id="m", backends=[up, down, local])])
        report = Recorder()
        doctor.check_backends(report, models)
    finally:
        server.shutdown()
    assert [c[0] for c in report.calls] == ["OK", "WARN"], report.calls
    assert "HTTP 404" in report.calls[0][2]
