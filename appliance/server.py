"""Run the app under Hypercorn: signals, graceful drain, systemd readiness and watchdog."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from appliance.app import create_app
from appliance.backends.llamacpp.process import EarlyWorker
from appliance.config import Settings
from appliance.heap import freeze_heap

log = logging.getLogger("appliance")


def sd_notify(message: str) -> bool:
    """Send a message to systemd's NOTIFY_SOCKET (no-op outside systemd)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(False)  # called on the event loop: a full queue drops the message rather than block
        s.connect(addr)
        s.sendall(message.encode())
        return True
    return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings when systemd asked for them (WatchdogSec=), else None."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2  # twice per period, as sd_watchdog_enabled(3) advises


async def feed_watchdog(interval: float, notify=sd_notify) -> None:
    """Ping systemd from the event loop itself: a loop blocked for a whole WatchdogSec gets the service
    restarted, which a thread pinging on its own would hide."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def _notify_when_ready(app, host: str, port: int) -> None:
    engine = app.state.engine
    await asyncio.sleep(0)  # the app's imports are done and the default model's worker is loading: quiet
    freeze_heap()
    while not engine.ready:
        await asyncio.sleep(0.1)
    log.info("ready: serving on http://%s:%s (default model %s)", host, port, engine.registry.default.id)
    sd_notify("READY=1\nSTATUS=serving")
    log.debug("heap frozen: %d objects", freeze_heap())  # with what starting the model added


async def serve(settings: Settings, early_worker: EarlyWorker | None = None) -> None:
    app = create_app(settings, early_worker=early_worker)
    config = Config()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.graceful_timeout = settings.drain_timeout
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    config.h11_max_incomplete_size = 64 * 1024
    config.include_server_header = False

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def shutdown_trigger() -> None:
        await stop.wait()
        log.info("stopping: draining in-flight requests (up to %gs)", settings.drain_timeout)
        sd_notify("STOPPING=1")

    tasks = [asyncio.create_task(_notify_when_ready(app, settings.host, settings.port))]
    if (interval := watchdog_interval()) is not None:
        tasks.append(asyncio.create_task(feed_watchdog(interval)))
    try:
        await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]
    finally:
        for t in tasks:
            t.cancel()
