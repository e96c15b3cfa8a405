"""`appliance models add|pull|list|rm`: manage GGUF files in the data directory and the models file."""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import os
import re
import sys
from pathlib import Path

import httpx
from tqdm import tqdm

from appliance.catalog import open_temp_file, peek_model_path
from appliance.config import ConfigError, LlamaCppBackendSpec, ModelSpec, Settings, load_models_file
from appliance.gguf_meta import GGUFError, read_info, validate
from appliance.models_pull import PullError, pull, write_models


def _place(tmp: Path, dst: Path) -> None:
    """Move a finished temporary file to `dst`, failing if anything (a symlink included) is there."""
    try:
        os.link(tmp, dst)  # atomic and never clobbers: EEXIST if dst appeared meanwhile
    except FileExistsError:
        raise ConfigError(f"{dst} already exists") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
        if os.path.lexists(dst):  # a file system without hard links: check, then rename
            raise ConfigError(f"{dst} already exists") from None
        os.replace(tmp, dst)
        return
    tmp.unlink()


def _copy_with_hash(src: Path, dst: Path) -> str:
    """Copy into a new unguessable temporary file next to `dst` (O_EXCL|O_NOFOLLOW), then into place."""
    digest = hashlib.sha256()
    fd, tmp = open_temp_file(dst.parent, f".{dst.name}.", ".part")
    try:
        with (
            os.fdopen(fd, "wb") as fo,
            src.open("rb") as fi,
            tqdm(total=src.stat().st_size, unit="B", unit_scale=True, desc=f"copying {src.name}") as bar,
        ):
            while block := fi.read(1 << 20):
                fo.write(block)
                digest.update(block)
                bar.update(len(block))
            fo.flush()
            os.fsync(fo.fileno())
        _place(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return digest.hexdigest()


def _hash(path: Path) -> str:
    from appliance.catalog import sha256_file

    return sha256_file(path, progress=True)


def cmd_add(settings: Settings, args: argparse.Namespace) -> int:
    src = Path(args.path).expanduser().resolve()
    if not src.is_file():
        raise ConfigError(f"no such file: {src}")
    try:
        info = validate(src)
    except (GGUFError, OSError) as e:
        print(f"appliance: {e}", file=sys.stderr)
        return 1
    model_id = args.id or re.sub(r"[^A-Za-z0-9._-]+", "-", src.stem).strip("-").lower()
    models = load_models_file(settings)
    names = {n for m in models.models for n in (m.id, *m.aliases)}
    if model_id in names:
        raise ConfigError(f"a model named {model_id!r} already exists (choose another with --id)")
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    dst = settings.models_dir / src.name
    # lexists: a dangling symlink planted at the destination counts as taken too.
    if os.path.lexists(dst) and dst.resolve() != src:
        raise ConfigError(f"{dst} already exists")
    if dst.resolve() == src:
        digest = _hash(src)
    elif args.link:
        try:
            dst.symlink_to(src)  # fails on anything already there, never follows it
        except FileExistsError:
            raise ConfigError(f"{dst} already exists") from None
        digest = _hash(src)
    else:
        digest = _copy_with_hash(src, dst)
    spec = ModelSpec(id=model_id, backends=[LlamaCppBackendSpec(path=dst.name, sha256=digest)])
    models.models.append(spec)
    where = write_models(settings, models)
    print(
        f"added {model_id}: {info.architecture}, {info.parameters_label or '?'} parameters, {info.quantization}, "
        f"context {info.context_length}, {info.size / 1e6:.1f} MB, sha256 {digest[:16]}…\n"
        f"  file: {dst}{' (link)' if args.link else ''}\n  models file: {where}"
    )
    return 0


def _loaded(settings: Settings) -> dict[str, bool] | None:
    """Which models a running appliance has loaded, or None if none answers."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    try:
        doc = httpx.get(f"http://{host}:{settings.port}/health", params={"verbose": 1}, timeout=1.5).json()
        return {m["id"]: any(b.get("state") == "ready" for b in m["backends"]) for m in doc.get("models", [])}
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    models = load_models_file(settings)
    loaded = _loaded(settings)
    rows = [("ID", "SIZE", "QUANT", "CONTEXT", "BACKENDS", "LOADED")]
    for m in models.models:
        size = quant = ctx = "-"
        first = m.backends[0]
        if isinstance(first, LlamaCppBackendSpec):
            path = peek_model_path(first.path, settings.models_dir)
            if path is not None:
                try:
                    info = read_info(path)
                    size, quant, ctx = f"{info.size / 1e6:.0f} MB", info.quantization, str(info.context_length)
                except (GGUFError, OSError):
                    size = "corrupt"
            else:
                size = "missing" if not first.path.startswith("embedded:") else "not assembled"
        state = "?" if loaded is None else ("yes" if loaded.get(m.id) else "no")
        rows.append((m.id, size, quant, ctx, ",".join(b.type for b in m.backends), state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_rm(settings: Settings, args: argparse.Namespace) -> int:
    models = load_models_file(settings)
    entry = next((m for m in models.models if m.id == args.id), None)
    if entry is None:
        raise ConfigError(f"no model {args.id!r} in {settings.models_file_path}")
    if entry.id == settings.default_model or settings.default_model in entry.aliases:
        raise ConfigError(f"{entry.id!r} is the default model (APPLIANCE_DEFAULT_MODEL); choose another first")
    models.models.remove(entry)
    write_models(settings, models)
    for b in entry.backends:
        if isinstance(b, LlamaCppBackendSpec) and not b.path.startswith("embedded:"):
            p = Path(b.path) if Path(b.path).is_absolute() else settings.models_dir / b.path
            if p.parent.resolve() == settings.models_dir.resolve() and (p.is_symlink() or p.is_file()):
                p.unlink()
                print(f"deleted {p}")
    print(f"removed {entry.id}")
    return 0


def cmd_pull(settings: Settings, args: argparse.Namespace) -> int:
    """Download a GGUF (URL or Hugging Face `owner/repo/file.gguf`) with a progress bar; resumes."""
    bars: dict[str, tqdm] = {}

    def progress(status: str, done: int, total: int | None, digest: str | None) -> None:
        if status.startswith("downloading"):
            bar = bars.get(status)
            if bar is None:
                bar = bars[status] = tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=status[12:])
            bar.update(done - bar.n)
            return
        for bar in bars.values():
            bar.close()
        bars.clear()
        print(status, file=sys.stderr)

    try:
        spec, pulled = asyncio.run(pull(settings, args.source, model_id=args.id, sha256=args.sha256, progress=progress))
    except PullError as e:
        print(f"appliance: {e}", file=sys.stderr)
        return 1
    finally:
        for bar in bars.values():
            bar.close()
    aliases = f" (also {', '.join(spec.aliases)})" if spec.aliases else ""
    print(
        f"pulled {spec.id}{aliases}: {pulled.size / 1e6:.1f} MB, sha256 {pulled.sha256[:16]}…\n"
        f"  file: {pulled.path}\n  models file: {settings.models_file_path}\n"
        "  a running appliance serves it after a restart (POST /api/pull adds it at once)"
    )
    return 0


def add_models_commands(sub: argparse._SubParsersAction, add_settings_flags, load) -> None:
    p = sub.add_parser("models", help="manage models: add, pull, list, rm")
    msub = p.add_subparsers(dest="models_command", required=True)
    a = msub.add_parser("add", help="check a GGUF file, copy (or link) it into the data directory, register it")
    a.add_argument("path")
    a.add_argument("--id", help="model id (default: from the file name)")
    a.add_argument("--link", action="store_true", help="symlink instead of copying")
    add_settings_flags(a)
    a.set_defaults(func=lambda args: cmd_add(load(args), args))
    a = msub.add_parser("pull", help="download a GGUF from a URL or Hugging Face (owner/repo/file.gguf), register it")
    a.add_argument("source", help="https://…/file.gguf, or owner/repo/file.gguf[@revision] (HF_ENDPOINT honoured)")
    a.add_argument("--id", help="model id (default: from the file name)")
    a.add_argument("--sha256", help="expected sha256 (default: Hugging Face's, when it names one)")
    add_settings_flags(a)
    a.set_defaults(func=lambda args: cmd_pull(load(args), args))
    a = msub.add_parser("list", help="list configured models")
    add_settings_flags(a)
    a.set_defaults(func=lambda args: cmd_list(load(args), args))
    a = msub.add_parser("rm", help="unregister a model and delete its file from the data directory")
    a.add_argument("id")
    add_settings_flags(a)
    a.set_defaults(func=lambda args: cmd_rm(load(args), args))
