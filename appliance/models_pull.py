"""Getting models: fetch a GGUF from an http(s) URL or a Hugging Face reference into the models directory.

Used by `appliance models pull SOURCE` (a progress bar) and Ollama's `POST /api/pull` (progress lines).

- SOURCE is `https://host/path/file.gguf`, or `owner/repo/path/file.gguf` (optionally `hf.co/…` and
  `…@revision`), fetched from `$HF_ENDPOINT/owner/repo/resolve/<revision>/path/file.gguf` (HF_ENDPOINT:
  default https://huggingface.co, so an on-prem mirror works; HF_TOKEN is sent to it for gated repos).
- The download goes to `<models_dir>/.<file>.partial` (opened without following symlinks, locked against a
  second pull of the same file) and resumes from there with an HTTP Range request after an interruption.
- sha256 is checked when known: `--sha256`, or Hugging Face's `X-Linked-Etag` (or an `ETag` that is one).
  A mismatch deletes the partial file. The GGUF header is checked too.
- Then it is moved into place with os.replace and registered in the models file (id from the file name;
  a Hugging Face reference is also an alias, so the name the client pulled is the name it can use).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import httpx
import tomli_w

from appliance.catalog import open_temp_file
from appliance.config import ConfigError, LlamaCppBackendSpec, ModelsFile, ModelSpec, Settings, load_models_file
from appliance.gguf_meta import GGUFError, read_info

HF_DEFAULT = "https://huggingface.co"
CHUNK = 1 << 20
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*\.gguf$", re.IGNORECASE)
_HF_REF = re.compile(rf"^(?:(?:hf\.co|huggingface\.co)/)?({_PART})/({_PART})/((?:{_PART}/)*{_PART})(?:@([\w.-]+))?$")
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")

# (status, completed bytes, total bytes or None, the expected "sha256:<hex>" once known, else None)
Progress = Callable[[str, int, int | None, str | None], None]


class PullError(Exception):
    """A pull that cannot go on, with the HTTP status an API would answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Source:
    url: str
    filename: str
    alias: str | None = None  # the Hugging Face reference as given: also a name for the model
    hf: bool = False


@dataclass(frozen=True, slots=True)
class Pulled:
    model_id: str
    path: Path
    sha256: str
    size: int


def resolve(source: str, env: Mapping[str, str]) -> Source:
    """Where SOURCE is fetched from (no network)."""
    source = source.strip()
    if source.startswith(("http://", "https://")):
        parts = urlsplit(source)
        filename = unquote(parts.path.rsplit("/", 1)[-1])
        if not parts.netloc or not _FILE.match(filename):
            raise PullError(400, f"{source!r}: the URL must name a .gguf file")
        return Source(source, filename)
    m = _HF_REF.match(source)
    if m is None or not _FILE.match(m.group(3).rsplit("/", 1)[-1]):
        raise PullError(
            400, f"{source!r} is neither an http(s) URL nor a Hugging Face reference 'owner/repo/file.gguf'"
        )
    owner, repo, path, rev = m.group(1), m.group(2), m.group(3), m.group(4) or "main"
    endpoint = (env.get("HF_ENDPOINT") or HF_DEFAULT).rstrip("/")
    url = f"{endpoint}/{owner}/{repo}/resolve/{quote(rev, safe='')}/{quote(path)}"
    alias = source if _MODEL_ID.match(source) else None
    return Source(url, path.rsplit("/", 1)[-1], alias, hf=True)


def model_id_for(filename: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(filename).stem).strip("-").lower() or "model"


def _expected_sha(responses: list[httpx.Response]) -> str | None:
    """Hugging Face names an LFS file's sha256 in X-Linked-Etag (on the redirect) or ETag."""
    for r in responses:
        for h in ("x-linked-etag", "etag"):
            v = r.headers.get(h, "").removeprefix("W/").strip('"').lower()
            if _SHA.match(v):
                return v
    return None


def _open_partial(path: Path) -> int:
    """The partial download, created or reopened for append: never through a symlink, never a non-file."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        raise PullError(500, f"cannot write {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PullError(500, f"{path} is not a regular file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        name = path.name.removeprefix(".").removesuffix(".partial")
        raise PullError(409, f"another pull of {name} is running") from None
    return fd


def _total(r: httpx.Response, have: int) -> int | None:
    if r.status_code == 206:
        m = re.match(r"bytes (\d+)-\d+/(\d+)", r.headers.get("content-range", ""))
        if m is None or int(m.group(1)) != have:
            return None
        return int(m.group(2))
    n = r.headers.get("content-length")
    return int(n) if n and n.isdigit() else None


async def download(
    src: Source,
    dest_dir: Path,
    *,
    sha256: str | None = None,
    progress: Progress | None = None,
    env: Mapping[str, str] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> tuple[Path, str, int]:
    """Fetch `src` into `dest_dir` (resuming a partial download), verify, move into place: (path, sha256, size)."""
    report = progress or (lambda status, done, total, digest: None)
    env = os.environ if env is None else env
    dest_dir.mkdir(parents=True, exist_ok=True)
    partial = dest_dir / f".{src.filename}.partial"
    headers = {"User-Agent": "appliance"}
    if src.hf and env.get("HF_TOKEN"):
        headers["Authorization"] = f"Bearer {env['HF_TOKEN']}"  # httpx drops it on a redirect elsewhere
    fd = _open_partial(partial)
    with os.fdopen(fd, "r+b") as f:
        expected = sha256.lower() if sha256 else None
        report("pulling manifest", 0, None, None)
        timeout = httpx.Timeout(30.0, read=60.0)
        try:
            async with httpx.AsyncClient(follow_redirects=True, timeout=timeout, transport=transport) as client:
                for _ in range(2):  # a second try from byte 0 if the server will not resume
                    have = f.seek(0, os.SEEK_END)
                    h = {**headers, **({"Range": f"bytes={have}-"} if have else {})}
                    async with client.stream("GET", src.url, headers=h) as r:
                        if r.status_code == 416 and have:  # nothing left to fetch, or a stale partial
                            m = re.match(r"bytes \*/(\d+)", r.headers.get("content-range", ""))
                            if m is not None and int(m.group(1)) == have:
                                expected = expected or _expected_sha([*r.history, r])
                                break
                            f.truncate(0)
                            continue
                        _check_status(r, src)
                        expected = expected or _expected_sha([*r.history, r])
                        total = _total(r, have)
                        if r.status_code != 206 or total is None:  # no resume: start over
                            f.seek(0)
                            f.truncate(0)
                            have, total = 0, _total(r, 0) if r.status_code == 200 else None
                        if total is not None and shutil.disk_usage(dest_dir).free < total - have:
                            raise PullError(507, f"not enough disk space in {dest_dir} for {total - have} bytes")
                        status = f"downloading {src.filename}"
                        known = f"sha256:{expected}" if expected else None
                        report(status, have, total, known)
                        async for block in r.aiter_bytes(CHUNK):
                            f.write(block)
                            have += len(block)
                            report(status, have, total, known)
                        if total is not None and have != total:
                            raise PullError(
                                502, f"the download stopped at {have} of {total} bytes; pull again to resume"
                            )
                        break
        except httpx.TransportError as e:
            host = urlsplit(src.url).netloc
            raise PullError(
                503,
                f"cannot reach {host} ({type(e).__name__}: {e}); offline? pull again to resume"
                + (", or set HF_ENDPOINT to a mirror" if src.hf else ""),
            ) from None
        f.flush()
        os.fsync(f.fileno())
        report("verifying sha256 digest", have, have, None)
        digest = _hash(f)
        if expected is not None and digest != expected:
            partial.unlink(missing_ok=True)
            raise PullError(502, f"sha256 mismatch for {src.filename}: expected {expected}, got {digest}")
        try:
            if not read_info(partial).architecture:
                raise GGUFError("no general.architecture in its header")
        except (GGUFError, OSError) as e:
            partial.unlink(missing_ok=True)
            raise PullError(400, f"{src.filename} is not a usable GGUF file: {e}") from None
        final = dest_dir / src.filename
        if final.is_dir():
            raise PullError(409, f"{final} is a directory")
        os.replace(partial, final)  # atomic; replaces a link at `final` rather than writing through it
    return final, digest, have


def _check_status(r: httpx.Response, src: Source) -> None:
    if r.status_code in (200, 206):
        return
    if r.status_code in (401, 403):
        hint = " (a gated repository? set HF_TOKEN)" if src.hf else ""
        raise PullError(403, f"{src.url}: the server refused access ({r.status_code}){hint}")
    if r.status_code == 404:
        raise PullError(404, f"{src.url}: not found")
    raise PullError(502, f"{src.url}: the server answered {r.status_code}")


def _hash(f) -> str:
    digest = hashlib.sha256()
    f.seek(0)
    while block := f.read(CHUNK):
        digest.update(block)
    return digest.hexdigest()


def write_models(settings: Settings, models: ModelsFile) -> Path:
    """Replace the models file atomically, keeping an existing file's mode and owner.

    On an install the file is /etc/appliance/models.toml, root:appliance 0640 and read-only to the
    service: run `models add|rm` as root (sudo). A symlinked models file is refused rather than
    replaced or written through.
    """
    path = settings.models_file_path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise ConfigError(
            f"APPLIANCE_MODELS_FILE {path} is not a regular file (a symlink?): point the setting at the file itself"
        )
    data = models.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
    for m in data["models"]:
        if not m.get("aliases"):
            m.pop("aliases", None)
    text = "# Models served by the appliance (see README: The models file).\n\n" + tomli_w.dumps(data)
    fd, tmp = open_temp_file(path.parent, ".models-", ".toml.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if st is not None:
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
            with contextlib.suppress(OSError):  # only root may give the file away
                os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def register(settings: Settings, src: Source, path: Path, digest: str, model_id: str | None = None) -> ModelSpec:
    """Add (or, for the same file pulled again, update) the models-file entry; the written spec."""
    models = load_models_file(settings)
    mid = model_id or model_id_for(src.filename)
    spec = ModelSpec(id=mid, backends=[LlamaCppBackendSpec(path=path.name, sha256=digest)])
    existing = next((m for m in models.models if m.id == mid), None)
    if existing is not None:
        first = existing.backends[0]
        if not (isinstance(first, LlamaCppBackendSpec) and first.path == path.name):
            raise PullError(409, f"a model named {mid!r} already exists with another file (choose another id)")
        first.sha256 = digest
        spec = existing
    else:
        names = {n for m in models.models for n in (m.id, *m.aliases)}
        if mid in names:
            raise PullError(409, f"{mid!r} is already a model alias (choose another id)")
        if src.alias is not None and src.alias != mid and src.alias not in names:
            spec.aliases.append(src.alias)
        models.models.append(spec)
    try:
        write_models(settings, ModelsFile(models=models.models))
    except (ConfigError, OSError) as e:
        raise PullError(500, f"cannot write the models file: {e}") from None
    return spec


async def pull(
    settings: Settings,
    source: str,
    *,
    model_id: str | None = None,
    sha256: str | None = None,
    progress: Progress | None = None,
    env: Mapping[str, str] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> tuple[ModelSpec, Pulled]:
    """Resolve, download, verify, place and register SOURCE."""
    env = os.environ if env is None else env
    if sha256 is not None and not _SHA.match(sha256.lower()):
        raise PullError(400, "sha256 must be 64 hexadecimal digits")
    if model_id is not None and not _MODEL_ID.match(model_id):
        raise PullError(400, f"invalid model id {model_id!r}")
    src = resolve(source, env)
    path, digest, size = await download(
        src, settings.models_dir, sha256=sha256, progress=progress, env=env, transport=transport
    )
    report = progress or (lambda status, done, total, digest: None)
    report("writing manifest", size, size, None)
    spec = register(settings, src, path, digest, model_id)
    report("success", size, size, None)
    return spec, Pulled(spec.id, path, digest, size)
