"""The `appliance` command: serve, doctor, models, bench."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path

from appliance.config import ConfigError, Settings, load_models_file, load_settings

# Settings that have a CLI flag: (flag, settings field, type).
_FLAGS: list[tuple[str, str, type]] = [
    ("--host", "host", str),
    ("--port", "port", int),
    ("--data-dir", "data_dir", Path),
    ("--models-file", "models_file", Path),
    ("--default-model", "default_model", str),
    ("--context-size", "context_size", int),
    ("--threads", "threads", int),
    ("--gpu-layers", "gpu_layers", int),
    ("--parallel", "parallel", int),
    ("--default-max-tokens", "default_max_tokens", int),
    ("--drain-timeout", "drain_timeout", float),
    ("--log-level", "log_level", str),
]


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML file of settings (overrides the environment)")
    for flag, field, typ in _FLAGS:
        p.add_argument(flag, dest=field, type=typ, default=None, help=f"(APPLIANCE_{field.upper()})")


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, **{field: getattr(args, field) for _, field, _ in _FLAGS})


def cmd_serve(args: argparse.Namespace) -> int:
    from appliance.observability.logging import setup_logging
    from appliance.security.keys import check_serve_security

    settings = _settings(args)
    if args.allow_unauthenticated:
        settings = settings.model_copy(update={"allow_unauthenticated": True})
    load_models_file(settings)  # fail fast, before binding the port
    check_serve_security(settings)  # a valid keys file; without keys, only a loopback bind
    setup_logging(settings.log_level)  # JSON lines on stdout
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from appliance.server import serve

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from appliance.doctor import run_doctor

    return run_doctor(_settings(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="A self-hosted LLM inference appliance.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the API server")
    _add_settings_flags(p)
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve a non-loopback address without API keys (APPLIANCE_ALLOW_UNAUTHENTICATED)",
    )
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("doctor", help="check this host and the configuration")
    _add_settings_flags(p)
    p.set_defaults(func=cmd_doctor)
    p = sub.add_parser("bench", help="benchmark against llama-cpp-python in process (see scripts/bench.py)")
    from appliance.bench import add_arguments
    from appliance.bench import main as bench_main

    add_arguments(p)
    p.set_defaults(func=bench_main)
    from appliance.models_cli import add_models_commands

    add_models_commands(sub, _add_settings_flags, _settings)
    from appliance.security.keys_cli import add_keys_commands

    add_keys_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"appliance: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
