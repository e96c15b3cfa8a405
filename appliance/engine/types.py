"""The one internal request model and the events every backend streams back.

Adapters (OpenAI, Ollama) translate wire formats into these and back; backends only see these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "developer", "user", "assistant", "tool"]


@dataclass(slots=True, frozen=True)
class ToolCall:
    """A complete call the model made: `arguments` is JSON text, as on OpenAI's wire."""

    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class Message:
    role: Role
    content: str
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: which call this is the result of
    name: str | None = None  # tool turns: the function's name (Ollama's `tool_name`)


@dataclass(slots=True, frozen=True)
class Tool:
    """A function the model may call; `parameters` is a JSON schema for its arguments."""

    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})


@dataclass(slots=True, frozen=True)
class ToolChoice:
    """`none`: never call; `auto`: call or answer; `required`: at least one call; `function`: call `name`."""

    mode: Literal["none", "auto", "required", "function"] = "auto"
    name: str | None = None


@dataclass(slots=True, frozen=True)
class OutputFormat:
    """What shape the output must have: free text, any JSON object, or JSON valid against `schema`."""

    kind: Literal["text", "json_object", "json_schema"] = "text"
    schema: dict | None = None
    name: str | None = None


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int | None = None  # None: the appliance's default cap, bounded by the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    output: OutputFormat | None = None  # structured outputs: enforced by a grammar where the backend can
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and its top k alternatives
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias added to its logit


@dataclass(slots=True)
class GenerateRequest:
    """A chat (messages) or completion (prompt) request for one model."""

    model: str
    messages: list[Message] | None = None
    prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    user: str | None = None  # the client's `user` field
    principal: str | None = None  # the API key's name when auth is on
    thread_id: str | None = None  # the agent's conversation thread (X-Thread-Id)
    keep_alive: float | None = None  # seconds the model stays loaded after this request (Ollama's keep_alive)
    request_id: str = ""
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool = True

    @property
    def scope(self) -> str:
        """Whose data this request may see (agent memory): key name, else `user`, else a default scope."""
        return self.principal or self.user or "default"

    @property
    def kind(self) -> Literal["chat", "completion"]:
        return "chat" if self.messages is not None else "completion"


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    """One sampled token's log-probability and the `top` alternatives (token text, log-probability)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(slots=True)
class Token:
    """A piece of generated text (may be several tokens' worth, or a held-back stop prefix released)."""

    text: str
    logprobs: list[TokenLogprob] | None = None  # one per token in `text`, when the request asked for them


@dataclass(slots=True)
class ToolCallDelta:
    """A fragment of tool call number `index`: the first carries `id` and `name`, later ones argument text."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


def assemble_tool_calls(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """One generation's ToolCallDeltas as complete calls, in index order (ids and names from the first
    fragment of each index, arguments the concatenation of its pieces)."""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        c = calls.setdefault(d.index, ["", "", ""])
        c[0], c[1], c[2] = d.id or c[0], d.name or c[1], c[2] + d.arguments
    return [ToolCall(i, n, a) for _, (i, n, a) in sorted(calls.items())]


@dataclass(slots=True)
class Finish:
    reason: Literal["stop", "length", "tool_calls"]
    usage: Usage


@dataclass(slots=True)
class Error:
    """A failure, already classified in OpenAI's terms so every adapter can render it."""

    status: int
    message: str
    type: str = "server_error"
    code: str | None = None
    param: str | None = None
    retry_after: float | None = None  # seconds, sent as Retry-After


Event = Token | ToolCallDelta | Finish | Error


@dataclass(slots=True, frozen=True)
class Admitted:
    """A queueing backend's first item: this request left the queue and holds a slot now.

    The router starts the first-token clock here, so time spent waiting behind other clients' requests
    (bounded by the backend's own `queue_timeout`, answered "busy") never reads as a broken backend and
    never opens its circuit for everyone. The router consumes it; adapters never see it.
    """


class EngineError(Exception):
    """Raised before a stream starts; carries the Error to render."""

    def __init__(self, error: Error):
        super().__init__(error.message)
        self.error = error

    @classmethod
    def of(
        cls,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> EngineError:
        return cls(Error(status=status, message=message, type=type, code=code, param=param))
