"""OpenAI's embeddings wire shapes (re-exported by protocol/openai.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from appliance.api.protocol.common import RequestModel, ResponseModel


class EmbeddingRequest(RequestModel):
    model: str = Field(min_length=1, examples=["all-minilm-l6-v2"])
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string or a list of strings (token arrays are refused with a message saying so)"
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class Embedding(ResponseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32 bytes")


class EmbeddingUsage(ResponseModel):
    prompt_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class EmbeddingList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
