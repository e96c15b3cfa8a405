"""`appliance data assign`: see whose threads and memories are where, and hand them to a key.

Threads and memories belong to a scope: a key's stable id (`key_…`) with API keys on, else the request's
`user` or `default`. Data created before keys were turned on (scope `default`, or a `user` name), or
under a key's *name* by older versions, is not visible to any key until it is moved:

    appliance data assign --list                      # scopes that hold data, with thread/memory counts
    appliance data assign --from default --to alice   # give it to the key named alice (its id)

Moving renames the threads' stored ids (`<scope>:<client id>`, in the metadata and the checkpoints; a
client id the key already uses gets a suffix, `t1-2`) and re-files the memories under the key's id. Run it
with the server stopped: the memory store (Chroma) must not be written by two processes at once.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from appliance.config import ConfigError, Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, data_dir=args.data_dir, keys_file=args.keys_file)


def _threads_path(settings: Settings) -> Path:
    return settings.data_dir / "agent" / "threads.sqlite"


def _memory_path(settings: Settings) -> Path:
    return settings.data_dir / "memory"


class _NoEmbedder:
    """Moving and counting memories reuses their stored vectors: nothing is embedded."""

    async def embed(self, texts: list[str]) -> list[list[float]]:  # pragma: no cover
        raise RuntimeError("no embedding model in `appliance data`")


def _key_names(settings: Settings) -> dict[str, str]:
    """key id → key name, from the keys file (or the shared database's keys, APPLIANCE_DATABASE_URL)."""
    from appliance.security.keys_db import keys_location

    return {e.key_id: name for name, e in keys_location(settings).read().keys.items()}


async def scope_counts(settings: Settings) -> dict[str, dict[str, int]]:
    """scope → {"threads": n, "memories": n}, for every scope holding data."""
    from appliance.agent.threads_pg import make_thread_store
    from appliance.memory.store import MemoryStore

    out: dict[str, dict[str, int]] = {}
    if settings.threads_db_url or _threads_path(settings).exists():
        threads = make_thread_store(settings)  # SQLite, or Postgres shared by several boxes
        await threads.open()
        try:
            for scope, n in (await threads.scope_counts()).items():
                out.setdefault(scope, {"threads": 0, "memories": 0})["threads"] = n
        finally:
            await threads.close()
    if settings.memory_url or _memory_path(settings).exists():
        memory = MemoryStore(_memory_path(settings), _NoEmbedder(), url=settings.memory_url)
        try:
            for scope, n in (await memory.scope_counts()).items():
                out.setdefault(scope, {"threads": 0, "memories": 0})["memories"] = n
        finally:
            await asyncio.to_thread(memory.close)
    return out


async def assign(settings: Settings, old: str, new: str) -> dict[str, Any]:
    """Move the threads and memories of scope `old` to scope `new`: {"threads": {old id: new id}, "memories": n}."""
    from appliance.agent.threads_pg import make_thread_store
    from appliance.memory.store import MemoryStore

    moved: dict[str, str] = {}
    if settings.threads_db_url or _threads_path(settings).exists():
        threads = make_thread_store(settings)  # SQLite, or Postgres shared by several boxes
        await threads.open()
        try:
            moved = await threads.move_scope(old, new)
        finally:
            await threads.close()
    memories = 0
    if settings.memory_url or _memory_path(settings).exists():
        memory = MemoryStore(_memory_path(settings), _NoEmbedder(), url=settings.memory_url)
        try:
            memories = await memory.move_scope(old, new, moved)
        finally:
            await asyncio.to_thread(memory.close)
    return {"threads": moved, "memories": memories}


def _resolve_key(settings: Settings, name: str) -> tuple[str, str]:
    """(id, name) of the key named `name` (or with that id)."""
    names = _key_names(settings)
    for key_id, key_name in names.items():
        if name in (key_name, key_id):
            return key_id, key_name
    known = ", ".join(sorted(names.values())) or "none"
    raise ConfigError(
        f"no key named {name!r} in {settings.keys_path} (keys: {known}); add it with `appliance keys add`"
    )


def cmd_data_assign(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.list:
        counts = asyncio.run(scope_counts(settings))
        names = _key_names(settings)
        by_name = {name: key_id for key_id, name in names.items()}
        if not counts:
            print(f"no threads or memories in {settings.data_dir}")
            return 0
        rows = [("SCOPE", "THREADS", "MEMORIES", "OWNER")]
        for scope in sorted(counts):
            if scope in names:
                owner = f"key {names[scope]}"
            elif scope in by_name:
                owner = f"old name scope: move with --from {scope} --to {scope}"
            elif scope.startswith("key_"):
                owner = "a revoked key"
            elif scope == "default":
                owner = "no key (before keys): move with --from default --to KEYNAME"
            else:
                owner = "no key (a `user` name)"
            rows.append((scope, str(counts[scope]["threads"]), str(counts[scope]["memories"]), owner))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])
        return 0
    if not args.source or not args.target:
        print("appliance: data assign needs --list, or --from SCOPE and --to KEYNAME", file=sys.stderr)
        return 2
    key_id, key_name = _resolve_key(settings, args.target)
    if args.source == key_id:
        print(f"appliance: {args.source!r} is already the scope of key {key_name!r}", file=sys.stderr)
        return 2
    result = asyncio.run(assign(settings, args.source, key_id))
    threads, memories = result["threads"], result["memories"]
    print(f"moved {len(threads)} threads and {memories} memories from {args.source!r} to key {key_name!r} ({key_id})")
    from appliance.agent.threads import client_id

    for old, new in threads.items():
        if client_id(old) != client_id(new):
            print(f"  thread {client_id(old)!r} is now {client_id(new)!r} (the key already had one of that id)")
    return 0


def add_data_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `data assign` to the `appliance` command."""
    data = subparsers.add_parser("data", help="see and move stored threads and memories between owners")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser(
        "assign",
        help="move threads and memories from a scope (default, or an old key name) to a key",
        description="Move the threads and memories of a scope (`default`: before keys; or a key's old name) "
        "to a key's id, or list which scopes hold data. Stop the server first.",
    )
    p.add_argument("--list", action="store_true", help="show the scopes holding data, with their counts")
    p.add_argument("--from", dest="source", default=None, metavar="SCOPE", help="scope to move from (e.g. default)")
    p.add_argument("--to", dest="target", default=None, metavar="KEYNAME", help="the key to give the data to")
    p.add_argument("--config", type=Path, help="TOML file of settings")
    p.add_argument("--data-dir", dest="data_dir", type=Path, default=None, help="(APPLIANCE_DATA_DIR)")
    p.add_argument(
        "--keys-file", dest="keys_file", type=Path, default=None, help="(APPLIANCE_KEYS_FILE; .toml or .json)"
    )
    p.set_defaults(func=cmd_data_assign)
