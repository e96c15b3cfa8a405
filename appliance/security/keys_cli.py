"""`appliance keys add|list|revoke|role`: manage the API keys: the keys file, or the shared database's
keys table when APPLIANCE_DATABASE_URL is set (security/keys_db.py; then from any node).

`keys add NAME --role admin|user|metrics`: without --role the first key of an empty file is an admin (so
a fresh install has someone who can manage models), later ones are users. Each key gets a new random id
(its threads, memories and usage belong to the id), so a name revoked and added again starts empty.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from appliance.config import ConfigError, load_settings
from appliance.security.keys import NAME_PATTERN, ROLES, KeyEntry, hash_key, new_key, new_key_id, now_iso
from appliance.security.keys_db import KeysLocation, keys_location


def _keys(args: argparse.Namespace) -> KeysLocation:
    settings = load_settings(
        args.config, data_dir=args.data_dir, keys_file=args.keys_file, database_url=args.database_url
    )
    return keys_location(settings)


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return n


def cmd_keys_add(args: argparse.Namespace) -> int:
    if not re.match(NAME_PATTERN, args.name):
        raise ConfigError(f"invalid key name {args.name!r}: letters, digits and . _ @ - (up to 64 characters)")
    loc = _keys(args)
    doc = loc.read()
    if args.name in doc.keys:
        print(f"appliance: a key named {args.name!r} exists; revoke it first", file=sys.stderr)
        return 1
    role = args.role or ("admin" if not doc.keys else "user")
    key = new_key()
    taken = {e.key_id for e in doc.keys.values()}
    key_id = new_key_id()
    while key_id in taken:  # pragma: no cover (96 random bits)
        key_id = new_key_id()
    entry = KeyEntry(
        sha256=hash_key(key),
        id=key_id,
        role=role,
        prefix=key[:12],
        created=now_iso(),
        requests_per_minute=args.rpm,
        tokens_per_minute=args.tpm,
        max_concurrent_streams=args.max_streams,
    )
    if not loc.add(args.name, entry):  # added meanwhile (another node)
        print(f"appliance: a key named {args.name!r} exists; revoke it first", file=sys.stderr)
        return 1
    print(key)
    print(
        f"key {args.name!r} ({role}, id {key_id}) added to {loc.where}. "
        "This is the only time the key is shown; store it safely.",
        file=sys.stderr,
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    loc = _keys(args)
    doc = loc.read()
    rows = [
        {
            "name": name,
            "id": e.key_id,
            "role": e.effective_role,
            "prefix": e.prefix,
            "created": e.created,
            "requests_per_minute": e.requests_per_minute,
            "tokens_per_minute": e.tokens_per_minute,
            "max_concurrent_streams": e.max_concurrent_streams,
        }
        for name, e in doc.keys.items()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no API keys in {loc.where} (auth is off)")
        return 0

    def lim(v: int | None) -> str:
        return "-" if v is None else str(v)

    table = [("NAME", "ROLE", "ID", "PREFIX", "CREATED", "RPM", "TPM", "STREAMS")]
    table += [
        (
            r["name"],
            r["role"],
            r["id"],
            f"{r['prefix']}..." if r["prefix"] else "",
            r["created"],
            lim(r["requests_per_minute"]),
            lim(r["tokens_per_minute"]),
            lim(r["max_concurrent_streams"]),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    loc = _keys(args)
    if not loc.revoke(args.name):
        print(f"appliance: no key named {args.name!r} in {loc.where}", file=sys.stderr)
        return 1
    print(f"key {args.name!r} revoked; a running server stops accepting it at once", file=sys.stderr)
    return 0


def cmd_keys_role(args: argparse.Namespace) -> int:
    loc = _keys(args)
    if not loc.set_role(args.name, args.role):
        print(f"appliance: no key named {args.name!r} in {loc.where}", file=sys.stderr)
        return 1
    print(f"key {args.name!r} is now {args.role!r}; a running server applies it at once", file=sys.stderr)
    return 0


def add_keys_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `keys` (add, list, revoke, role) to the `appliance` command."""
    keys = subparsers.add_parser("keys", help="manage API keys (add, list, revoke, role)")
    ksub = keys.add_subparsers(dest="keys_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="TOML file of settings")
        p.add_argument("--data-dir", dest="data_dir", type=Path, default=None, help="(APPLIANCE_DATA_DIR)")
        p.add_argument(
            "--keys-file", dest="keys_file", type=Path, default=None, help="(APPLIANCE_KEYS_FILE; .toml or .json)"
        )
        p.add_argument(
            "--database-url", dest="database_url", default=None, help="(APPLIANCE_DATABASE_URL; instead of the file)"
        )

    p = ksub.add_parser("add", help="create a key and print it once; only its hash is stored")
    p.add_argument("name", help="a name for the key (shown in logs and metrics)")
    p.add_argument("--rpm", type=_positive, default=None, help="requests per minute")
    p.add_argument("--tpm", type=_positive, default=None, help="tokens (prompt + completion) per minute")
    p.add_argument("--max-streams", dest="max_streams", type=_positive, default=None, help="concurrent generations")
    p.add_argument(
        "--role",
        choices=ROLES,
        default=None,
        help="admin: models, /metrics, verbose health, everyone's usage; user: inference and its own data; "
        "metrics: only /metrics (default: admin for the first key, else user)",
    )
    common(p)
    p.set_defaults(func=cmd_keys_add)

    p = ksub.add_parser("list", help="list keys: names, roles, ids, prefixes, creation times and limits")
    p.add_argument("--json", action="store_true", help="print JSON")
    common(p)
    p.set_defaults(func=cmd_keys_list)

    p = ksub.add_parser("revoke", help="delete a key (a running server notices within a request)")
    p.add_argument("name")
    common(p)
    p.set_defaults(func=cmd_keys_revoke)

    p = ksub.add_parser("role", help="change a key's role (admin, user or metrics)")
    p.add_argument("name")
    p.add_argument("role", choices=ROLES)
    common(p)
    p.set_defaults(func=cmd_keys_role)
