"""The agent's native endpoints: threads (/v1/threads) and long-term memory (/v1/memories).

Ownership: with API keys on, a key sees only its own threads and memories (its name is the scope; a
`user` parameter naming someone else is refused). Without keys, `?user=` selects whose memories to
read (default "default") and filters the thread list; thread reads and deletes are open to all.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from appliance.agent.threads import THREAD_ID
from appliance.api.errors import client_error, parse_json

MAX_LIMIT = 100


def _principal(request: Request) -> str | None:
    p = getattr(request.state, "principal", None)
    if p is None or isinstance(p, str):
        return p
    return getattr(p, "name", str(p))


def _scope(request: Request, user: str | None) -> str:
    """Whose memories a request may touch: the key's name with auth on, else `user`, else "default"."""
    principal = _principal(request)
    if principal is not None:
        if user and user != principal:
            raise client_error(403, f"This API key may only use its own memories ('{principal}').", "forbidden", "user")
        return principal
    return user or "default"


def _int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise client_error(400, f"Invalid value for '{name}': expected an integer.", "invalid_value", name) from None
    if not lo <= v <= hi:
        raise client_error(400, f"Invalid value for '{name}': must be between {lo} and {hi}.", "invalid_value", name)
    return v


async def _agent(request: Request) -> Any:
    agent = request.app.state.agent
    await agent.ready()
    return agent


def _thread_id(request: Request) -> str:
    tid = request.path_params["thread_id"]
    if not THREAD_ID.match(tid):
        raise client_error(
            400, "Invalid thread id: use 1 to 128 characters from A-Z a-z 0-9 . _ -", "invalid_thread_id", "thread_id"
        )
    return tid


async def _owned_thread(request: Request, agent: Any) -> Any:
    tid = _thread_id(request)
    meta = await agent.threads.get(tid)
    principal = _principal(request)
    if meta is None or (principal is not None and meta.scope != principal):
        raise client_error(404, f"No thread '{tid}'.", "thread_not_found", "thread_id")
    return meta


def message_dict(m: Any) -> dict[str, Any]:
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

    from appliance.agent.chat_model import text_of

    text = text_of(m)
    if isinstance(m, HumanMessage):
        return {"role": "user", "content": text}
    if isinstance(m, SystemMessage):
        return {"role": "system", "content": text}
    if isinstance(m, ToolMessage):
        return {"role": "tool", "content": text, "name": m.name, "tool_call_id": m.tool_call_id}
    if isinstance(m, AIMessage):
        d: dict[str, Any] = {"role": "assistant", "content": text or (None if m.tool_calls else "")}
        if m.tool_calls:
            d["tool_calls"] = [
                {
                    "id": c.get("id"),
                    "type": "function",
                    "function": {"name": c["name"], "arguments": json.dumps(c.get("args", {}), ensure_ascii=False)},
                }
                for c in m.tool_calls
            ]
        return d
    return {"role": getattr(m, "role", m.type), "content": text}


# -- threads ---------------------------------------------------------------------------------------


async def list_threads(request: Request) -> Response:
    agent = await _agent(request)
    limit = _int(request, "limit", 20, 1, MAX_LIMIT)
    after = request.query_params.get("after") or None
    principal = _principal(request)
    user = request.query_params.get("user") or None
    scope = _scope(request, user) if (principal is not None or user) else None
    try:
        threads, more = await agent.threads.list(scope, limit, after)
    except KeyError:
        raise client_error(400, f"Unknown cursor 'after={after}'.", "invalid_value", "after") from None
    return JSONResponse({"object": "list", "data": [t.to_dict() for t in threads], "has_more": more})


async def get_thread(request: Request) -> Response:
    agent = await _agent(request)
    meta = await _owned_thread(request, agent)
    state = await agent.graph.aget_state({"configurable": {"thread_id": meta.id}})
    messages = (state.values or {}).get("messages", []) if state else []
    return JSONResponse({**meta.to_dict(), "messages": [message_dict(m) for m in messages]})


async def delete_thread(request: Request) -> Response:
    agent = await _agent(request)
    meta = await _owned_thread(request, agent)
    if meta.id in agent.busy:
        raise client_error(409, f"Thread '{meta.id}' is busy with a request.", "thread_busy", "thread_id")
    await agent.threads.delete(meta.id)
    return JSONResponse({"id": meta.id, "object": "thread.deleted", "deleted": True})


# -- memories --------------------------------------------------------------------------------------


async def list_memories(request: Request) -> Response:
    agent = request.app.state.agent
    scope = _scope(request, request.query_params.get("user"))
    limit = _int(request, "limit", 100, 1, 1000)
    offset = _int(request, "offset", 0, 0, 10**9)
    mems, more = await agent.memory.list(scope, limit, offset)
    return JSONResponse({"object": "list", "user": scope, "data": [m.to_dict() for m in mems], "has_more": more})


async def search_memories(request: Request) -> Response:
    agent = request.app.state.agent
    scope = _scope(request, request.query_params.get("user"))
    q = request.query_params.get("q", "")
    if not q.strip():
        raise client_error(400, "Missing required parameter: 'q'.", param="q")
    limit = _int(request, "limit", 5, 1, 100)
    mems = await agent.memory.search(scope, q, k=limit)
    return JSONResponse({"object": "list", "user": scope, "data": [m.to_dict() for m in mems]})


async def create_memory(request: Request) -> Response:
    agent = request.app.state.agent
    body = await parse_json(request)
    if not isinstance(body, dict):
        raise client_error(400, "The request body must be a JSON object.")
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise client_error(400, "Missing required parameter: 'text'.", param="text")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise client_error(400, "Invalid value for 'user': expected a string.", "invalid_value", "user")
    mem = await agent.memory.add(_scope(request, user), text, kind="fact")
    return JSONResponse(mem.to_dict(), status_code=201)


async def delete_memory(request: Request) -> Response:
    agent = request.app.state.agent
    mid = request.path_params["memory_id"]
    principal = _principal(request)
    scope = _scope(request, request.query_params.get("user")) if principal is not None else None
    if not await agent.memory.delete(mid, scope):
        raise client_error(404, f"No memory '{mid}'.", "memory_not_found", "memory_id")
    return JSONResponse({"id": mid, "object": "memory.deleted", "deleted": True})


async def delete_memories(request: Request) -> Response:
    agent = request.app.state.agent
    scope = _scope(request, request.query_params.get("user"))
    n = await agent.memory.delete_scope(scope)
    return JSONResponse({"object": "list.deleted", "user": scope, "deleted": n})


routes = [
    Route("/v1/threads", list_threads, methods=["GET"]),
    Route("/v1/threads/{thread_id}", get_thread, methods=["GET"]),
    Route("/v1/threads/{thread_id}", delete_thread, methods=["DELETE"]),
    Route("/v1/memories", list_memories, methods=["GET"]),
    Route("/v1/memories", create_memory, methods=["POST"]),
    Route("/v1/memories", delete_memories, methods=["DELETE"]),
    Route("/v1/memories/search", search_memories, methods=["GET"]),
    Route("/v1/memories/{memory_id}", delete_memory, methods=["DELETE"]),
]
