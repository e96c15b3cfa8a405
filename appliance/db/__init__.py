"""The shared Postgres database of several appliances (README "Several boxes"): its schema, versioned and
upgraded under an advisory lock (`migrations.py`), and `appliance db upgrade|status` (`cli.py`).

Imported only when a `postgresql://` URL is set (APPLIANCE_DATABASE_URL, APPLIANCE_THREADS_URL): one box
without them never loads psycopg.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact(url: str) -> str:
    """The URL without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))
