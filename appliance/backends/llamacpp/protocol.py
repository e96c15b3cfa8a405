"""The pipe between the API process (`supervisor.py`) and a model worker (`worker.py`): typed messages.

Every message is a small picklable dataclass sent whole over a `multiprocessing` pipe.

  API → worker:  GenRequest | Cancel | StatsRequest | Stop | TokenizeRequest
  worker → API:  Ready (once loaded) | Fatal (could not load; the worker exits) | Events | Stats | TokenizeResult

`Events` carries a list of per-generation events, in order per generation:
  Started (admitted into a slot) → FirstToken → Text* → Finished | Failed
A rejected request (empty prompt, context overflow) gets only `Failed`.

Each generation is keyed by `id`, an id the API process makes up per generation (uuid4 hex). The client's
X-Request-Id never reaches the pipe: two clients sending the same one must not get each other's tokens.

Streamed text is gathered for up to `stream_interval` seconds and sent as one `Text` per generation
(`worker.Outbox`): on 2 cores, waking the API process and the client for every token took CPU from
llama.cpp's threads. Every other event leaves at once, so the first token is never delayed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from appliance.engine.types import Error, Message, SamplingParams, TokenLogprob, Tool, ToolChoice, Usage

# -- API process → worker -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GenRequest:
    """Start a generation: a chat (messages, formatted with the model's template) or a raw prompt."""

    id: str
    messages: list[Message] | None
    prompt: str | None
    params: SamplingParams
    default_max_tokens: int  # the cap when params.max_tokens is None (bounded by the context)
    require_template: bool = False  # chat on a model without a template: 400 rather than a plain transcript
    tools: list[Tool] = field(default_factory=list)  # tool_calls.py renders them, grammar.py constrains calls
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool = True


@dataclass(frozen=True, slots=True)
class Cancel:
    id: str


@dataclass(frozen=True, slots=True)
class StatsRequest:
    pass


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class TokenizeRequest:
    """/tokenize and /detokenize: `text` to token ids (`add_special`: BOS as a prompt gets it), or `tokens`
    to text. Answered by one `TokenizeResult` with the same `id`, between generation steps."""

    id: str
    text: str | None = None
    tokens: list[int] | None = None
    add_special: bool = False


ToWorker = GenRequest | Cancel | StatsRequest | Stop | TokenizeRequest

# -- worker → API process: per-generation events ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    id: str
    prompt_tokens: int
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class FirstToken:
    id: str
    ttft: float  # seconds from admission to the first sampled token


@dataclass(frozen=True, slots=True)
class Text:
    id: str
    text: str
    logprobs: tuple[TokenLogprob, ...] | None = None  # the tokens this text completes, when the request asked


@dataclass(frozen=True, slots=True)
class Finished:
    id: str
    reason: Literal["stop", "length"]
    usage: Usage


@dataclass(frozen=True, slots=True)
class Failed:
    id: str
    error: Error


WorkerEvent = Started | FirstToken | Text | Finished | Failed

# -- worker → API process: messages ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    info: dict[str, Any]  # pid, n_ctx, slots, architecture, parameters, size, ...


@dataclass(frozen=True, slots=True)
class Fatal:
    message: str


@dataclass(frozen=True, slots=True)
class Events:
    events: list[WorkerEvent] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Stats:
    stats: dict[str, int]


@dataclass(frozen=True, slots=True)
class TokenizeResult:
    id: str
    tokens: list[int] | None = None
    text: str | None = None
    error: str | None = None  # e.g. a token id outside the vocabulary


FromWorker = Ready | Fatal | Events | Stats | TokenizeResult
