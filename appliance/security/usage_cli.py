"""`appliance usage`: token and request totals per key and model, from `<data_dir>/usage.sqlite` or, with
APPLIANCE_DATABASE_URL, from the shared database (then from any node)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from appliance.security.usage import read_usage, totals
from appliance.security.usage_db import read_usage_db


def _day_arg(value: str) -> str:
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}") from None
    if len(value) != 10:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}")
    return value


def cmd_usage(args: argparse.Namespace) -> int:
    from appliance.config import load_settings

    settings = load_settings(args.config, data_dir=args.data_dir, database_url=args.database_url)
    if settings.database_url:  # several boxes: the shared database
        path, rows = read_usage_db(settings.database_url, args.since, args.key, daily=args.daily)
    else:
        path = settings.data_dir / "usage.sqlite"
        rows = read_usage(path, args.since, args.key, daily=args.daily)
    total = totals(rows)
    if args.json:
        print(json.dumps({"since": args.since, "data": rows, "totals": total}, indent=2))
        return 0
    if not rows:
        print(f"no usage recorded in {path}" + (f" since {args.since}" if args.since else ""))
        return 0
    head = ("DAY",) if args.daily else ()
    table = [(*head, "KEY", "ID", "MODEL", "REQUESTS", "PROMPT", "COMPLETION", "TOTAL", "EMBED_INPUTS")]
    for r in rows:
        table.append(
            (
                *((r["day"],) if args.daily else ()),
                r["key_name"] or "-",
                r["key_id"] or "-",
                r["model"],
                *(str(r[k]) for k in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")),
                str(r["embedding_inputs"]),
            )
        )
    table.append(
        (
            *(("",) if args.daily else ()),
            "TOTAL",
            "",
            "",
            *(str(total[k]) for k in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")),
            str(total["embedding_inputs"]),
        )
    )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def add_usage_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `usage` to the `appliance` command."""
    p = subparsers.add_parser("usage", help="print token and request totals per key and model")
    p.add_argument("--key", default=None, help="only this key (its name or id)")
    p.add_argument("--since", type=_day_arg, default=None, help="first UTC day to count, YYYY-MM-DD")
    p.add_argument("--daily", action="store_true", help="one row per day instead of totals over the period")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--config", type=Path, help="TOML file of settings")
    p.add_argument("--data-dir", dest="data_dir", type=Path, default=None, help="(APPLIANCE_DATA_DIR)")
    p.add_argument("--database-url", dest="database_url", default=None, help="(APPLIANCE_DATABASE_URL)")
    p.set_defaults(func=cmd_usage)
