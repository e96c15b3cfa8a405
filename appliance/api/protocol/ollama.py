"""Ollama's wire format: request, response and error models, and pure translations.

Follows Ollama's documented fields; errors are `{"error": "..."}`. Typing is strict, like Ollama's own
Go structs ("true" is not a boolean); sampler options are bounded to finite, sensible ranges.
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import Field

from appliance.api.protocol.common import (
    OmitNone,
    RequestModel,
    ResponseModel,
    Stops,
    client_error,
)
from appliance.api.protocol.ollama_tools import ToolCall, calls_out, messages_of, tool_choice
from appliance.api.protocol.openai_logprobs import token_bytes
from appliance.api.protocol.openai_tools import MAX_TOOLS, ToolDef, tools_of
from appliance.engine import types as core
from appliance.engine.router import Stream

OLLAMA_COMPAT_VERSION = "0.12.0"  # Ollama clients and UIs gate features on this
FOREVER = 10 * 365 * 86400.0  # keep_alive longer than this is "forever" (and keeps datetimes in range)

# -- errors ---------------------------------------------------------------------------------------


class ErrorResponse(ResponseModel):
    """Every error on the /api/* routes, and mid-stream as an NDJSON line."""

    error: str


# -- requests -------------------------------------------------------------------------------------


class Options(RequestModel):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1000)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    num_predict: int | None = Field(None, ge=-2, le=1 << 20, description="-1 or -2: no limit but the context")
    stop: Stops = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repeat_penalty: float | None = Field(None, gt=0, le=2)
    tool_choice: str | None = Field(
        None, max_length=64, description="appliance extension (/api/chat): auto, required, none, or a tool's name"
    )


KeepAlive = float | str | None


class ChatMessage(RequestModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str = ""
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None  # assistant turns
    tool_name: str | None = Field(None, max_length=64, description="tool turns: the function that answered")


Format = Literal["json", ""] | dict[str, Any] | None  # Ollama's structured outputs: "json" or a JSON schema


def output_format(fmt: Format) -> core.OutputFormat | None:
    if not fmt:
        return None
    if fmt == "json":
        return core.OutputFormat("json_object")
    return core.OutputFormat("json_schema", fmt)


class _Generation(RequestModel):
    """What /api/chat and /api/generate both take."""

    model: str = Field(min_length=1, examples=["default"])
    format: Format = None
    stream: bool = True
    options: Options | None = None
    keep_alive: KeepAlive = None
    logprobs: bool = Field(False, description="each line carries its tokens' log-probabilities (Ollama 0.12.11)")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="most likely alternatives per token")


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(default_factory=list)
    tools: Annotated[list[ToolDef], Field(max_length=MAX_TOOLS)] | None = None


class GenerateRequest(_Generation):
    prompt: str = ""
    system: str | None = None
    raw: bool = False


class ModelRequest(RequestModel):
    model: str = ""
    name: str = Field("", description="older clients send the model here")

    @property
    def target(self) -> str:
        if not (self.model or self.name):
            raise client_error(400, "model is required", param="model")
        return self.model or self.name


class EmbedRequest(RequestModel):
    model: str = Field(min_length=1, examples=["all-minilm-l6-v2"])
    input: str | list[str] = Field(min_length=1)
    keep_alive: KeepAlive = None


_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)")
_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: KeepAlive) -> float | None:
    """Seconds as a number, or a Go duration ("5m", "1h30m", "-1"); < 0 means forever; None: the default."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        s = value.strip()
        try:
            seconds = float(s)
        except ValueError:
            parts = _DURATION.findall(s)
            if len(s) > 64 or not parts or "".join(n + u for n, u in parts) != s:
                raise client_error(400, f"invalid keep_alive duration {value[:64]!r}", param="keep_alive") from None
            seconds = sum(float(n) * _SCALE[u] for n, u in parts)
    if not math.isfinite(seconds):
        raise client_error(400, f"invalid keep_alive duration {value!r}", param="keep_alive")
    return -1.0 if seconds > FOREVER else seconds


def sampling(body: _Generation) -> core.SamplingParams:
    o = body.options
    p = core.SamplingParams(temperature=0.8, top_p=0.9, output=output_format(body.format))  # Ollama's defaults
    if body.logprobs or body.top_logprobs:
        p.logprobs = body.top_logprobs or 0
    if o is None:
        return p
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty"):
        v = getattr(o, name)
        if v is not None:
            setattr(p, name, v)
    if o.repeat_penalty is not None:
        p.repeat_penalty = o.repeat_penalty
    if o.num_predict is not None and o.num_predict > 0:
        p.max_tokens = o.num_predict
    if o.stop:
        p.stop = [o.stop] if isinstance(o.stop, str) else list(o.stop)
    return p


def chat_request(body: ChatRequest, model: str, **caller: Any) -> core.GenerateRequest:
    """With `tools`, the model calls a tool or answers (`auto`; see `tool_choice`)."""
    tools = tools_of(body.tools)
    return core.GenerateRequest(
        model=model,
        messages=messages_of(body.messages),
        tools=tools,
        tool_choice=tool_choice(body.options.tool_choice if body.options else None, tools),
        params=sampling(body),
        keep_alive=parse_keep_alive(body.keep_alive),
        **caller,
    )


def generate_request(body: GenerateRequest, model: str, **caller: Any) -> core.GenerateRequest:
    """`raw` sends the prompt as is; otherwise the model's template applies (with `system`), as Ollama does."""
    common = dict(model=model, params=sampling(body), keep_alive=parse_keep_alive(body.keep_alive), **caller)
    if body.raw:
        return core.GenerateRequest(prompt=body.prompt, **common)
    msgs = ([core.Message("system", body.system)] if body.system else []) + [core.Message("user", body.prompt)]
    return core.GenerateRequest(messages=msgs, **common)


# -- responses ------------------------------------------------------------------------------------


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def timestamp(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


class AssistantMessage(OmitNone):
    role: Literal["assistant"] = "assistant"
    content: str
    tool_calls: list[ToolCall] | None = None


class TokenLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int]


class Logprob(TokenLogprob):
    top_logprobs: list[TokenLogprob] | None = None


def logprobs_out(entries: list[core.TokenLogprob] | None) -> list[Logprob] | None:
    """Ollama's `logprobs`: one entry per token, most likely alternatives in `top_logprobs`."""
    if entries is None:
        return None
    return [
        Logprob(
            token=e.token,
            logprob=min(0.0, e.logprob),
            bytes=token_bytes(e.token),
            top_logprobs=[TokenLogprob(token=t, logprob=min(0.0, lp), bytes=token_bytes(t)) for t, lp in e.top] or None,
        )
        for e in entries
    ]


class _Final(OmitNone):
    """Fields of the last line of a generation (and of a load/unload answer)."""

    model: str
    created_at: str
    done: bool
    logprobs: list[Logprob] | None = None
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class ChatResponse(_Final):
    message: AssistantMessage


class GenerateResponse(_Final):
    response: str


class ModelDetails(ResponseModel):
    parent_model: str = ""
    format: str = "gguf"
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class ModelTag(ResponseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class TagsResponse(ResponseModel):
    models: list[ModelTag]


class RunningModel(ResponseModel):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int = 0
    context_length: int = 0


class PsResponse(ResponseModel):
    models: list[RunningModel]


class ShowResponse(ResponseModel):
    modelfile: str
    parameters: str = ""
    template: str = ""
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class VersionResponse(ResponseModel):
    version: str
    appliance: str


class EmbedResponse(ResponseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int = 0
    prompt_eval_count: int


def ns(seconds: float | None) -> int:
    return int((seconds or 0) * 1e9)


class Renderer:
    """Engine events of one /api/chat or /api/generate -> NDJSON lines, or the whole answer."""

    def __init__(self, kind: Literal["chat", "generate"], model: str, stream: Stream):
        self.kind, self.model, self.stream = kind, model, stream
        self.deltas: list[core.ToolCallDelta] = []  # streamed calls go out whole, before the last line

    def _line(
        self, text: str, calls: list[core.ToolCall] | None = None, lps: list[core.TokenLogprob] | None = None, **final
    ) -> _Final:
        common = {"model": self.model, "created_at": now(), "logprobs": logprobs_out(lps), **final}
        if self.kind == "chat":
            message = AssistantMessage(content=text, tool_calls=calls_out(calls or []) or None)
            return ChatResponse(message=message, **common)
        return GenerateResponse(response=text, **common)

    def _final(self, finish: core.Finish) -> dict[str, Any]:
        total = time.monotonic() - self.stream.started
        ttft = self.stream.ttft or 0.0
        return {
            "done": True,
            "done_reason": "stop" if finish.reason == "tool_calls" else finish.reason,
            "total_duration": ns(total),
            "load_duration": 0,
            "prompt_eval_count": finish.usage.prompt_tokens,
            "prompt_eval_duration": ns(ttft),
            "eval_count": finish.usage.completion_tokens,
            "eval_duration": ns(max(0.0, total - ttft)),
        }

    def start(self) -> list[ResponseModel]:
        return []

    def event(self, ev: core.Event) -> list[ResponseModel]:
        if isinstance(ev, core.Token):
            return [self._line(ev.text, lps=ev.logprobs, done=False)]
        if isinstance(ev, core.ToolCallDelta):
            self.deltas.append(ev)
            return []
        if isinstance(ev, core.Finish):
            calls = [self._line("", core.assemble_tool_calls(self.deltas), done=False)] if self.deltas else []
            return [*calls, self._line("", **self._final(ev))]
        return [ErrorResponse(error=ev.message)]

    def whole(
        self,
        text: str,
        finish: core.Finish,
        calls: list[core.ToolCall] | None = None,
        lps: list[core.TokenLogprob] | None = None,
    ) -> _Final:
        return self._line(text, calls, lps, **self._final(finish))


def load_response(kind: Literal["chat", "generate"], model: str, unloaded: bool) -> _Final:
    """The answer to an empty chat/generate: the model was loaded (or, with keep_alive 0, unloaded)."""
    final = {"model": model, "created_at": now(), "done": True, "done_reason": "unload" if unloaded else "load"}
    if kind == "chat":
        return ChatResponse(message=AssistantMessage(content=""), **final)
    return GenerateResponse(response="", **final)
