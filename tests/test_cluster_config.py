"""nginx/appliance-cluster.conf without running a cluster: routing by X-Thread-Id (consistent hash) or by
load, passive health checks, fail-over only on connection errors, unbuffered streaming, and `nginx -t`.
tests/test_cluster.py drives it for real in front of two nodes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.conftest import REPO
from tests.test_ops import NGINX, directive, needs_nginx, tls_cert  # noqa: F401  (a fixture)

SITE = REPO / "nginx" / "appliance-cluster.conf"


def block(text: str, head: str) -> str:
    m = re.search(re.escape(head) + r"\s*\{([^}]*)\}", text)
    assert m, head
    return m.group(1)


def test_threads_hash_to_a_node_and_the_rest_go_by_load() -> None:
    text = SITE.read_text()
    routing = block(text, "map $http_x_thread_id $appliance_upstream")
    assert re.search(r'(?m)^\s*""\s+appliance_pool;', routing)  # no header: by load
    assert re.search(r"(?m)^\s*default\s+appliance_threads;", routing)
    threads, pool = block(text, "upstream appliance_threads"), block(text, "upstream appliance_pool")
    assert "hash $http_x_thread_id consistent;" in threads and "least_conn;" in pool
    servers = [re.findall(r"(?m)^\s*server (\S+) ([^;]*);", b) for b in (threads, pool)]
    assert servers[0] == servers[1] and len(servers[0]) >= 2  # the same nodes, in the same order
    for _, params in servers[0]:
        assert re.search(r"max_fails=\d+", params) and re.search(r"fail_timeout=\d+s", params)
    assert "proxy_pass http://$appliance_upstream;" in text


def test_streaming_and_fail_over_settings() -> None:
    text = SITE.read_text()
    assert directive(text, "proxy_buffering") == ["off"]
    (read_timeout,) = directive(text, "proxy_read_timeout")
    assert int(read_timeout.rstrip("s")) >= 600
    # Connection errors and timeouts only: a node's own 503 is an answer, and POSTs are never resent
    # once sent (no `non_idempotent`).
    assert directive(text, "proxy_next_upstream") == ["error timeout"]
    assert "non_idempotent" not in text
    (connect,) = directive(text, "proxy_connect_timeout")
    assert int(connect.rstrip("s")) <= 5


@needs_nginx
def test_cluster_config_passes_nginx_t(tmp_path: Path, tls_cert: Path) -> None:  # noqa: F811
    from tests.test_cluster import render_cluster_nginx

    conf = render_cluster_nginx(tmp_path, tls_cert, [8001, 8002, 8003], 8443)
    proc = subprocess.run(
        [NGINX, "-t", "-c", conf, "-p", f"{tmp_path}/", "-e", tmp_path / "error.log"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "test is successful" in proc.stderr
    assert (tmp_path / "cluster.conf").read_text().count("server 127.0.0.1:8003 ") == 2
