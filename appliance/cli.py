"""The `appliance` command: serve, doctor, run, models, bench, keys, usage, data.

Every `Settings` field is also a flag of `serve`, `doctor` and `models` (`context_size` is `--context-size`),
derived from the field: its type, its `description=` and its default are what `--help` shows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from appliance.config import ConfigError, Settings, load_models_file, load_settings

if TYPE_CHECKING:
    from appliance.prestart import Launched

# Settings are flagged in field order; a help section starts at each of these fields (as in config.Settings).
_SECTIONS = {
    "host": "server",
    "context_size": "llama.cpp (a models-file backend entry can override these)",
    "max_body_bytes": "HTTP and queueing",
    "keep_alive": "model residency",
    "first_token_timeout": "fallback and resilience",
    "agent_enabled": "agent, threads, memory and embeddings",
    "keys_file": "security and observability",
    "database_url": "several boxes as one service (all off by default)",
}

_PRECEDENCE = (
    "Settings, highest precedence first: these flags, the --config TOML file (keys are setting names), "
    "APPLIANCE_<NAME> environment variables, a .env file in the working directory, the defaults shown."
)

_USAGE = "%(prog)s [-h] [--config PATH] [--SETTING VALUE ...]"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown_default(field: FieldInfo) -> str | None:
    """The default as `--help` shows it; None when the description says what happens without a value."""
    value: Any = field.get_default(call_default_factory=True)
    if value is None or (field.default_factory is not None and not isinstance(value, list)):
        return None  # e.g. threads: "physical cores" in the description says more than this host's count
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value) or "none"
    if isinstance(value, Path):
        home = str(Path.home())
        return "~" + str(value)[len(home) :] if str(value).startswith(home + os.sep) else str(value)
    return str(value)


def _argument(name: str, field: FieldInfo) -> dict[str, Any]:
    """add_argument() keywords for one setting. The default stays None, so that an absent flag leaves the
    setting to the lower-precedence sources; pydantic validates the values (one-line ConfigError)."""
    help_text = (field.description or "").replace("%", "%%")
    shown = _shown_default(field)
    extra = f"default: {shown}; " if shown is not None else ""
    kw: dict[str, Any] = {"dest": name, "default": None, "help": f"{help_text} ({extra}env APPLIANCE_{name.upper()})"}
    typ = field.annotation
    if get_origin(typ) in (Union, types.UnionType):  # `X | None`
        typ = next(a for a in get_args(typ) if a is not type(None))
    if typ is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif get_origin(typ) is Literal:
        kw.update(type=str, metavar="{" + ",".join(map(str, get_args(typ))) + "}")
    elif get_origin(typ) is list:
        kw.update(type=str, metavar="A,B")  # Settings splits comma-separated text (or a JSON list)
    elif typ in (int, float, str, Path):
        kw["type"] = typ
        kw["metavar"] = {int: "N", float: "NUM", Path: "PATH"}.get(typ)
    else:  # pragma: no cover - a new kind of setting: pass the text on, pydantic converts it
        kw["type"] = str
    return kw


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="PATH", help="TOML file of settings (overrides the environment)")
    group = p
    for name, field in Settings.model_fields.items():
        if name in _SECTIONS:
            group = p.add_argument_group(f"settings: {_SECTIONS[name]}")
        group.add_argument(_flag(name), **_argument(name, field))


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, **{name: getattr(args, name, None) for name in Settings.model_fields})


def cmd_serve(args: argparse.Namespace) -> int:
    from appliance.observability.logging import setup_logging
    from appliance.security.keys_db import check_serve_security

    settings = _settings(args)  # --allow-unauthenticated is one of the settings flags
    load_models_file(settings)  # fail fast, before binding the port
    check_serve_security(settings)  # a valid keys file; without keys, only a loopback bind
    setup_logging(settings.log_level)  # JSON lines on stdout
    from appliance.backends.llamacpp.process import spawn_early

    # the worker loads while the HTTP layer imports (in the interpreter appliance/__main__.py started, if any)
    early = spawn_early(settings, load_models_file(settings), getattr(args, "prestarted", None))
    from appliance.server import serve

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings, early))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from appliance.doctor import run_doctor

    return run_doctor(_settings(args))


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.chat_cli import cmd_run as run_chat

    settings = _settings(args)
    serve_argv = ["--config", str(args.config)] if args.config else []  # a server it starts gets the same
    for name in Settings.model_fields:
        value = getattr(args, name, None)
        if isinstance(value, bool):
            serve_argv.append(_flag(name) if value else "--no-" + _flag(name)[2:])
        elif value is not None:
            serve_argv += [_flag(name), str(value)]
    return run_chat(settings, args, serve_argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="A self-hosted LLM inference appliance.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "serve", help="run the API server", description="Run the API server.", epilog=_PRECEDENCE, usage=_USAGE
    )
    _add_settings_flags(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser(
        "doctor",
        help="check this host and the configuration",
        description="Check this host and the configuration: one OK/WARN/FAIL line per check.",
        epilog=_PRECEDENCE,
        usage=_USAGE,
    )
    _add_settings_flags(p)
    p.set_defaults(func=cmd_doctor)
    p = sub.add_parser(
        "run",
        help="chat with a model in the terminal (starts the appliance if none is running)",
        description="Chat with a model in the terminal: replies stream, the conversation is kept, /bye leaves. "
        "Uses the appliance at --url, APPLIANCE_URL or the configured port, or starts one.",
        epilog=_PRECEDENCE,
    )
    p.add_argument("model", nargs="?", default="default", help="model id or alias (default: the default model)")
    p.add_argument("--url", help="the appliance's base URL (default: APPLIANCE_URL, else this host's --port)")
    p.add_argument("--api-key", help="an API key (default: APPLIANCE_API_KEY)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="cap each reply at N tokens")
    _add_settings_flags(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("bench", help="benchmark side by side with llama-server or another server (scripts/bench.py)")
    from appliance.bench import add_arguments
    from appliance.bench import main as bench_main

    add_arguments(p)
    p.set_defaults(func=bench_main)
    from appliance.models_cli import add_models_commands

    add_models_commands(sub, _add_settings_flags, _settings)
    from appliance.security.keys_cli import add_keys_commands

    add_keys_commands(sub)
    from appliance.security.usage_cli import add_usage_command

    add_usage_command(sub)
    from appliance.data_cli import add_data_command

    add_data_command(sub)
    from appliance.db.cli import add_db_command

    add_db_command(sub)
    return parser


def main(argv: list[str] | None = None, prestarted: Launched | None = None) -> int:
    """`prestarted`: a worker interpreter `appliance serve` may use for the default model (appliance/__main__.py)."""
    args = build_parser().parse_args(argv)
    args.prestarted = prestarted
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"appliance: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
