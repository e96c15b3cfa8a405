"""The appliance's own service endpoints' wire models: /health."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from appliance.api.protocol.common import OmitNone, ResponseModel
from appliance.api.protocol.threads import Query


class HealthQuery(Query):
    verbose: Literal["0", "1", "true", "false", "yes", "no"] | None = Field(
        None, description="1: each model's backends and circuits (an admin's view when keys are configured)"
    )

    @property
    def detailed(self) -> bool:
        return self.verbose in ("1", "true", "yes")


class ModelHealth(ResponseModel):
    id: str
    aliases: list[str]
    kind: str
    backends: list[dict[str, Any]]


class Health(OmitNone):
    status: Literal["ok", "loading", "failed"]
    default_model: str | None = None
    models: list[ModelHealth] | None = None
