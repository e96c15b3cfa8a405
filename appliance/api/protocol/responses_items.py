"""`GET /v1/responses/{id}/input_items`: a stored response's input, as OpenAI lists it.

The store keeps the request's input as internal messages (api/response_store.py); `input_items` turns them
back into OpenAI's item shapes: messages with `input_text` parts (`output_text` for an assistant's), the
assistant's `function_call` items and `function_call_output` items. An item's id is derived from the response
id and the item's place, so it is the same on every read and can serve as the `after` cursor.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import Field

from appliance.api.protocol.common import ResponseModel, client_error
from appliance.api.protocol.threads import Query
from appliance.engine.types import Message


class ItemsQuery(Query):
    limit: int = Field(20, ge=1, le=100)
    order: Literal["asc", "desc"] = Field("desc", description="by position in the input: desc, the last first")
    after: str | None = Field(None, max_length=128, description="cursor: an item id")


class InputContent(ResponseModel):
    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(ResponseModel):
    id: str
    type: Literal["message"] = "message"
    status: Literal["completed"] = "completed"
    role: Literal["user", "assistant", "system", "developer"]
    content: list[InputContent]


class InputFunctionCall(ResponseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    status: Literal["completed"] = "completed"
    call_id: str
    name: str
    arguments: str


class InputFunctionCallOutput(ResponseModel):
    id: str
    type: Literal["function_call_output"] = "function_call_output"
    status: Literal["completed"] = "completed"
    call_id: str
    output: str


Item = InputMessage | InputFunctionCall | InputFunctionCallOutput


class ItemList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[Item]
    first_id: str | None
    last_id: str | None
    has_more: bool


def _id(prefix: str, response_id: str, n: int) -> str:
    return f"{prefix}_{hashlib.sha256(f'{response_id}/{n}'.encode()).hexdigest()[:32]}"


def input_items(response_id: str, messages: list[Message]) -> list[Item]:
    """The input as OpenAI items, in order."""
    items: list[Item] = []

    def next_id(prefix: str) -> str:
        return _id(prefix, response_id, len(items))

    for m in messages:
        if m.role == "tool":
            items.append(InputFunctionCallOutput(id=next_id("fco"), call_id=m.tool_call_id or "", output=m.content))
            continue
        if m.content or not m.tool_calls:
            part = InputContent(type="output_text" if m.role == "assistant" else "input_text", text=m.content)
            role = m.role if m.role in ("user", "assistant", "system", "developer") else "user"
            items.append(InputMessage(id=next_id("msg"), role=role, content=[part]))  # type: ignore[arg-type]
        for c in m.tool_calls or []:
            items.append(InputFunctionCall(id=next_id("fc"), call_id=c.id, name=c.name, arguments=c.arguments))
    return items


def page(items: list[Item], q: ItemsQuery) -> ItemList:
    """One page of `items` in the asked order, after the `after` item; 400 for an id not in the list."""
    ordered = items if q.order == "asc" else items[::-1]
    start = 0
    if q.after is not None:
        ids = [i.id for i in ordered]
        if q.after not in ids:
            raise client_error(400, f"No input item with id '{q.after}' in this response.", "invalid_value", "after")
        start = ids.index(q.after) + 1
    data = ordered[start : start + q.limit]
    return ItemList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=start + q.limit < len(ordered),
    )
