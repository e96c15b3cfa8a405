"""The model registry: names (ids and aliases) to models, each with its chain of backends."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from appliance.backends.base import Backend
from appliance.backends.llamacpp.client import LlamaCppBackend
from appliance.backends.ollama import OllamaBackend
from appliance.backends.remote import RemoteBackend
from appliance.config import (
    BackendSpec,
    ConfigError,
    LlamaCppBackendSpec,
    ModelsFile,
    ModelSpec,
    OllamaBackendSpec,
    Settings,
)
from appliance.engine.residency import Residency
from appliance.engine.types import EngineError


@dataclass
class ModelEntry:
    id: str
    aliases: list[str]
    spec: ModelSpec | None  # None for entries the appliance adds itself (the agent, embeddings)
    backends: list[Backend]
    kind: str = "chat"  # "chat" (chat + completions), "agent", "embedding"
    created: int = field(default_factory=lambda: int(time.time()))


def make_backend(model_id: str, spec: BackendSpec, settings: Settings, residency: Residency) -> Backend:
    if isinstance(spec, LlamaCppBackendSpec):
        return LlamaCppBackend(model_id, spec, settings, residency)
    if isinstance(spec, OllamaBackendSpec):
        return OllamaBackend(model_id, spec, settings)
    return RemoteBackend(model_id, spec, settings)


class Registry:
    def __init__(self, settings: Settings, models: ModelsFile):
        self.settings = settings
        self.residency = Residency(settings)
        self.entries: dict[str, ModelEntry] = {}
        self._names: dict[str, ModelEntry] = {}
        for spec in models.models:
            entry = ModelEntry(
                id=spec.id,
                aliases=list(spec.aliases),
                spec=spec,
                backends=[make_backend(spec.id, b, settings, self.residency) for b in spec.backends],
            )
            self.entries[spec.id] = entry
            for name in (spec.id, *spec.aliases):
                self._names[name] = entry
        default = self._names[settings.default_model]
        owner = self._names.get("default")
        if owner is not None and owner is not default:
            raise ConfigError(
                f"APPLIANCE_MODELS_FILE: alias 'default' belongs to {owner.id!r}, "
                f"but the default model is {default.id!r}"
            )
        if "default" not in default.aliases:
            default.aliases.append("default")
        self._names["default"] = default
        self.default = default
        for b in default.backends:
            if isinstance(b, LlamaCppBackend):
                b.pinned = True

    def add(self, entry: ModelEntry) -> None:
        """Register an entry the appliance provides itself (e.g. `agent`)."""
        for name in (entry.id, *entry.aliases):
            if name in self._names:
                raise ConfigError(f"model name {name!r} is used twice")
        self.entries[entry.id] = entry
        for name in (entry.id, *entry.aliases):
            self._names[name] = entry

    def get(self, name: str) -> ModelEntry:
        entry = self._names.get(name)
        if entry is None:
            raise EngineError.of(
                404,
                f"The model '{name}' does not exist. GET /v1/models lists the models served here.",
                code="model_not_found",
                param="model",
            )
        return entry

    def __iter__(self):
        return iter(self.entries.values())
