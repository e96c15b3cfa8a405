"""A LangChain chat model over the appliance's own engine: in process, no HTTP to ourselves.

`_astream` opens `engine.open(GenerateRequest(...))` on the underlying chat model (with its fallbacks,
queues and breakers) and turns Token/Finish events into message chunks; LangGraph's "messages" stream
mode picks the tokens up from there. A failure becomes an `EngineError` carrying the OpenAI-shaped error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field

from appliance.engine.types import EngineError, Error, Finish, GenerateRequest, Message, SamplingParams, Token


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
    """LangChain messages → the engine's (role, text) messages. Tool traffic is rendered as text, since the
    engine's models see plain chat templates; the agent's graph folds it in more carefully before this."""
    out: list[Message] = []
    for m in messages:
        if isinstance(m, SystemMessage):
            out.append(Message("system", text_of(m)))
        elif isinstance(m, HumanMessage):
            out.append(Message("user", text_of(m)))
        elif isinstance(m, AIMessage):
            text = text_of(m)
            if m.tool_calls and not text:
                text = "; ".join(f"(calling {c['name']} with {c['args']})" for c in m.tool_calls)
            out.append(Message("assistant", text))
        elif isinstance(m, ToolMessage):
            out.append(Message("user", f"Result of {m.name or 'the tool'}: {text_of(m)}"))
        else:  # ChatMessage and friends
            role = getattr(m, "role", "user")
            out.append(Message(role if role in ("system", "user", "assistant") else "user", text_of(m)))
    return out


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

    @property
    def _llm_type(self) -> str:
        return "appliance-engine"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model}

    def _request(self, messages: list[BaseMessage], stop: list[str] | None) -> GenerateRequest:
        params = dataclasses.replace(self.params, stop=[*self.params.stop, *(stop or [])][:4])
        return GenerateRequest(
            model=self.model,
            messages=to_engine_messages(messages),
            params=params,
            user=self.user,
            principal=self.principal,
            request_id=self.request_id,
        )

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # LangChain calls run_manager.on_llm_new_token for each chunk we yield.
        stream = await self.engine.open(self._request(messages, stop))
        try:
            async for ev in stream:
                if isinstance(ev, Token):
                    if ev.text:
                        yield ChatGenerationChunk(message=AIMessageChunk(content=ev.text))
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
            await stream.aclose()

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        text: list[str] = []
        last: AIMessageChunk | None = None
        async for chunk in self._astream(messages, stop, run_manager, **kwargs):
            if run_manager is not None and chunk.message.content:
                await run_manager.on_llm_new_token(str(chunk.message.content), chunk=chunk)
            text.append(str(chunk.message.content))
            last = chunk.message  # type: ignore[assignment]
        meta = dict(last.response_metadata) if last is not None else {}
        msg = AIMessage(
            content="".join(text), usage_metadata=last.usage_metadata if last else None, response_metadata=meta
        )
        return ChatResult(generations=[ChatGeneration(message=msg, generation_info=meta)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        raise NotImplementedError("EngineChatModel is async only: use ainvoke/astream")
