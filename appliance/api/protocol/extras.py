"""Wire models of the endpoints users of Ollama and llama-server reach for beyond chat and generate:
Ollama's model management (/api/pull, /api/delete, /api/copy) and legacy /api/embeddings, and
llama-server's /tokenize and /detokenize."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from appliance.api.protocol.common import OmitNone, RequestModel, ResponseModel, client_error

MAX_TOKENIZE_CHARS = 1_000_000  # /tokenize text; the body limit bounds it too
MAX_DETOKENIZE = 1_000_000  # token ids per /detokenize
MODEL_ID = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"  # as in the models file

# -- Ollama: model management -------------------------------------------------------------------------


class _Named(RequestModel):
    model: str | None = Field(None, min_length=1, max_length=2048)
    name: str | None = Field(None, min_length=1, max_length=2048, description="older clients' name for `model`")

    @property
    def target(self) -> str:
        value = self.model or self.name
        if value is None:
            raise client_error(400, "Missing required parameter: 'model'.", None, "model")
        return value


class PullRequest(_Named):
    """`model`: an http(s) URL of a .gguf file or a Hugging Face reference `owner/repo/file.gguf[@rev]`."""

    insecure: bool = False
    stream: bool = True
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="expected digest (an extension)")


class DeleteRequest(_Named):
    pass


class CopyRequest(RequestModel):
    source: str = Field(min_length=1, max_length=256)
    destination: str = Field(pattern=MODEL_ID)


class ProgressResponse(OmitNone):
    """One line of /api/pull's progress (`status` only, or with `digest`, `total`, `completed`)."""

    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


class StatusResponse(ResponseModel):
    status: str = "success"


# -- Ollama: the legacy embeddings endpoint -------------------------------------------------------------


class LegacyEmbeddingsRequest(RequestModel):
    model: str = Field(min_length=1, examples=["all-minilm-l6-v2"])
    prompt: str = ""


class LegacyEmbeddingsResponse(ResponseModel):
    embedding: list[float]


# -- llama-server: the tokenizer -------------------------------------------------------------------------


class TokenizeRequest(RequestModel):
    content: str = Field(max_length=MAX_TOKENIZE_CHARS)
    add_special: bool = Field(False, description="add BOS as a prompt gets it")
    model: str = Field("default", min_length=1, description="which model's vocabulary (an extension)")


class TokenizeResponse(ResponseModel):
    tokens: list[int]


class DetokenizeRequest(RequestModel):
    tokens: Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(max_length=MAX_DETOKENIZE)]
    model: str = Field("default", min_length=1, description="which model's vocabulary (an extension)")


class DetokenizeResponse(ResponseModel):
    content: str
