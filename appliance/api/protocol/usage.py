"""GET /v1/usage: tokens, requests and embedding inputs per key, model and UTC day."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import Field, field_validator

from appliance.api.protocol.common import ResponseModel
from appliance.api.protocol.threads import Query


class UsageQuery(Query):
    since: str | None = Field(None, description="first UTC day to include, YYYY-MM-DD (default: all)")
    key: str | None = Field(None, description="only this key (name or id; users: only their own); me: the caller's own")

    @field_validator("since")
    @classmethod
    def _day(cls, v: str | None) -> str | None:
        if v is not None:
            dt.date.fromisoformat(v)  # ValueError → 400 naming `since`
            if len(v) != 10:
                raise ValueError("expected YYYY-MM-DD")
        return v


class UsageRow(ResponseModel):
    day: str = Field(description="UTC day, YYYY-MM-DD")
    key_id: str | None = Field(description="the key's stable id; null for requests made without keys")
    key_name: str | None = Field(description="the key's name when the requests were made")
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    embedding_inputs: int


class UsageTotals(ResponseModel):
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    embedding_inputs: int = 0


class UsageList(ResponseModel):
    object: Literal["list"] = "list"
    since: str | None = None
    data: list[UsageRow]
    totals: UsageTotals
