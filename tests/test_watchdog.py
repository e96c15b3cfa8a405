"""systemd's watchdog: the server pings WATCHDOG=1 from its event loop, so a blocked loop stops the pings.

A fake NOTIFY_SOCKET (a real AF_UNIX datagram socket) receives what `sd_notify` sends.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time

import pytest

from appliance import server


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def _received(sock: socket.socket) -> list[tuple[float, str]]:
    out = []
    while True:
        try:
            out.append((time.monotonic(), sock.recv(4096).decode()))
        except BlockingIOError:
            return out


def test_interval_from_systemd_environment(monkeypatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert server.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert server.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert server.watchdog_interval() is None


async def test_pings_stop_while_the_loop_is_blocked(notify_socket) -> None:
    stamps: list[float] = []

    def notify(msg: str) -> bool:
        stamps.append(time.monotonic())
        return server.sd_notify(msg)

    task = asyncio.create_task(server.feed_watchdog(0.05, notify))
    await asyncio.sleep(0.3)
    time.sleep(0.6)  # a handler that blocks the event loop
    await asyncio.sleep(0.3)
    task.cancel()
    got = _received(notify_socket)
    assert got and all(msg == "WATCHDOG=1" for _, msg in got)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert max(gaps) >= 0.55  # no ping while the loop was blocked
    assert sorted(gaps)[len(gaps) // 2] < 0.2  # and regular pings otherwise
