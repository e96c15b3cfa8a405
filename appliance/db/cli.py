"""`appliance db upgrade|status`: the shared Postgres schema (APPLIANCE_DATABASE_URL, APPLIANCE_THREADS_URL)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from appliance.config import ConfigError, Settings, load_settings
from appliance.db import redact


def _urls(settings: Settings) -> list[str]:
    urls = [u for u in (settings.database_url, settings.threads_url) if u]
    if not urls:
        raise ConfigError("no database configured: set APPLIANCE_DATABASE_URL (or APPLIANCE_THREADS_URL)")
    return list(dict.fromkeys(urls))


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, database_url=args.database_url, threads_url=args.threads_url)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    import psycopg

    from appliance.db.migrations import applied, connect, latest, upgrade

    for url in _urls(_settings(args)):
        try:
            now = upgrade(url)
            with connect(url) as conn:
                versions = applied(conn)
        except psycopg.Error as e:
            print(f"appliance: database {redact(url)}: {str(e).strip()}", file=sys.stderr)
            return 1
        what = f"applied {', '.join(map(str, now))}" if now else "already up to date"
        print(f"{redact(url)}: schema version {max(versions, default=0)} of {latest()} ({what})")
    return 0


def cmd_db_status(args: argparse.Namespace) -> int:
    import psycopg

    from appliance.db.migrations import applied, connect, latest

    behind = False
    for url in _urls(_settings(args)):
        try:
            with connect(url) as conn:
                versions = applied(conn)
        except psycopg.Error as e:
            print(f"appliance: database {redact(url)}: {str(e).strip()}", file=sys.stderr)
            return 1
        v = max(versions, default=0)
        behind |= v < latest()
        hint = " (run `appliance db upgrade`)" if v < latest() else ""
        print(f"{redact(url)}: schema version {v} of {latest()}{hint}")
    return 3 if behind else 0


def add_db_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `db` (upgrade, status) to the `appliance` command."""
    db = subparsers.add_parser("db", help="the shared Postgres schema of several boxes (upgrade, status)")
    sub = db.add_subparsers(dest="db_command", required=True)
    for name, func, text in (
        ("upgrade", cmd_db_upgrade, "apply the schema migrations the database lacks (idempotent; safe to run twice)"),
        ("status", cmd_db_status, "print the schema version (exit 3 when behind)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", type=Path, help="TOML file of settings")
        p.add_argument("--database-url", dest="database_url", default=None, help="(APPLIANCE_DATABASE_URL)")
        p.add_argument("--threads-url", dest="threads_url", default=None, help="(APPLIANCE_THREADS_URL)")
        p.set_defaults(func=func)
