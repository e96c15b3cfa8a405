"""Structured logs: one JSON object per line on stdout (journald keeps each line as one entry).

    {"ts": "2025-01-01T12:00:00.123Z", "level": "info", "logger": "appliance.access", "msg": "...", ...}

Fields passed as `extra={"fields": {...}}` are merged into the object (the access log uses this).
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

_LEVELS = {"WARNING": "warning", "CRITICAL": "critical"}
_listener: logging.handlers.QueueListener | None = None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        doc: dict[str, Any] = {
            "ts": ts,
            "level": _LEVELS.get(record.levelname, record.levelname.lower()),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(level: str = "info", stream: Any = None) -> None:
    """Send every log record (the appliance's, Hypercorn's, libraries') to stdout as JSON lines.

    Records are formatted where they are logged, and written by a background thread: a slow reader of
    stdout (journald under pressure, a full pipe) never blocks the event loop.
    """
    global _listener
    if _listener is not None:
        _listener.stop()
    out = logging.StreamHandler(stream or sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    q: queue.SimpleQueue = queue.SimpleQueue()
    handler = logging.handlers.QueueHandler(q)
    handler.setFormatter(JsonFormatter())  # prepare() formats in the caller: the record's message is the JSON
    _listener = logging.handlers.QueueListener(q, out)
    _listener.start()
    atexit.register(_stop)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries that are chatty at INFO (one line per HTTP call to a backend) stay at WARNING unless debugging.
    if level.lower() != "debug":
        for name in ("httpx", "httpcore", "chromadb", "sentence_transformers", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)


def _stop() -> None:
    """Flush what is queued (at exit)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
