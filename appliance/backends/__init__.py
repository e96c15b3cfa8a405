"""Backends: where generations run. `default_factories` is what the composition root hands the registry.

Each factory imports its backend's module when first called, so the `ollama` and `openai` client
packages (and the llama.cpp supervisor) are imported only for backends a models file configures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from appliance.backends.base import Backend, BackendFactory, BackendState, BackendStatus

if TYPE_CHECKING:
    from appliance.backends.llamacpp.process import EarlyWorker
    from appliance.backends.llamacpp.residency import Residency
    from appliance.config import Settings

__all__ = ["Backend", "BackendFactory", "BackendState", "BackendStatus", "default_factories"]


def default_factories(
    settings: Settings, residency: Residency | None = None, early: EarlyWorker | None = None
) -> dict[str, BackendFactory]:
    """Factories keyed by backend spec `type`: "llamacpp", "ollama", "remote".

    `residency` (memory budget and keep-alive timers of the llama.cpp workers) is shared by every llamacpp
    backend; the composition root builds it to close it at shutdown. None: one is made here. `early`: the
    default model's worker, already spawned by `appliance serve`; that model's backend adopts it.
    """
    if residency is None:
        from appliance.backends.llamacpp.residency import Residency

        residency = Residency(settings)
    shared = residency

    def llamacpp(model_id: str, spec: Any) -> Backend:
        from appliance.backends.llamacpp.backend import LlamaCppBackend

        nonlocal early
        adopt, early = (early.process, None) if early is not None and early.model_id == model_id else (None, early)
        return LlamaCppBackend(model_id, spec, settings, shared, early=adopt)

    def ollama(model_id: str, spec: Any) -> Backend:
        from appliance.backends.ollama import OllamaBackend

        return OllamaBackend(model_id, spec, settings)

    def remote(model_id: str, spec: Any) -> Backend:
        from appliance.backends.remote import RemoteBackend

        return RemoteBackend(model_id, spec, settings)

    return {"llamacpp": llamacpp, "ollama": ollama, "remote": remote}
