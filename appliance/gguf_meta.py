"""GGUF metadata for listings (architecture, context, quantization, size), fast and cached.

`gguf.GGUFReader` parses every tensor and token (about 2 s for a 100 MB model), fine for validating a
file once (`appliance models add`) but too slow for `/api/tags`. This reads only the key/value header,
skipping arrays, and caches the result per (path, size, mtime).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    pass


@dataclass(frozen=True)
class GGUFInfo:
    path: str
    size: int
    architecture: str
    name: str
    context_length: int
    file_type: int
    parameters_label: str
    has_chat_template: bool
    metadata: dict[str, Any]

    @property
    def quantization(self) -> str:
        import gguf  # (and numpy) only when a listing asks: the CLI and the app import this module at start

        try:
            return gguf.LlamaFileType(self.file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            return f"type {self.file_type}" if self.file_type >= 0 else "unknown"


def _read(f: BinaryIO, fmt: str) -> Any:
    n = struct.calcsize(fmt)
    b = f.read(n)
    if len(b) != n:
        raise GGUFError("truncated GGUF header")
    return struct.unpack(fmt, b)[0]


def _string(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    if n > 1 << 24:
        raise GGUFError("corrupt GGUF header (string too long)")
    b = f.read(n)
    if len(b) != n:
        raise GGUFError("truncated GGUF header")
    return b.decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int) -> Any:
    if vtype in _SCALARS:
        return _read(f, _SCALARS[vtype])
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        etype, count = _read(f, "<I"), _read(f, "<Q")
        if etype in _SCALARS:  # skip fixed-size elements in one seek
            f.seek(struct.calcsize(_SCALARS[etype]) * count, 1)
        else:
            for _ in range(count):
                _value(f, etype)
        return None  # arrays (vocabularies) are not needed for listings
    raise GGUFError(f"corrupt GGUF header (value type {vtype})")


@functools.lru_cache(maxsize=64)
def _info(path: str, size: int, mtime: float) -> GGUFInfo:
    meta: dict[str, Any] = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (bad magic)")
        version = _read(f, "<I")
        if version not in (2, 3):
            raise GGUFError(f"{path}: unsupported GGUF version {version}")
        _read(f, "<Q")  # tensor count
        for _ in range(_read(f, "<Q")):
            key = _string(f)
            meta[key] = _value(f, _read(f, "<I"))
    arch = str(meta.get("general.architecture", ""))
    return GGUFInfo(
        path=path,
        size=size,
        architecture=arch,
        name=str(meta.get("general.name", "")),
        context_length=int(meta.get(f"{arch}.context_length", 0) or 0),
        file_type=int(meta.get("general.file_type", -1)),
        parameters_label=str(meta.get("general.size_label", "")),
        has_chat_template="tokenizer.chat_template" in meta,
        metadata={k: v for k, v in meta.items() if v is not None and not k.startswith("tokenizer.")},
    )


def read_info(path: Path) -> GGUFInfo:
    st = path.stat()
    return _info(str(path), st.st_size, st.st_mtime)


def validate(path: Path) -> GGUFInfo:
    """Full check with the `gguf` library: header, tensor table and that every tensor lies inside the file."""
    import gguf

    info = read_info(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the library raises ValueError/IndexError/struct errors on corrupt files
        raise GGUFError(f"{path} is corrupt or truncated: {e}") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > path.stat().st_size:
        raise GGUFError(f"{path} is truncated: tensors need {end} bytes, the file has {path.stat().st_size}")
    if not info.architecture:
        raise GGUFError(f"{path} has no general.architecture")
    return info
