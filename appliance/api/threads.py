"""The agent's native endpoints: threads (/v1/threads) and long-term memory (/v1/memories).

Ownership: with API keys on, a key sees only its own threads and memories (its stable id is the scope; a
`user` parameter naming someone else is refused). Without keys, `?user=` selects whose memories to
read (default "default") and filters the thread list.

Thread ids are per owner (agent/threads.py): `/v1/threads/t1` is the caller's own `t1`, so another key's
thread answers exactly like one that does not exist.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance.agent.threads import THREAD_ID, client_id
from appliance.api.protocol import threads as wire
from appliance.api.protocol.common import client_error, parse
from appliance.api.sse import json_response


def _principal(request: Request) -> str | None:
    return getattr(request.state, "principal", None)


def _scope(request: Request, user: str | None) -> str:
    """Whose data a request may touch: the key with auth on, else `user`, else "default"."""
    principal = _principal(request)
    if principal is not None:
        name = getattr(request.state, "key_name", None)
        if user and user not in (principal, name):
            raise client_error(403, f"This API key may only use its own data ('{name}').", "forbidden", "user")
        return principal
    return user or "default"


def _memory(mem: Any) -> wire.Memory:
    """A memory as the client sees it: its thread by the client's thread id."""
    if mem.thread_id:
        mem = dataclasses.replace(mem, thread_id=client_id(mem.thread_id))
    return wire.memory_of(mem)


async def _agent(request: Request) -> Any:
    agent = request.app.state.agent
    await agent.ready()
    return agent


async def _owned_thread(request: Request, agent: Any) -> Any:
    tid = request.path_params["thread_id"]
    if not THREAD_ID.match(tid):
        raise client_error(
            400, "Invalid thread id: use 1 to 128 characters from A-Z a-z 0-9 . _ -", "invalid_thread_id", "thread_id"
        )
    user = wire.UserQuery.of(request.query_params).user
    scope = _scope(request, user) if (_principal(request) is not None or user) else None
    meta = await agent.threads.find(tid, scope)
    if meta is None:
        raise client_error(404, f"No thread '{tid}'.", "thread_not_found", "thread_id")
    return meta


# -- threads ---------------------------------------------------------------------------------------


async def list_threads(request: Request) -> Response:
    agent = await _agent(request)
    q = wire.ThreadListQuery.of(request.query_params)
    scope = _scope(request, q.user) if (_principal(request) is not None or q.user) else None
    try:
        threads, more = await agent.threads.list(scope, q.limit, q.after)
    except KeyError:
        raise client_error(400, f"Unknown cursor 'after={q.after}'.", "invalid_value", "after") from None
    return json_response(wire.ThreadList(data=[wire.thread_of(t) for t in threads], has_more=more))


async def get_thread(request: Request) -> Response:
    agent = await _agent(request)
    meta = await _owned_thread(request, agent)
    state = await agent.graph.aget_state({"configurable": {"thread_id": meta.id}})
    messages = (state.values or {}).get("messages", []) if state else []
    thread = wire.thread_of(meta)
    return json_response(
        wire.ThreadWithMessages(**thread.model_dump(), messages=[wire.message_of(m) for m in messages])
    )


async def delete_thread(request: Request) -> Response:
    agent = await _agent(request)
    meta = await _owned_thread(request, agent)
    if meta.id in agent.busy:
        raise client_error(409, f"Thread '{meta.thread_id}' is busy with a request.", "thread_busy", "thread_id")
    await agent.threads.delete(meta.id)
    return json_response(wire.Deleted(id=meta.thread_id, object="thread.deleted", deleted=True))


# -- memories --------------------------------------------------------------------------------------


async def list_memories(request: Request) -> Response:
    q = wire.MemoryListQuery.of(request.query_params)
    scope = _scope(request, q.user)
    mems, more = await request.app.state.agent.memory.list(scope, q.limit, q.offset)
    return json_response(wire.MemoryList(user=scope, data=[_memory(m) for m in mems], has_more=more))


async def search_memories(request: Request) -> Response:
    q = wire.MemorySearchQuery.of(request.query_params)
    if not q.q.strip():
        raise client_error(400, "Missing required parameter: 'q'.", param="q")
    scope = _scope(request, q.user)
    mems = await request.app.state.agent.memory.search(scope, q.q, k=q.limit)
    return json_response(wire.MemoryList(user=scope, data=[_memory(m) for m in mems]))


async def create_memory(request: Request) -> Response:
    body = parse(wire.MemoryRequest, await request.body())
    if not body.text.strip():
        raise client_error(400, "Missing required parameter: 'text'.", param="text")
    mem = await request.app.state.agent.memory.add(_scope(request, body.user), body.text, kind="fact")
    return json_response(_memory(mem), status=201)


async def delete_memory(request: Request) -> Response:
    mid = request.path_params["memory_id"]
    q = wire.UserQuery.of(request.query_params)
    scope = _scope(request, q.user) if _principal(request) is not None else None
    if not await request.app.state.agent.memory.delete(mid, scope):
        raise client_error(404, f"No memory '{mid}'.", "memory_not_found", "memory_id")
    return json_response(wire.Deleted(id=mid, object="memory.deleted", deleted=True))


async def delete_memories(request: Request) -> Response:
    scope = _scope(request, wire.UserQuery.of(request.query_params).user)
    n = await request.app.state.agent.memory.delete_scope(scope)
    return json_response(wire.Deleted(object="list.deleted", user=scope, deleted=n))


thread_routes = [
    Route("/v1/threads", list_threads, methods=["GET"]),
    Route("/v1/threads/{thread_id}", get_thread, methods=["GET"]),
    Route("/v1/threads/{thread_id}", delete_thread, methods=["DELETE"]),
]
memory_routes = [
    Route("/v1/memories", list_memories, methods=["GET"]),
    Route("/v1/memories", create_memory, methods=["POST"]),
    Route("/v1/memories", delete_memories, methods=["DELETE"]),
    Route("/v1/memories/search", search_memories, methods=["GET"]),
    Route("/v1/memories/{memory_id}", delete_memory, methods=["DELETE"]),
]
routes = thread_routes + memory_routes
