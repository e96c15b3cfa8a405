"""API keys: a file of named keys stored as sha256 hashes, each with optional limits.

The file (`APPLIANCE_KEYS_FILE`, default `<data_dir>/keys.toml`; a `.json` name makes it JSON):

    [keys.alice]
    sha256 = "<hex digest of the key>"
    id = "key_3f9c0a…"               # stable random id: what threads, memories, limits and usage belong to
    role = "user"                    # admin | user | metrics (absent: user, for files from before roles)
    prefix = "sk-app-AbCde"          # the key's first characters, to recognise it in `keys list`
    created = "2025-01-01T12:00:00Z"
    requests_per_minute = 60         # optional limits, absent = unlimited
    tokens_per_minute = 20000
    max_concurrent_streams = 2

Keys are 256-bit random strings, so a plain sha256 is a safe hash for them (no password stretching
needed); a presented key is hashed and compared with every stored hash in constant time.

Roles: `admin` (model load/unload, `/health?verbose=1`, `/metrics`, everyone's usage), `user` (inference,
its own threads, memories and usage), `metrics` (only `/metrics`, for Prometheus). A key's data belongs to
its `id`, never to its reusable name: a name revoked and added again gets a new id and starts empty.
Entries written before ids existed get one derived from their hash (stable across restarts), stored
when the file is next written.
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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.config import ConfigError, Settings

log = logging.getLogger("appliance.security")

KEY_PREFIX = "sk-app-"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
MAX_KEY_CHARS = 256  # longer bearer tokens are rejected without hashing
ID_PATTERN = r"^key_[0-9a-f]{8,64}$"

Role = Literal["admin", "user", "metrics"]
ROLES: tuple[Role, ...] = ("admin", "user", "metrics")
LEGACY_ROLE: Role = "user"  # entries without a role (files from before roles)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(12)


def derived_key_id(sha256: str) -> str:
    """The id of an entry stored before ids existed: a function of its hash, so stable across restarts."""
    return "key_" + hashlib.sha256(f"appliance-key-id\0{sha256}".encode()).hexdigest()[:24]


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    id: str | None = Field(None, pattern=ID_PATTERN)
    role: Role | None = None
    prefix: str = ""
    created: str = ""
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    max_concurrent_streams: int | None = Field(None, ge=1)

    @property
    def key_id(self) -> str:
        return self.id or derived_key_id(self.sha256)

    @property
    def effective_role(self) -> Role:
        return self.role or LEGACY_ROLE

    def normalized(self) -> KeyEntry:
        """With its id and role written out (what the file stores from its next write on)."""
        return self.model_copy(update={"id": self.key_id, "role": self.effective_role})

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

    @property
    def id(self) -> str:
        return self.entry.key_id

    @property
    def role(self) -> Role:
        return self.entry.effective_role


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
    seen: dict[str, str] = {}
    for name, entry in doc.keys.items():
        if not re.match(NAME_PATTERN, name):
            raise ConfigError(f"APPLIANCE_KEYS_FILE {path}: invalid key name {name!r}")
        if (other := seen.setdefault(entry.key_id, name)) != name:
            raise ConfigError(f"APPLIANCE_KEYS_FILE {path}: keys {other!r} and {name!r} have the same id")
    return doc


def _toml_value(v: Any) -> str:
    return str(v) if isinstance(v, int) else json.dumps(str(v))


def dump_keys(doc: KeysFile, json_format: bool) -> str:
    doc = KeysFile(keys={name: entry.normalized() for name, entry in doc.keys.items()})
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
        self._by_id: dict[str, str] = {}
        self._sig: tuple[int, int, int] | None = None
        self._was_enabled = False
        self._legacy: set[str] = set()  # names of entries without a role, already reported
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
        self._by_id = {e.key_id: name for name, e in self._keys.items()}
        if self._keys:
            self._was_enabled = True
        legacy = {name for name, e in self._keys.items() if e.role is None}
        if legacy and legacy != self._legacy:
            log.warning(
                "keys file %s: %d keys have no role (%s) and are treated as 'user' keys; "
                "make one an admin with `appliance keys role NAME admin`",
                self.path,
                len(legacy),
                ", ".join(sorted(legacy)),
            )
        self._legacy = legacy
        if not strict and set(self._keys) != old:
            log.info(
                "keys file reloaded: %d keys (added: %s; revoked: %s)",
                len(self._keys),
                ", ".join(sorted(set(self._keys) - old)) or "none",
                ", ".join(sorted(old - set(self._keys))) or "none",
            )

    def start(self) -> None:
        """Background work, from the app's lifespan (none for the file; the database store refreshes)."""

    def close(self) -> None: ...

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

    def name_of(self, key_id: str) -> str | None:
        """The name of the key with this id (None once it is revoked)."""
        return self._by_id.get(key_id)

    def role_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(ROLES, 0)
        for e in self._keys.values():
            counts[e.effective_role] += 1
        return counts

    def names(self) -> dict[str, str]:
        """id → name of every key."""
        return dict(self._by_id)


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
        roles = store.role_counts()
        counted = ", ".join(f"{n} {r}" for r, n in roles.items() if n)
        return f"auth: on, {len(store)} API keys ({counted or 'none left'}) from {store.path}"
    if is_loopback(settings.host):
        return (
            f"auth: off (no API keys in {store.path}); accepting a loopback bind only. "
            "Add a key with `appliance keys add NAME` to turn auth on"
        )
    return f"auth: OFF on non-loopback address {settings.host} (--allow-unauthenticated); anyone can use the API"


def log_auth_mode(settings: Settings, store: KeyStore) -> None:
    """Say at start-up how requests are authenticated (a warning when anyone on the network may call)."""
    (log.info if store.enabled or is_loopback(settings.host) else log.warning)(describe_auth(settings, store))
    if settings.cors_origins:
        log.info("CORS: allowing origins %s", ", ".join(settings.cors_origins))
    if settings.log_prompts:
        log.warning("APPLIANCE_LOG_PROMPTS is on: prompts and completions are written to the log")
