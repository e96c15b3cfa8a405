"""The agent's own endpoints (/v1/threads, /v1/memories): wire models, query models and translations."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from appliance.api.protocol.common import OmitNone, RequestModel, ResponseModel, client_error, param_path

# -- queries (strings on the wire, so parsed laxly: "5" is 5) -------------------------------------


class Query(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @classmethod
    def of(cls, params: Any) -> Any:
        try:
            return cls.model_validate(dict(params))
        except ValidationError as e:
            err = e.errors()[0]
            name = param_path(tuple(err["loc"])) or None
            raise client_error(400, f"Invalid value for '{name}': {err['msg']}.", "invalid_value", name) from None


class UserQuery(Query):
    user: str | None = Field(None, description="whose data (without API keys); with keys only the key's own")


class ThreadListQuery(UserQuery):
    limit: int = Field(20, ge=1, le=100)
    after: str | None = Field(None, description="cursor: a thread id")


class MemoryListQuery(UserQuery):
    limit: int = Field(100, ge=1, le=1000)
    offset: int = Field(0, ge=0, le=10**9)


class MemorySearchQuery(UserQuery):
    q: str = Field(min_length=1, description="text to search for, by meaning")
    limit: int = Field(5, ge=1, le=100)


class MemoryRequest(RequestModel):
    text: str = Field(min_length=1, max_length=8192)
    user: str | None = None


# -- responses ------------------------------------------------------------------------------------


class _OmitNone(ResponseModel):
    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None or k == "content"}


class FunctionCall(ResponseModel):
    name: str
    arguments: str = Field(description="JSON text")


class ToolCall(ResponseModel):
    id: str | None
    type: Literal["function"] = "function"
    function: FunctionCall


class ThreadMessage(_OmitNone):
    role: str
    content: str | None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None


class Thread(ResponseModel):
    id: str
    object: Literal["thread"] = "thread"
    created_at: int
    updated_at: int
    title: str
    model: str
    user: str


class ThreadWithMessages(Thread):
    messages: list[ThreadMessage]


class ThreadList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[Thread]
    has_more: bool


class Memory(_OmitNone):
    id: str
    object: Literal["memory"] = "memory"
    text: str
    kind: str
    user: str
    thread_id: str | None = None
    created_at: int
    score: float | None = Field(None, description="cosine similarity, in search results")


class MemoryList(ResponseModel):
    object: Literal["list"] = "list"
    user: str
    data: list[Memory]
    has_more: bool | None = None


class Deleted(OmitNone):
    id: str | None = None
    object: str
    deleted: bool | int = Field(description="true, or how many were deleted")
    user: str | None = None


# -- translations ---------------------------------------------------------------------------------


def thread_of(meta: Any) -> Thread:
    return Thread.model_validate(meta.to_dict())


def memory_of(mem: Any) -> Memory:
    return Memory.model_validate(mem.to_dict())


def message_of(m: Any) -> ThreadMessage:
    """A LangChain message of a thread's history, as the thread endpoints show it."""
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

    from appliance.agent.chat_model import text_of

    text = text_of(m)
    if isinstance(m, HumanMessage):
        return ThreadMessage(role="user", content=text)
    if isinstance(m, SystemMessage):
        return ThreadMessage(role="system", content=text)
    if isinstance(m, ToolMessage):
        return ThreadMessage(role="tool", content=text, name=m.name, tool_call_id=m.tool_call_id)
    if isinstance(m, AIMessage):
        calls = [
            ToolCall(
                id=c.get("id"),
                function=FunctionCall(name=c["name"], arguments=json.dumps(c.get("args", {}), ensure_ascii=False)),
            )
            for c in m.tool_calls
        ]
        return ThreadMessage(role="assistant", content=text or (None if calls else ""), tool_calls=calls or None)
    return ThreadMessage(role=getattr(m, "role", m.type), content=text)
