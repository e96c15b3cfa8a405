"""API keys: a file of named keys stored as sha256 hashes, each with optional limits.

The file (`APPLIANCE_KEYS_FILE`, default `<data_dir>/keys.toml`; a `.json` name makes it JSON):

    [keys.alice]
    sha256 = "<hex digest of the key>"
    prefix = "sk-app-AbCde"          # the key's first characters, to recognise it in `keys list`
    created = "2025-01-01T12:00:00Z"
    requests_per_minute = 60         # optional limits, absent = unlimited
    tokens_per_minute = 20000
    max_concurrent_streams = 2

Keys are 256-bit random strings, so a plain sha256 is a safe hash for them (no password stretching
needed); a presented key is hashed and compared with every stored hash in constant time.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.config import ConfigError, Settings

log = logging.getLogger("appliance.security")

KEY_PREFIX = "sk-app-"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
MAX_KEY_CHARS = 256  # longer bearer tokens are rejected without hashing


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    prefix: str = ""
    created: str = ""
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    max_concurrent_streams: int | None = Field(None, ge=1)

    @property
    def limited(self) -> bool:
        return any(
            v is not None for v in (self.requests_per_minute, self.tokens_per_minute, self.max_concurrent_streams)
        )


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: dict[str, KeyEntry] = {}


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    entry: KeyEntry


def new_key() -> str:
    """A fresh key: `sk-app-` and 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- reading and writing the file ----------------------------------------------------------------


def read_keys_file(path: Path) -> KeysFile:
    """Parse the keys file (missing → no keys); ConfigError with one line on anything wrong."""
    try:
        raw_bytes = path.read_bytes()
    except FileNotFoundError:
        return KeysFile()
    except OSError as e:
        raise ConfigError(f"APPLIANCE_KEYS_FILE {path}: cannot read: {e.strerror}") from None
    try:
        raw = json.loads(raw_bytes or b"{}") if path.suffix.lower() == ".json" else tomllib.loads(raw_bytes.decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"APPLIANCE_KEYS_FILE {path}: invalid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {e}"
        ) from None
    try:
        doc = KeysFile.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"APPLIANCE_KEYS_FILE {path}: {where}: {err['msg']}") from None
    for name in doc.keys:
        if not re.match(NAME_PATTERN, name):
            raise ConfigError(f"APPLIANCE_KEYS_FILE {path}: invalid key name {name!r}")
    return doc


def _toml_value(v: Any) -> str:
    return str(v) if isinstance(v, int) else json.dumps(str(v))


def dump_keys(doc: KeysFile, json_format: bool) -> str:
    if json_format:
        return json.dumps(doc.model_dump(exclude_none=True), indent=2) + "\n"
    lines = [
        "# API keys of the appliance, managed with `appliance keys add|list|revoke`.",
        "# Only sha256 hashes of the keys are stored. The server re-reads this file when it changes.",
    ]
    for name, entry in doc.keys.items():
        lines += ["", f"[keys.{json.dumps(name)}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in entry.model_dump(exclude_none=True).items()]
    return "\n".join(lines) + "\n"


def write_keys_file(path: Path, doc: KeysFile) -> None:
    """Replace the file atomically; keep an existing file's mode and owner, make a new one 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dump_keys(doc, path.suffix.lower() == ".json")
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".keys-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, (st.st_mode & 0o777) if st else 0o600)
        if st is not None:
            with contextlib.suppress(OSError):  # only root may give the file away
                os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- the store the server uses -------------------------------------------------------------------


class KeyStore:
    """The keys the server accepts, re-read when the file changes (so `keys revoke` needs no restart).

    Auth is on when the file has keys. Once on, it stays on for the life of the process: if every key
    is revoked (or the file disappears), every request gets 401 rather than the server falling open.
    """

    def __init__(self, path: Path):
        self.path = path
        self._keys: dict[str, KeyEntry] = {}
        self._sig: tuple[int, int, int] | None = None
        self._was_enabled = False
        self._lock = threading.Lock()
        self.reload(strict=True)

    @property
    def enabled(self) -> bool:
        return self._was_enabled

    def __len__(self) -> int:
        return len(self._keys)

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def reload(self, strict: bool = False) -> None:
        """Re-read the file. strict: raise ConfigError on a bad file (start-up); else keep the old keys."""
        sig = self._signature()
        try:
            doc = read_keys_file(self.path)
        except ConfigError as e:
            if strict:
                raise
            self._sig = sig
            log.error("keys file not reloaded, keeping the previous %d keys: %s", len(self._keys), e)
            return
        old = set(self._keys)
        self._keys, self._sig = dict(doc.keys), sig
        if self._keys:
            self._was_enabled = True
        if not strict and set(self._keys) != old:
            log.info(
                "keys file reloaded: %d keys (added: %s; revoked: %s)",
                len(self._keys),
                ", ".join(sorted(set(self._keys) - old)) or "none",
                ", ".join(sorted(old - set(self._keys))) or "none",
            )

    def check_reload(self) -> None:
        """Reload if the file changed (a stat call; cheap enough for every request)."""
        if self._signature() != self._sig:
            with self._lock:
                if self._signature() != self._sig:
                    self.reload()

    def verify(self, token: str) -> ApiKey | None:
        """The key whose hash matches `token`, compared against every key in constant time."""
        if not token or len(token) > MAX_KEY_CHARS:
            return None
        digest = hash_key(token).encode()
        found: ApiKey | None = None
        for name, entry in self._keys.items():
            if hmac.compare_digest(digest, entry.sha256.encode()):
                found = ApiKey(name, entry)
        return found

    def get(self, name: str) -> KeyEntry | None:
        return self._keys.get(name)


# -- binding without keys ------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    h = host.strip().strip("[]").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h.split("%")[0]).is_loopback
    except ValueError:
        return False


def check_serve_security(settings: Settings) -> KeysFile:
    """Before binding: the keys file must be valid, and without keys only a loopback address is allowed."""
    doc = read_keys_file(settings.keys_path)
    if not doc.keys and not is_loopback(settings.host) and not settings.allow_unauthenticated:
        raise ConfigError(
            f"APPLIANCE_HOST={settings.host} is not a loopback address and no API keys are configured "
            f"({settings.keys_path}): add one with `appliance keys add NAME`, or pass --allow-unauthenticated"
        )
    return doc


def describe_auth(settings: Settings, store: KeyStore) -> str:
    """The start-up log line saying whether and how requests are authenticated."""
    if store.enabled:
        return f"auth: on, {len(store)} API keys from {store.path}"
    if is_loopback(settings.host):
        return (
            f"auth: off (no API keys in {store.path}); accepting a loopback bind only. "
            "Add a key with `appliance keys add NAME` to turn auth on"
        )
    return f"auth: OFF on non-loopback address {settings.host} (--allow-unauthenticated); anyone can use the API"
