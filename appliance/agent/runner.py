"""One agent run: the graph driven in its own task, its answer tokens streamed back as engine events.

The graph runs in a task that feeds a queue; the caller's generator reads the queue against the run's
deadline (APPLIANCE_AGENT_TIMEOUT), so a slow or looping run ends with a clear 504 `agent_timeout`, and
a loop that never settles ends at APPLIANCE_AGENT_RECURSION_LIMIT steps with `agent_recursion_limit`.
Only the text of the `agent` node's replies reaches the client (tool calls are in the thread, not the
answer). A client that goes away closes this generator: the graph task is cancelled at once, and with it
the model's engine stream, which frees the model's slot (as a plain request's disconnect does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langgraph.errors import GraphRecursionError

from appliance.agent.chat_model import text_of
from appliance.agent.graph import AgentContext
from appliance.agent.threads import title_of
from appliance.engine.types import EngineError, Error, Event, Finish, GenerateRequest, Message, Token, Usage

log = logging.getLogger("appliance.agent")


def to_langchain(messages: list[Message]) -> tuple[list[BaseMessage], str | None]:
    """A request's messages → (messages for the thread, instructions for this run).
    System/developer messages apply to the run and are not stored in the thread."""
    out: list[BaseMessage] = []
    system: list[str] = []
    for m in messages:
        if m.role in ("system", "developer"):
            system.append(m.content)
        elif m.role == "assistant":
            out.append(AIMessage(content=m.content))
        elif m.role == "tool":
            out.append(HumanMessage(content=f"Tool result: {m.content}"))
        else:
            out.append(HumanMessage(content=m.content))
    return out, ("\n\n".join(system) if system else None)


async def check_thread_quota(service: Any, scope: str, n: int | None = None) -> None:
    """429 `quota_exceeded` when `scope` already owns APPLIANCE_MAX_THREADS_PER_KEY threads: checked before the
    stream starts (a plain 429: the router does not count it against the agent's breaker), and enforced
    atomically by `threads.create` when the run records the thread."""
    limit = service.settings.max_threads_per_key
    if limit and (n := n if n is not None else await service.threads.count(scope)) >= limit:
        raise EngineError(
            Error(
                429,
                f"Thread quota reached: this key already has {n} threads, the most it may keep "
                f"(APPLIANCE_MAX_THREADS_PER_KEY={limit}). Delete threads it no longer needs "
                "(DELETE /v1/threads/{thread_id}) to start new ones; its existing threads can still be continued.",
                "invalid_request_error",
                "quota_exceeded",
            )
        )


async def _drive(
    service: Any, req: GenerateRequest, tid: str, new: bool, entry_id: str, model: Any, emit: Callable[[Event], None]
) -> None:
    s = service.settings
    messages, instructions = to_langchain(req.messages or [])
    usage, reason = Usage(), "stop"
    try:
        # Memory needs the embedding model: wait for it (bounded) before the thread records anything,
        # so a 503 `embeddings_loading` leaves no half turn behind for the client's retry.
        await service.embeddings.wait_ready()
        if new:
            first = next(m for m in messages if isinstance(m, HumanMessage))
            limit = s.max_threads_per_key
            if not await service.threads.create(tid, req.scope, entry_id, title_of(text_of(first)), limit):
                await check_thread_quota(service, req.scope, limit)  # lost the race for the last place
        ctx = AgentContext(scope=req.scope, thread_id=tid, model=model, instructions=instructions)
        config = {"configurable": {"thread_id": tid}, "recursion_limit": s.agent_recursion_limit}
        stream = service.graph.astream(
            {"messages": messages}, config, context=ctx, stream_mode=["messages", "updates"], durability="sync"
        )
        async with contextlib.aclosing(stream) as events:
            async for mode, data in events:
                if mode == "messages":
                    chunk, meta = data
                    if meta.get("langgraph_node") == "agent" and isinstance(chunk, AIMessageChunk) and chunk.content:
                        emit(Token(text_of(chunk)))
                elif mode == "updates":
                    update = (data or {}).get("agent")
                    if not update:
                        continue
                    reply = update["messages"][-1]
                    u = getattr(reply, "usage_metadata", None) or {}
                    usage.prompt_tokens += u.get("input_tokens", 0)
                    usage.completion_tokens += u.get("output_tokens", 0)
                    usage.cached_tokens += (u.get("input_token_details") or {}).get("cache_read", 0) or 0
                    reason = reply.response_metadata.get("finish_reason", reason) or reason
        await service.threads.touch(tid, entry_id)
        try:  # keep only the latest checkpoint: the thread's size grows with its history, not its square
            await service.threads.prune(tid)
        except Exception as e:
            log.warning("could not prune the checkpoints of thread %s: %s", tid, e)
        emit(Finish(reason if reason in ("stop", "length") else "stop", usage))
    except GraphRecursionError:
        emit(
            Error(
                500,
                f"The agent stopped after {s.agent_recursion_limit} steps without an answer "
                "(APPLIANCE_AGENT_RECURSION_LIMIT).",
                "server_error",
                "agent_recursion_limit",
            )
        )
    except EngineError as e:
        emit(e.error)


async def run_agent(
    service: Any, req: GenerateRequest, tid: str, new: bool, entry_id: str, model_id: str
) -> AsyncIterator[Event]:
    queue: asyncio.Queue[Event | None] = asyncio.Queue()

    async def produce() -> None:
        try:
            await _drive(service, req, tid, new, entry_id, model, queue.put_nowait)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("agent run on thread %s failed", tid)
            queue.put_nowait(Error(500, f"The agent failed: {type(e).__name__}: {e}", "server_error", "agent_error"))
        finally:
            queue.put_nowait(None)

    loop = asyncio.get_running_loop()
    timeout = service.settings.agent_timeout
    deadline = loop.time() + timeout
    model = service.chat_model(model_id, req)
    task = asyncio.create_task(produce(), name=f"agent-{tid}")
    try:
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                yield Error(
                    504,
                    f"The agent run took longer than {timeout:g}s (APPLIANCE_AGENT_TIMEOUT) and was stopped.",
                    "server_error",
                    "agent_timeout",
                )
                return
            if ev is None:
                return
            yield ev
            if isinstance(ev, Finish | Error):
                return
    finally:
        if not task.done():
            model.abort()  # the generation now, at once: the graph may take a while to unwind
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
