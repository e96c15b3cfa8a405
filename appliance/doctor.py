"""`appliance doctor`: check that this host can run the appliance, one line per check.

Each line is `OK`, `WARN` (works, but worse than it could) or `FAIL` (the service would not start or
would not work). `run_doctor` returns 1 when any check failed, else 0.
"""

from __future__ import annotations

import errno
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import psutil

from appliance.catalog import ModelFileError, embedded_smollm2, peek_model_path, resolve_model_path, sha256_file
from appliance.config import (
    GEMMA_MODEL_PATH,
    ConfigError,
    LlamaCppBackendSpec,
    ModelsFile,
    Settings,
    load_models_file,
    load_settings,
)

OK, WARN, FAIL = "OK", "WARN", "FAIL"
GGUF_MAGIC = b"GGUF"
MiB = 1024 * 1024

# llama.cpp's compile-time CPU features (llama_print_system_info) → the /proc/cpuinfo flag they need.
BUILD_FEATURES = {
    "SSE3": "pni",
    "SSSE3": "ssse3",
    "AVX": "avx",
    "AVX2": "avx2",
    "FMA": "fma",
    "F16C": "f16c",
    "BMI2": "bmi2",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
    "AMX_INT8": "amx_int8",
}
_SYSTEM_INFO = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"


class _Report:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.failed = False

    def __call__(self, status: str, name: str, message: str) -> None:
        self.failed |= status == FAIL
        print(f"{status:<4} {name}: {message}", file=self.out, flush=True)


def run_doctor(settings: Settings | None = None, out: TextIO = sys.stdout, config_file: Path | None = None) -> int:
    """Run every check and print one line each; return 1 if any FAILed, else 0.

    With `settings=None` the settings are loaded here (from `config_file` and APPLIANCE_*), so a bad
    setting is reported as a FAIL line instead of an exception.
    """
    report = _Report(out)
    if settings is None:
        try:
            settings = load_settings(config_file)
        except ConfigError as e:
            report(FAIL, "config", str(e))
            return 1
    models: ModelsFile | None = None
    try:
        models = load_models_file(settings)
        report(OK, "config", f"{len(models.models)} model(s) from {settings.models_file or 'built-in models'}")
    except ConfigError as e:
        report(FAIL, "config", str(e))

    flags = cpu_flags()
    check_cpu(report, flags)
    check_llama_build(report, flags)
    has_gpu = check_gpu(report, settings)
    sizes = check_models(report, settings, models) if models is not None else {}
    check_memory(report, sizes)
    check_data_dir(report, settings.data_dir)
    check_port(report, settings.host, settings.port)
    if models is not None:
        check_backends(report, models)
    check_shared(report, settings)
    if has_gpu is False and settings.gpu_layers != 0:
        report(WARN, "gpu", f"APPLIANCE_GPU_LAYERS={settings.gpu_layers} but no GPU was found")
    return 1 if report.failed else 0


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo (empty when unreadable)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / aarch64
            return set(value.split())
    return set()


def check_cpu(report: Callable[[str, str, str], None], flags: set[str]) -> None:
    machine = platform.machine()
    if machine not in ("x86_64", "AMD64"):
        status = OK if machine in ("aarch64", "arm64") else WARN
        report(status, "cpu", f"{machine}, {psutil.cpu_count(logical=False) or '?'} cores")
        return
    present = [f for f in ("avx2", "fma", "f16c", "avx512f") if f in flags]
    missing = [f for f in ("avx2", "fma", "f16c") if f not in flags]
    amx = "amx present" if any(f.startswith("amx") for f in flags) else "no amx"
    cores = psutil.cpu_count(logical=False) or "?"
    msg = f"x86_64, {cores} cores, {' '.join(present) or 'no avx2/fma/f16c/avx512f'} ({amx})"
    if missing:
        report(WARN, "cpu", f"{msg}; missing {' '.join(missing)}: llama.cpp will be slow")
    else:
        report(OK, "cpu", msg)


def check_llama_build(report: Callable[[str, str, str], None], flags: set[str]) -> None:
    """Run llama.cpp in a child process: a build for CPU features this host lacks dies of SIGILL."""
    try:
        proc = subprocess.run([sys.executable, "-c", _SYSTEM_INFO], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        report(WARN, "llama.cpp", "loading llama_cpp took over 60 s")
        return
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        if proc.returncode < 0:
            last = f"killed by signal {-proc.returncode} (SIGILL: built for CPU features this host lacks)"
        report(FAIL, "llama.cpp", f"cannot load llama_cpp: {last}")
        return
    info = proc.stdout
    built = {name for name in BUILD_FEATURES if f" {name} = 1" in info}
    lacking = sorted(name for name in built if flags and BUILD_FEATURES[name] not in flags)
    gpu = "CUDA" if "CUDA" in info else "CPU only"
    summary = f"built for {' '.join(sorted(built)) or 'generic x86/arm'}, {gpu}"
    if lacking:
        report(FAIL, "llama.cpp", f"{summary}; this CPU lacks {' '.join(lacking)}: rebuild (see README)")
    else:
        report(OK, "llama.cpp", summary)


def check_gpu(report: Callable[[str, str, str], None], settings: Settings) -> bool | None:
    """True/False: an NVIDIA GPU was/wasn't found; None: nvidia-smi failed."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        report(OK, "gpu", "no nvidia-smi on PATH: CPU inference")
        return False
    query = [smi, "--query-gpu=name,memory.total", "--format=csv,noheader"]
    try:
        proc = subprocess.run(query, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        report(WARN, "gpu", f"nvidia-smi failed: {e}")
        return None
    gpus = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not gpus:
        report(WARN, "gpu", f"nvidia-smi failed: {(proc.stderr or proc.stdout).strip()[:200]}")
        return None
    hint = "" if settings.gpu_layers else " (APPLIANCE_GPU_LAYERS=0: not used)"
    report(OK, "gpu", "; ".join(gpus) + hint)
    return True


def check_models(report: Callable[[str, str, str], None], settings: Settings, models: ModelsFile) -> dict[str, int]:
    """Resolve and verify each llamacpp backend's GGUF; return {model id: largest file size}."""
    sizes: dict[str, int] = {}
    for model in models.models:
        for backend in model.backends:
            if not isinstance(backend, LlamaCppBackendSpec):
                continue
            path = backend.path
            name = f"model {model.id}"
            if path == GEMMA_MODEL_PATH and peek_model_path(path, settings.models_dir) is None:
                # Assembled from its chunk packages on first load: the doctor never writes a model file.
                report(OK, name, f"{path}: not assembled yet (the first load assembles it)")
                continue
            try:
                file = resolve_model_path(path, settings.models_dir, progress=False)
                detail = _verify_gguf(path, file)
            except (ModelFileError, OSError) as e:
                report(FAIL, name, f"{path}: {e}")
                continue
            size = file.stat().st_size
            sizes[model.id] = max(sizes.get(model.id, 0), size)
            report(OK, name, f"{path} → {file} ({size / MiB:.0f} MiB, {detail})")
    return sizes


def _verify_gguf(spec: str, file: Path) -> str:
    with file.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelFileError(f"{file} is not a GGUF file (bad magic)")
    if spec == "embedded:smollm2":
        expected = embedded_smollm2()[1]
        if not expected:
            return "GGUF, no checksum in the wheel's RECORD"
        if sha256_file(file) != expected:
            raise ModelFileError(f"{file} fails its sha256 check (reinstall: uv sync --reinstall)")
        return "sha256 ok"
    return "GGUF"


def check_memory(report: Callable[[str, str, str], None], sizes: dict[str, int]) -> None:
    mem = psutil.virtual_memory()
    need = sum(sizes.values())
    msg = f"{mem.available / MiB:.0f} MiB available of {mem.total / MiB:.0f} MiB; models {need / MiB:.0f} MiB"
    if sizes and max(sizes.values()) > mem.total:
        report(FAIL, "memory", f"{msg}: the largest model does not fit in RAM")
    elif need > mem.available:
        report(WARN, "memory", f"{msg}: not all models fit at once (plus KV cache)")
    else:
        report(OK, "memory", msg)


def check_data_dir(report: Callable[[str, str, str], None], data_dir: Path) -> None:
    if data_dir.exists():
        if not data_dir.is_dir():
            report(FAIL, "data dir", f"{data_dir} is not a directory")
        elif os.access(data_dir, os.W_OK | os.X_OK):
            report(OK, "data dir", f"{data_dir} is writable")
        else:
            report(FAIL, "data dir", f"{data_dir} is not writable by uid {os.getuid()}")
        return
    parent = data_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
        report(OK, "data dir", f"{data_dir} will be created")
    else:
        report(FAIL, "data dir", f"{data_dir} does not exist and cannot be created (uid {os.getuid()})")


def check_port(report: Callable[[str, str, str], None], host: str, port: int) -> None:
    if port == 0:
        report(OK, "port", "APPLIANCE_PORT=0: a free port is picked at start")
        return
    where = f"{host}:{port}"
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            s.bind(addr)
    except OSError as e:
        if e.errno == errno.EADDRINUSE and (running := running_appliance(host, port)) is not None:
            report(OK, "port", f"{where} is served by a running appliance ({running})")
            return
        reason = "already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        report(FAIL, "port", f"cannot bind {where}: {reason}")
        return
    report(OK, "port", f"{where} is free")


def running_appliance(host: str, port: int) -> str | None:
    """What /health on the port says when an appliance answers there ("status ok, version …"), else None."""
    import httpx

    connect = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    netloc = f"[{connect}]:{port}" if ":" in connect else f"{connect}:{port}"
    try:
        r = httpx.get(f"http://{netloc}/health", timeout=2.0)
        doc = r.json()
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(doc, dict) or "status" not in doc or r.headers.get("x-request-id") is None:
        return None  # something else holds the port
    version = doc.get("version")
    return f"status {doc['status']}" + (f", version {version}" if version else "")


def check_backends(report: Callable[[str, str, str], None], models: ModelsFile) -> None:
    """HTTP backends (`ollama`, `remote`) answer at their base_url (any HTTP status counts)."""
    import httpx

    for model in models.models:
        for backend in model.backends:
            if isinstance(backend, LlamaCppBackendSpec) or not backend.base_url:
                continue
            url = backend.base_url
            name = f"backend {model.id} ({backend.type})"
            try:
                r = httpx.get(str(url), timeout=2.0)
                report(OK, name, f"{url} answered HTTP {r.status_code}")
            except httpx.HTTPError as e:
                report(WARN, name, f"{url} unreachable: {e or type(e).__name__}")


def check_shared(report: Callable[[str, str, str], None], settings: Settings) -> None:
    """The parts that several boxes share (README "Several boxes"), when set: each Postgres database answers
    and has the current schema, Redis answers PING, the Chroma server answers its heartbeat. A node cannot
    serve without them, so each one that fails is a FAIL."""
    from appliance.db import redact

    databases = dict.fromkeys(u for u in (settings.database_url, settings.threads_url) if u)
    for url in databases:
        import psycopg

        from appliance.db.migrations import applied, connect, latest

        name = f"database {redact(url)}"
        try:
            with connect(url) as conn:
                version = max(applied(conn), default=0)
        except psycopg.Error as e:
            report(FAIL, name, str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__)
            continue
        if version < latest():
            report(FAIL, name, f"schema version {version} of {latest()}: run `appliance db upgrade`")
        else:
            report(OK, name, f"schema version {version}")
    if settings.limits_url:
        import redis

        name = f"limits {redact(settings.limits_url)}"
        try:
            client = redis.Redis.from_url(settings.limits_url, socket_timeout=2, socket_connect_timeout=2)
            client.ping()
            client.close()
            report(OK, name, "Redis answered PING")
        except redis.RedisError as e:
            report(FAIL, name, f"Redis unreachable: {e}")
    if settings.memory_url:
        import httpx

        url = settings.memory_url.rstrip("/")
        name = f"chroma {redact(url)}"
        try:
            r = httpx.get(f"{url}/api/v2/heartbeat", timeout=2.0)
            if r.status_code == 200:
                report(OK, name, "Chroma server answered its heartbeat")
            else:
                report(FAIL, name, f"{url}/api/v2/heartbeat answered HTTP {r.status_code}: not a Chroma server?")
        except httpx.HTTPError as e:
            report(FAIL, name, f"Chroma server unreachable: {e or type(e).__name__}")
