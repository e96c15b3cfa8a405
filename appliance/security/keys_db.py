"""API keys in the shared Postgres database (APPLIANCE_DATABASE_URL), for several boxes: the same entries
as the keys file (security/keys.py), one row each in `appliance_keys` (appliance/db/migrations.py).

`keys_location(settings)` is where `appliance keys` reads and writes: the database when the URL is set,
else the keys file. `make_key_store(settings)` is what the server checks keys against: `DbKeyStore`
re-reads the table on a background thread every `REFRESH` seconds (never on the event loop; started and
stopped by the app's lifespan), so a key added or revoked on any node is honoured by every node within
that time. If the database cannot be reached, a node
keeps the keys it last read (and logs it); a node that cannot read them at start does not start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from appliance.config import ConfigError, Settings
from appliance.db import redact
from appliance.security.keys import (
    ROLES,
    KeyEntry,
    KeysFile,
    KeyStore,
    Role,
    is_loopback,
    read_keys_file,
    write_keys_file,
)

log = logging.getLogger("appliance.security")

REFRESH = 2.0  # seconds between re-reads of the keys table
_FIELDS = ("sha256", "id", "role", "prefix", "created", "requests_per_minute", "tokens_per_minute")
_COLS = "name, " + ", ".join(_FIELDS) + ", max_concurrent_streams"


class KeysLocation(Protocol):
    where: str

    def read(self) -> KeysFile: ...
    def add(self, name: str, entry: KeyEntry) -> bool: ...  # False: the name exists
    def revoke(self, name: str) -> bool: ...  # False: no such name
    def set_role(self, name: str, role: Role) -> bool: ...


class FileKeys:
    """The keys file (one box)."""

    def __init__(self, path: Any):
        self.path, self.where = path, str(path)

    def read(self) -> KeysFile:
        return read_keys_file(self.path)

    def add(self, name: str, entry: KeyEntry) -> bool:
        doc = self.read()
        if name in doc.keys:
            return False
        doc.keys[name] = entry
        write_keys_file(self.path, doc)
        return True

    def revoke(self, name: str) -> bool:
        doc = self.read()
        if doc.keys.pop(name, None) is None:
            return False
        write_keys_file(self.path, doc)
        return True

    def set_role(self, name: str, role: Role) -> bool:
        doc = self.read()
        if (entry := doc.keys.get(name)) is None:
            return False
        doc.keys[name] = entry.model_copy(update={"role": role})
        write_keys_file(self.path, doc)
        return True


class DbKeys:
    """The `appliance_keys` table of the shared database."""

    def __init__(self, url: str):
        self.url, self.where = url, redact(url)

    def _run(self, fn: Callable[[Any], Any]) -> Any:
        import psycopg

        from appliance.db.migrations import connect, upgrade

        try:
            upgrade(self.url, checkpoints=False)
            with connect(self.url) as conn:
                return fn(conn)
        except psycopg.Error as e:
            raise ConfigError(f"APPLIANCE_DATABASE_URL {self.where}: {str(e).strip()}") from None

    def read(self) -> KeysFile:
        def run(conn: Any) -> KeysFile:
            rows = conn.execute(f"SELECT {_COLS} FROM appliance_keys ORDER BY name").fetchall()
            keys = {}
            for name, *vals in rows:
                entry = dict(zip((*_FIELDS, "max_concurrent_streams"), vals, strict=True))
                keys[name] = KeyEntry(**entry)
            return KeysFile(keys=keys)

        return self._run(run)

    def add(self, name: str, entry: KeyEntry) -> bool:
        e = entry.normalized()
        vals = (name, *(getattr(e, f) for f in _FIELDS), e.max_concurrent_streams)
        sql = (
            f"INSERT INTO appliance_keys ({_COLS}) VALUES ({', '.join(['%s'] * len(vals))})"
            " ON CONFLICT (name) DO NOTHING"
        )
        return self._run(lambda conn: conn.execute(sql, vals).rowcount == 1)

    def revoke(self, name: str) -> bool:
        return self._run(lambda conn: conn.execute("DELETE FROM appliance_keys WHERE name = %s", (name,)).rowcount == 1)

    def set_role(self, name: str, role: Role) -> bool:
        assert role in ROLES
        sql = "UPDATE appliance_keys SET role = %s WHERE name = %s"
        return self._run(lambda conn: conn.execute(sql, (role, name)).rowcount == 1)


def keys_location(settings: Settings) -> KeysLocation:
    return DbKeys(settings.database_url) if settings.database_url else FileKeys(settings.keys_path)


class DbKeyStore(KeyStore):
    """KeyStore over the keys table: read at start (strict), then re-read every REFRESH seconds on a
    background thread that a request's `check_reload()` starts. Auth stays on once on (as with the file)."""

    def __init__(self, url: str, refresh: float = REFRESH, clock: Callable[[], float] = time.monotonic):
        self.db = DbKeys(url)
        self.refresh, self.clock = refresh, clock
        self._loaded_at = clock()
        self._refreshing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        super().__init__(self.db.where)  # type: ignore[arg-type]  (`path` names the source in logs)

    def start(self) -> None:
        """Re-read the table every REFRESH seconds until close()."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="keys-refresh", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.refresh):
            self.reload()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None

    def _signature(self) -> None:  # type: ignore[override]
        return None

    def _read(self) -> KeysFile:
        return self.db.read()

    def reload(self, strict: bool = False) -> None:
        try:
            doc = self._read()
        except ConfigError as e:
            if strict:
                raise
            log.error("keys not reloaded from the database, keeping the previous %d keys: %s", len(self._keys), e)
            return
        finally:
            self._loaded_at = self.clock()
        old = set(self._keys)
        self._keys = dict(doc.keys)
        self._by_id = {e.key_id: name for name, e in self._keys.items()}
        if self._keys:
            self._was_enabled = True
        if not strict and set(self._keys) != old:
            log.info("keys reloaded from the database: %d keys", len(self._keys))

    def check_reload(self) -> None:
        """Without the refresh thread (an app never started): a background re-read when the last one is older
        than REFRESH (never blocks)."""
        if self._thread is not None or self.clock() - self._loaded_at < self.refresh or self._refreshing:
            return
        with self._lock:
            if self._refreshing:
                return
            self._refreshing = True

        def run() -> None:
            try:
                self.reload()
            finally:
                self._refreshing = False

        threading.Thread(target=run, name="keys-refresh", daemon=True).start()


def make_key_store(settings: Settings) -> KeyStore:
    return DbKeyStore(settings.database_url) if settings.database_url else KeyStore(settings.keys_path)


def check_serve_security(settings: Settings) -> KeysFile:
    """Before binding: the keys (file or database) must be readable, and without keys only a loopback
    address is allowed."""
    loc = keys_location(settings)
    doc = loc.read()
    if not doc.keys and not is_loopback(settings.host) and not settings.allow_unauthenticated:
        raise ConfigError(
            f"APPLIANCE_HOST={settings.host} is not a loopback address and no API keys are configured "
            f"({loc.where}): add one with `appliance keys add NAME`, or pass --allow-unauthenticated"
        )
    return doc
