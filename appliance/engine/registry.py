"""The model registry: names (ids and aliases) to models, each with its chain of backends."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from appliance.backends.base import Backend, BackendFactory
from appliance.config import BackendSpec, ConfigError, ModelsFile, ModelSpec, Settings
from appliance.engine.types import EngineError


@dataclass
class ModelEntry:
    id: str
    aliases: list[str]
    spec: ModelSpec | None  # None for entries the appliance adds itself (the agent, embeddings)
    backends: list[Backend]
    kind: str = "chat"  # "chat" (chat + completions), "agent", "embedding"
    created: int = field(default_factory=lambda: int(time.time()))


class Registry:
    """Built from the models file with `factories` (backend spec `type` -> factory), given by the composition
    root: the engine never imports a concrete backend."""

    def __init__(self, settings: Settings, models: ModelsFile, factories: Mapping[str, BackendFactory]):
        self.settings = settings
        self.factories = factories
        self.entries: dict[str, ModelEntry] = {}
        self._names: dict[str, ModelEntry] = {}
        for spec in models.models:
            entry = ModelEntry(
                id=spec.id,
                aliases=list(spec.aliases),
                spec=spec,
                backends=[self._make(spec.id, b) for b in spec.backends],
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
            b.pinned = True

    def _make(self, model_id: str, spec: BackendSpec) -> Backend:
        factory = self.factories.get(spec.type)
        if factory is None:
            raise ConfigError(f"model {model_id!r}: no backend of type {spec.type!r} is available")
        return factory(model_id, spec)

    def add(self, entry: ModelEntry) -> None:
        """Register an entry the appliance provides itself (e.g. `agent`)."""
        for name in (entry.id, *entry.aliases):
            if name in self._names:
                raise ConfigError(f"model name {name!r} is used twice")
        self.entries[entry.id] = entry
        for name in (entry.id, *entry.aliases):
            self._names[name] = entry

    def register(self, spec: ModelSpec) -> ModelEntry:
        """Serve a models-file entry added while running (Ollama's /api/pull, /api/copy); its names must be
        free (ConfigError otherwise)."""
        entry = ModelEntry(spec.id, list(spec.aliases), spec, [self._make(spec.id, b) for b in spec.backends])
        self.add(entry)
        return entry

    def remove(self, model_id: str) -> ModelEntry:
        """Stop serving an entry of the models file (Ollama's /api/delete); the caller closes its backends."""
        entry = self.get(model_id)
        if entry is self.default or entry.spec is None:
            raise EngineError.of(400, f"'{entry.id}' cannot be removed while running", param="model")
        del self.entries[entry.id]
        for name in (entry.id, *entry.aliases):
            self._names.pop(name, None)
        return entry

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
