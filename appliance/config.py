"""Settings (environment, `.env`, `--config` file, CLI flags) and the models file schema.

Precedence, highest first: CLI flags, the `--config` TOML file, `APPLIANCE_*` environment variables,
the `.env` file, built-in defaults. Long because every setting is declared here, once, with its bounds and
its description (which `--help` and the docs show).
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
KVCacheType = Literal["f16", "q8_0", "q4_0", "bf16", "f32"]
EMBEDDED_MODEL_PATH = "embedded:smollm2"
GEMMA_MODEL_PATH = "embedded:gemma3-270m"
_PG, _HTTP = ("postgresql", "postgres"), ("http", "https")
_URL_SCHEMES = {"database_url": _PG, "threads_url": _PG, "memory_url": _HTTP, "limits_url": ("redis", "rediss")}
_URL_SCHEMES["otel_endpoint"] = _HTTP


def _default_threads() -> int:
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except Exception:  # pragma: no cover - psutil is a dependency
        return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    """Everything an admin can set. Environment variables are `APPLIANCE_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="APPLIANCE_", env_file=".env", extra="ignore", validate_default=True)

    host: str = Field("127.0.0.1", description="bind address; a non-loopback one needs API keys")
    port: int = Field(8000, ge=0, le=65535, description="bind port")
    data_dir: Path = Field(
        Path.home() / ".local" / "share" / "appliance", description="models, databases and caches live here"
    )
    models_file: Path | None = Field(
        None,
        description="TOML list of models and their backends; default <data_dir>/models.toml if it exists, "
        "else the embedded model",
    )
    default_model: str = Field(DEFAULT_MODEL_ID, description="model loaded at start; also answers to `default`")

    # llama.cpp defaults; a models-file backend entry can override each of them.
    context_size: int = Field(
        8192, ge=64, description="tokens of context per slot (capped at the model's training context)"
    )
    threads: int = Field(
        default_factory=_default_threads, ge=1, description="llama.cpp compute threads; default: the physical CPU cores"
    )
    gpu_layers: int = Field(0, ge=-1, description="layers offloaded to the GPU; -1: all")
    parallel: int = Field(
        8,
        ge=1,
        le=64,
        description="slots (concurrent sequences) per model; each holds context_size tokens of KV cache "
        "(SmolLM2 at 8192: 180 MiB f16, 96 MiB q8_0)",
    )
    batch_size: int = Field(512, ge=16, description="tokens per llama_decode call (prefill chunk)")
    ubatch_size: int | None = Field(
        None, ge=8, description="tokens per llama.cpp compute pass; default: batch_size, or 48 when batch_invariant"
    )
    batch_invariant: bool = Field(
        False,
        description="outputs independent of batching and caching (compute passes under 64 tokens): the same "
        "prompt gives the same tokens alone, batched or from a cache, for slower prompt processing (measured on "
        "2 cores: 5.3 s instead of 3.75 s for ~1,100 tokens)",
    )
    kv_cache_type: KVCacheType = Field(
        "f16", description="KV cache element type; q8_0 halves its memory (and turns flash attention on)"
    )
    prompt_cache_mib: int = Field(
        1024,
        ge=0,
        description="RAM per model worker for slot caches parked when another prompt takes their slot, restored "
        "when their conversation or prompt comes back (as llama-server's --cache-ram); 0: off",
    )
    default_max_tokens: int = Field(
        512, ge=1, description="generation cap when a request sets no max_tokens (a request may ask for more)"
    )
    stream_interval: float = Field(
        0.025,
        ge=0,
        le=1,
        description="seconds a worker gathers streamed text before sending it on (the first token and the end "
        "go at once); fewer wake-ups of the API process and the client leave more CPU to the model; 0: every token",
    )

    # HTTP
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="request body limit in bytes (413 above)")
    drain_timeout: float = Field(30.0, ge=0, description="seconds in-flight requests get to finish after SIGTERM")
    max_queue: int = Field(16, ge=0, description="requests waiting for a slot, per model, before a 503")
    queue_timeout: float = Field(60.0, gt=0, description="seconds a request may wait for a slot before a 503")
    worker_start_timeout: float = Field(120.0, gt=0, description="seconds a model worker may take to load")

    # Model residency
    keep_alive: float = Field(300.0, description="seconds an idle model stays loaded; < 0 forever")
    memory_budget: int | None = Field(
        None,
        ge=0,
        description="bytes for loaded models (idle ones are unloaded, LRU first, to fit); default 80% of free RAM",
    )

    # Fallback and resilience
    first_token_timeout: float = Field(
        60.0, gt=0, description="seconds a backend may take to the first token before the next one is tried"
    )
    request_deadline: float = Field(120.0, gt=0, description="seconds for all retries and fallbacks of one request")
    retries: int = Field(1, ge=0, le=10, description="retries of a transient failure on the same backend")
    breaker_failures: int = Field(3, ge=1, description="consecutive failures that open a backend's circuit")
    breaker_cooldown: float = Field(30.0, gt=0, description="seconds an open circuit waits before a probe")

    # Agent, threads, memory, embeddings (appliance/agent, appliance/memory)
    agent_enabled: bool = Field(True, description="serve the `agent` models, /v1/threads and /v1/memories")
    agent_recursion_limit: int = Field(25, ge=4, le=1000, description="graph steps one agent run may take")
    agent_timeout: float = Field(120.0, gt=0, description="seconds one agent run may take")
    agent_memory_k: int = Field(4, ge=0, le=50, description="memories recalled into each agent turn")
    agent_memory_min_score: float = Field(0.2, ge=-1, le=1, description="cosine similarity a recalled memory needs")
    agent_history_tokens: int = Field(3000, ge=256, description="approximate tokens of thread history in the prompt")
    agent_tool_choice: Literal["forced", "auto"] = Field(
        "forced",
        description="the agent's first step: `forced` makes the model call a tool or `respond` (grammar-enforced "
        "choice, for small models); `auto` lets it call a tool or answer in text",
    )
    agent_tool_rounds: int = Field(
        1, ge=0, le=20, description="model steps per turn that may call tools, before the answer; 0: no tools"
    )
    max_threads_per_key: int = Field(
        1000, ge=0, description="agent threads one key (or user) may keep; a new one beyond is 429; 0: no limit"
    )
    max_memories_per_key: int = Field(
        10_000, ge=0, description="memories one key (or user) may keep; saving one beyond is 429; 0: no limit"
    )
    max_responses_per_key: int = Field(
        1000,
        ge=0,
        description="Responses API responses one key keeps for GET and previous_response_id (oldest dropped "
        "beyond); 0: store none",
    )
    embeddings_preload: bool = Field(
        False,
        description="load the embedding model (and the agent) in the background once the chat model is ready, "
        "instead of on first use",
    )
    embeddings_wait: float = Field(60.0, ge=0, description="seconds a request waits for the embedding model")
    embeddings_threads: int = Field(1, ge=1, le=64, description="CPU threads of the embedding model")
    embeddings_nice: int = Field(
        10, ge=0, le=19, description="CPU priority (nice) of the embedding process: generation keeps the cores"
    )

    # Security and observability (appliance/security, appliance/observability)
    keys_file: Path | None = Field(None, description="API keys, TOML or JSON; default <data_dir>/keys.toml")
    allow_unauthenticated: bool = Field(False, description="serve a non-loopback address without API keys")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed by CORS, comma-separated or a JSON list; * for any"
    )
    metrics_public: bool = Field(False, description="serve /metrics without a key when auth is on")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="debug also shows llama.cpp's own log"
    )
    log_prompts: bool = Field(False, description="log prompt and completion text (debugging only)")
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1", "::1"],
        description="proxy addresses or CIDRs (comma-separated or a JSON list) whose X-Forwarded-For names the "
        "client in the access log; from any other peer the header is ignored",
    )

    # Several boxes as one service (README "Several boxes"): every shared part is optional and off by default.
    database_url: str | None = Field(None, description="postgresql://… for keys, usage (and threads); default: local")
    threads_url: str | None = Field(None, description="postgresql://… for agent threads; default: database_url")
    memory_url: str | None = Field(None, description="http://… of a Chroma server for memories; default: embedded")
    limits_url: str | None = Field(None, description="redis://… for per-key limits of all nodes; default: per node")
    otel_endpoint: str | None = Field(
        None, description="OTLP/HTTP collector for traces, http://host:4318; default: off"
    )

    @field_validator(*_URL_SCHEMES, mode="after")
    @classmethod
    def _check_url(cls, v: str | None, info: Any) -> str | None:
        schemes, v = _URL_SCHEMES[info.field_name], (v or "").strip()
        if v and (v.partition("://")[0].lower() not in schemes or not v.partition("://")[2]):
            raise ValueError(f"expected a {' or '.join(s + '://' for s in schemes)} URL")
        return v or None

    @property
    def threads_db_url(self) -> str | None:
        """Where threads live when shared: threads_url, else database_url."""
        return self.threads_url or self.database_url

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip()
            v = json.loads(v) if v.startswith("[") else v.split(",")
        return [o.strip().rstrip("/") for o in v if o.strip()] if isinstance(v, list) else v

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip()
            v = json.loads(v) if v.startswith("[") else v.split(",")
        if not isinstance(v, list):
            return v
        out = []
        for p in v:
            p = str(p).strip()
            if not p:
                continue
            try:
                ipaddress.ip_network(p, strict=False)
            except ValueError:
                raise ValueError(f"not an IP address or CIDR: {p!r}") from None
            out.append(p)
        return out

    @property
    def keys_path(self) -> Path:
        return (self.keys_file or self.data_dir / "keys.toml").expanduser()

    @field_validator("data_dir", "models_file", mode="after")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return v.expanduser() if v is not None else None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _ConfigFileSource(settings_cls), env_settings, dotenv_settings

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def models_file_path(self) -> Path:
        """Where the models file is (or would be written by `appliance models add`)."""
        return self.models_file or self.data_dir / "models.toml"


_config_file: Path | None = None


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Values from the TOML file given with `--config` (keys are setting names, no prefix)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if _config_file is None:
            return {}
        with _config_file.open("rb") as f:
            return tomllib.load(f)


class ConfigError(Exception):
    """A configuration problem, reported to the admin as one line."""


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings; raise ConfigError with a one-line message naming the bad setting."""
    global _config_file
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"--config: no such file: {config_file}")
    _config_file = config_file
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {config_file}: invalid TOML: {e}") from None
    except ValidationError as e:
        raise ConfigError(_one_line(e, env_prefix="APPLIANCE_")) from None
    finally:
        _config_file = None


def _one_line(e: ValidationError, env_prefix: str = "", what: str = "setting") -> str:
    parts = []
    for err in e.errors():
        name = ".".join(str(p) for p in err["loc"]) or "?"
        shown = f"{env_prefix}{name.upper()}" if env_prefix else name
        parts.append(f"{shown}: {err['msg']}")
    return f"invalid {what} " + "; ".join(parts)


# --- the models file -------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LlamaCppBackendSpec(_Strict):
    type: Literal["llamacpp"] = "llamacpp"
    path: str
    context_size: int | None = Field(None, ge=64)
    threads: int | None = Field(None, ge=1)
    gpu_layers: int | None = Field(None, ge=-1)
    parallel: int | None = Field(None, ge=1, le=64)
    batch_size: int | None = Field(None, ge=16)
    ubatch_size: int | None = Field(None, ge=8)
    batch_invariant: bool | None = Field(None, description="default: the batch_invariant setting")
    kv_cache_type: KVCacheType | None = Field(None, description="f16, q8_0, q4_0, bf16 or f32; default: the setting")
    chat_template: str | None = None
    tool_format: Literal["generic", "native-hermes", "native-llama3"] | None = Field(
        None, description="how the model calls tools; default: detected from its chat template"
    )
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="checked by `appliance doctor`")


class OllamaBackendSpec(_Strict):
    """A model on an Ollama server, reached through the `ollama` client."""

    type: Literal["ollama"]
    base_url: str = "http://127.0.0.1:11434"
    model: str
    timeout: float = Field(300.0, gt=0)


class RemoteBackendSpec(_Strict):
    """A model behind any OpenAI-compatible API. The key is read from the environment, never stored here."""

    type: Literal["remote"]
    base_url: str
    model: str
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    timeout: float = Field(300.0, gt=0)


BackendSpec = Annotated[LlamaCppBackendSpec | OllamaBackendSpec | RemoteBackendSpec, Field(discriminator="type")]


class ModelSpec(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
    aliases: list[str] = []
    backends: list[BackendSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _aliases_differ(self) -> ModelSpec:
        if self.id in self.aliases:
            raise ValueError(f"model {self.id!r} lists its own id as an alias")
        return self


class ModelsFile(_Strict):
    models: list[ModelSpec] = []

    @model_validator(mode="after")
    def _unique_names(self) -> ModelsFile:
        seen: set[str] = set()
        for m in self.models:
            for name in [m.id, *m.aliases]:
                if name in seen:
                    raise ValueError(f"model name {name!r} is used twice")
                seen.add(name)
        return self


def builtin_models() -> ModelsFile:
    """What the appliance serves when no models file is given: the embedded SmolLM2."""
    return ModelsFile(models=[ModelSpec(id=DEFAULT_MODEL_ID, backends=[LlamaCppBackendSpec(path=EMBEDDED_MODEL_PATH)])])


def load_models_file(settings: Settings) -> ModelsFile:
    """Read the models file (or the built-in one); ConfigError names the bad entry."""
    path = settings.models_file
    if path is None and settings.models_file_path.is_file():
        path = settings.models_file_path
    if path is None:
        models = builtin_models()
    else:
        try:
            with path.open("rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"APPLIANCE_MODELS_FILE: no such file: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"APPLIANCE_MODELS_FILE {path}: invalid TOML: {e}") from None
        try:
            models = ModelsFile.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(f"APPLIANCE_MODELS_FILE {path}: " + _one_line(e, what="entry")) from None
    ids = {m.id for m in models.models} | {a for m in models.models for a in m.aliases}
    if settings.default_model not in ids:
        raise ConfigError(
            f"APPLIANCE_DEFAULT_MODEL: {settings.default_model!r} is not a model id or alias "
            f"in {path or 'the built-in models'}"
        )
    return models
