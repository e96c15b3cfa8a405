"""Host, process and GPU readings for /metrics (psutil, `nvidia-smi`). Blocking: call from a thread.

The GPU part uses only the standard library, so it can be checked on a GPU host without the appliance's
dependencies: `python3 -c "from appliance.observability.system import query_gpus; print(query_gpus())"`.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024
_GPU_QUERY = "index,memory.used,memory.total,utilization.gpu"


@dataclass
class GpuReading:
    index: str
    memory_used_bytes: float | None
    memory_total_bytes: float | None
    utilization_percent: float | None


@dataclass
class SystemReading:
    process_rss_bytes: float = 0.0
    process_cpu_percent: float = 0.0
    host_cpu_percent: float = 0.0
    host_memory_used_bytes: float = 0.0
    host_memory_total_bytes: float = 0.0
    disk_free_bytes: float = 0.0
    disk_total_bytes: float = 0.0
    gpus: list[GpuReading] = field(default_factory=list)


def _num(s: str) -> float | None:
    try:
        return float(s.strip())
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def parse_nvidia_smi(text: str) -> list[GpuReading]:
    """Parse `nvidia-smi --query-gpu=index,memory.used,memory.total,utilization.gpu --format=csv,noheader,nounits`."""
    out = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4 or not parts[0]:
            continue
        used, total, util = _num(parts[1]), _num(parts[2]), _num(parts[3])
        out.append(
            GpuReading(
                index=parts[0],
                memory_used_bytes=used * MiB if used is not None else None,
                memory_total_bytes=total * MiB if total is not None else None,
                utilization_percent=util,
            )
        )
    return out


def query_gpus(timeout: float = 5.0) -> list[GpuReading]:
    """One reading per NVIDIA GPU; [] without `nvidia-smi` or when it fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        r = subprocess.run(
            [exe, f"--query-gpu={_GPU_QUERY}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(r.stdout) if r.returncode == 0 else []


def _existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


class SystemSampler:
    """Keeps psutil.Process objects between readings so CPU percentages cover the time since the last one."""

    def __init__(self, data_dir: Path, gpus: bool = True):
        import psutil

        self._psutil = psutil
        self.data_dir = data_dir
        self.gpus = gpus and shutil.which("nvidia-smi") is not None
        self._me = psutil.Process()
        self._children: dict[int, object] = {}
        self._me.cpu_percent(None)
        psutil.cpu_percent(None)

    def read(self) -> SystemReading:
        """The appliance's own figures cover the API process and its children (the model workers)."""
        ps = self._psutil
        r = SystemReading()
        procs = [self._me]
        try:
            kids = self._me.children(recursive=True)
        except ps.Error:
            kids = []
        live = {}
        for k in kids:
            live[k.pid] = self._children.get(k.pid) or k
        self._children = live
        procs += list(live.values())
        for p in procs:
            try:
                with p.oneshot():  # type: ignore[attr-defined]
                    r.process_rss_bytes += p.memory_info().rss  # type: ignore[attr-defined]
                    r.process_cpu_percent += p.cpu_percent(None)  # type: ignore[attr-defined]
            except ps.Error:
                continue
        r.host_cpu_percent = ps.cpu_percent(None)
        vm = ps.virtual_memory()
        r.host_memory_total_bytes = vm.total
        r.host_memory_used_bytes = vm.total - vm.available
        try:
            du = ps.disk_usage(str(_existing(self.data_dir)))
            r.disk_free_bytes, r.disk_total_bytes = du.free, du.total
        except OSError:
            pass
        if self.gpus:
            r.gpus = query_gpus()
        return r
