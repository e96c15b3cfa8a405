"""Run the app under Hypercorn: signals, graceful drain, systemd readiness."""

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
from appliance.config import Settings

log = logging.getLogger("appliance")


def sd_notify(message: str) -> bool:
    """Send a message to systemd's NOTIFY_SOCKET (no-op outside systemd)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message.encode())
        return True
    return False


async def _notify_when_ready(app, host: str, port: int) -> None:
    engine = app.state.engine
    while not engine.ready:
        await asyncio.sleep(0.1)
    log.info("ready: serving on http://%s:%s (default model %s)", host, port, engine.registry.default.id)
    sd_notify("READY=1\nSTATUS=serving")


async def serve(settings: Settings) -> None:
    app = create_app(settings)
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

    ready = asyncio.create_task(_notify_when_ready(app, settings.host, settings.port))
    try:
        await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]
    finally:
        ready.cancel()
