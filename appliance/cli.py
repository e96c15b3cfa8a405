"""The `appliance` command: serve, doctor, models, bench."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
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
    settings = _settings(args)
    load_models_file(settings)  # fail fast, before binding the port
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
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
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("doctor", help="check this host and the configuration")
    _add_settings_flags(p)
    p.set_defaults(func=cmd_doctor)
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
