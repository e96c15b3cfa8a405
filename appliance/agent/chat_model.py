"""A LangChain chat model over the appliance's own engine: in process, no HTTP to ourselves.

`_astream` opens `engine.open(GenerateRequest(...))` on the underlying chat model (with its fallbacks,
queues and breakers) — the same path as a client's `/v1/chat/completions` — and turns the engine's events
into message chunks: Token → content, ToolCallDelta → `tool_call_chunks` (LangChain joins them into
`AIMessage.tool_calls`), Finish → usage and `finish_reason`. LangGraph's "messages" stream mode picks the
tokens up from there. `bind_tools` turns LangChain tools into the engine's `Tool`s and `tool_choice` into
its `ToolChoice`, so whichever model serves the run (llama.cpp with its native format or the generic
grammar, or an HTTP fallback) produces the calls. A failure becomes an `EngineError` carrying the
OpenAI-shaped error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.utils import message_chunk_to_message
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr

from appliance.backends.base import Tokenizes
from appliance.engine.types import (
    EngineError,
    Error,
    Finish,
    GenerateRequest,
    Message,
    SamplingParams,
    Token,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
)


def text_of(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for p in content:
        if isinstance(p, str):
            parts.append(p)
        elif isinstance(p, dict) and p.get("type") == "text":
            parts.append(str(p.get("text", "")))
    return "".join(parts)


def to_engine_messages(messages: list[BaseMessage]) -> list[Message]:
    """LangChain messages → the engine's messages, tool traffic included (assistant `tool_calls`, and
    `tool` messages with their `tool_call_id` and `name`): the backend renders them for its model."""
    out: list[Message] = []
    for m in messages:
        if isinstance(m, SystemMessage):
            out.append(Message("system", text_of(m)))
        elif isinstance(m, HumanMessage):
            out.append(Message("user", text_of(m)))
        elif isinstance(m, AIMessage):
            calls = [
                ToolCall(c.get("id") or f"call_{i}", c["name"], json.dumps(c.get("args") or {}, ensure_ascii=False))
                for i, c in enumerate(m.tool_calls)
            ]
            out.append(Message("assistant", text_of(m), tool_calls=calls or None))
        elif isinstance(m, ToolMessage):
            out.append(Message("tool", text_of(m), tool_call_id=m.tool_call_id, name=m.name))
        else:  # ChatMessage and friends
            role = getattr(m, "role", "user")
            out.append(Message(role if role in ("system", "user", "assistant") else "user", text_of(m)))
    return out


def to_engine_tool(t: Any) -> Tool:
    """A LangChain tool (or function, pydantic model, OpenAI tool dict) → the engine's Tool."""
    if isinstance(t, Tool):
        return t
    fn = convert_to_openai_tool(t)["function"]
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return Tool(fn["name"], fn.get("description") or "", params)


def to_tool_choice(choice: Any) -> ToolChoice:
    """LangChain/OpenAI spellings of `tool_choice` → the engine's ToolChoice."""
    if choice is None or choice == "auto":
        return ToolChoice("auto")
    if isinstance(choice, ToolChoice):
        return choice
    if choice == "none" or choice is False:
        return ToolChoice("none")
    if choice in ("required", "any") or choice is True:
        return ToolChoice("required")
    if isinstance(choice, str):
        return ToolChoice("function", choice)
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        if name:
            return ToolChoice("function", str(name))
    raise ValueError(f"unsupported tool_choice: {choice!r}")


def usage_metadata(finish: Finish) -> UsageMetadata:
    u = finish.usage
    return UsageMetadata(
        input_tokens=u.prompt_tokens,
        output_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
        input_token_details={"cache_read": u.cached_tokens},
    )


class EngineChatModel(BaseChatModel):
    """`model` is an engine model name (id or alias); `params` are the sampling parameters of the run."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: Any = Field(exclude=True)
    model: str
    params: SamplingParams = Field(default_factory=SamplingParams)
    user: str | None = None
    principal: str | None = None
    request_id: str = ""
    _running: set[asyncio.Task] = PrivateAttr(default_factory=set)  # tasks generating with this model now

    def abort(self) -> None:
        """Cancel this model's generations now: the agent run they belong to was stopped (its client left).
        Each cancelled generation closes its engine stream, which tells the worker to free the slot; waiting
        for the graph to unwind would let the current answer run on to max_tokens."""
        for task in list(self._running):
            task.cancel()

    async def first_tokens(self, words: Sequence[str]) -> dict[int, str] | None:
        """Each word's first token id in this model's own vocabulary: when the engine has the model's tokenizer
        (a llama.cpp model) and no two words share a first token; else None."""
        try:
            entry = self.engine.registry.get(self.model)
        except EngineError:
            return None
        tokenizer = next((b for b in entry.backends if isinstance(b, Tokenizes)), None)
        if tokenizer is None:
            return None
        out: dict[int, str] = {}
        for word in words:
            ids = await tokenizer.tokenize(word)
            if not ids or ids[0] in out:
                return None
            out[ids[0]] = word
        return out

    @property
    def _llm_type(self) -> str:
        return "appliance-engine"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model}

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool | Tool],
        *,
        tool_choice: Any = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        bound: dict[str, Any] = {"tools": [to_engine_tool(t) for t in tools]}
        bound["tool_choice"] = to_tool_choice(tool_choice)
        if parallel_tool_calls is not None:
            bound["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(**bound, **kwargs)

    def _request(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        tools: list[Tool] | None = None,
        tool_choice: ToolChoice | None = None,
        parallel_tool_calls: bool = True,
        max_tokens: int | None = None,
        temperature: float | None = None,
        logit_bias: dict[int, float] | None = None,
    ) -> GenerateRequest:
        params = dataclasses.replace(self.params, stop=[*self.params.stop, *(stop or [])][:4])
        if max_tokens is not None:  # a step's own budget (a tool call), not the client's answer length
            params.max_tokens = max_tokens
        if temperature is not None:  # a step's own sampling (the agent's tool choice is greedy)
            params.temperature = temperature
        if logit_bias:  # a step's own token restriction (the agent's choice of a message's kind)
            params.logit_bias = dict(logit_bias)
        return GenerateRequest(
            model=self.model,
            messages=to_engine_messages(messages),
            params=params,
            user=self.user,
            principal=self.principal,
            request_id=self.request_id,
            tools=list(tools or []),
            tool_choice=tool_choice or ToolChoice("auto"),
            parallel_tool_calls=parallel_tool_calls,
        )

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # LangChain calls run_manager.on_llm_new_token for each chunk we yield.
        req = self._request(
            messages,
            stop,
            kwargs.get("tools"),
            kwargs.get("tool_choice"),
            kwargs.get("parallel_tool_calls", True),
            kwargs.get("max_tokens"),
            kwargs.get("temperature"),
            kwargs.get("logit_bias"),
        )
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
        try:
            stream = await self.engine.open(req)
        except BaseException:
            self._running.discard(task)  # type: ignore[arg-type]
            raise
        try:
            async for ev in stream:
                if isinstance(ev, Token):
                    if ev.text:
                        yield ChatGenerationChunk(message=AIMessageChunk(content=ev.text))
                elif isinstance(ev, ToolCallDelta):
                    chunk = {"name": ev.name, "args": ev.arguments, "id": ev.id, "index": ev.index}
                    yield ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[chunk]))
                elif isinstance(ev, Finish):
                    meta = {"finish_reason": ev.reason, "model_name": stream.model.id, "backend": stream.backend}
                    yield ChatGenerationChunk(
                        message=AIMessageChunk(
                            content="",
                            usage_metadata=usage_metadata(ev),
                            response_metadata=meta,
                            chunk_position="last",
                        ),
                        generation_info=meta,
                    )
                    return
                elif isinstance(ev, Error):
                    raise EngineError(ev)
            raise EngineError(Error(502, f"the model '{self.model}' ended without finishing", code="upstream_error"))
        finally:
            self._running.discard(task)  # type: ignore[arg-type]
            await stream.aclose()

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        joined: AIMessageChunk | None = None
        async for chunk in self._astream(messages, stop, run_manager, **kwargs):
            if run_manager is not None and chunk.message.content:
                await run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
            joined = chunk.message if joined is None else joined + chunk.message  # type: ignore[assignment,operator]
        msg = message_chunk_to_message(joined) if joined is not None else AIMessage(content="")
        return ChatResult(generations=[ChatGeneration(message=msg, generation_info=dict(msg.response_metadata))])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        raise NotImplementedError("EngineChatModel is async only: use ainvoke/astream")
