"""The agent's LangGraph graph.

```
START → recall → route ─┬─(tool calls)→ tools → answer ─┬─(tool calls)→ tools …
                        └──────────────────→ answer ────┴──────────────→ remember → END
```

* recall: the user's most relevant memories (facts, and summaries of other threads) into the state.
* route: deterministic intent rules (appliance.agent.intents) issue real tool calls — an AIMessage with
  `tool_calls` — for arithmetic, date/time, facts to remember and questions about what is remembered.
  Small local models do not emit tool-call JSON reliably; this keeps tool use real, visible and robust.
* tools: LangGraph's ToolNode runs the calls; the ToolMessages are part of the thread.
* answer: the chat model (the run's `AgentContext.model`) answers with the memories and tool results in
  its prompt. If a model does emit a tool call (`<tool_call>{"name": …, "arguments": …}</tool_call>` or a
  bare JSON object, at the start of its reply) for a known tool, that is parsed and run too.
* remember: a summary of the turn goes to memory (kind "summary") for later threads.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, TypedDict

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AnyMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.utils import count_tokens_approximately, trim_messages
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode
from langgraph.prebuilt.tool_node import TOOL_CALL_ERROR_TEMPLATE
from langgraph.runtime import Runtime

from appliance.agent import intents
from appliance.agent.chat_model import text_of
from appliance.agent.tools import all_tools
from appliance.engine.types import EngineError

log = logging.getLogger("appliance.agent")

DEFAULT_INSTRUCTIONS = "You are a helpful assistant. Answer the user's last message briefly and accurately."


@dataclass
class AgentContext:
    """Per-run context (LangGraph runtime context): whose run it is and which model answers."""

    scope: str
    thread_id: str
    model: BaseChatModel
    instructions: str | None = None  # the request's system/developer messages, for this run only


class AgentState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    memories: list[str]


@dataclass
class AgentOptions:
    memory_k: int = 4
    memory_min_score: float = 0.2  # cosine similarity a recalled memory needs
    history_tokens: int = 3000
    tool_prompt: bool = False  # describe the tool-call format to the model (for models that can use it)
    summaries: bool = True
    tool_names: list[str] = field(default_factory=list)

    @property
    def max_distance(self) -> float:
        return 1.0 - self.memory_min_score


def last_human(messages: list[BaseMessage]) -> HumanMessage | None:
    for m in reversed(messages):
        if isinstance(m, HumanMessage):
            return m
    return None


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# -- tool calls a model writes as text ---------------------------------------------------------------

_OPEN_TAG, _CLOSE_TAG = "<tool_call>", "</tool_call>"
INLINE_DETECT_CHARS = 256  # longer user messages go through the intent rules on a worker thread


def _tool_bodies(text: str) -> list[str]:
    """The bodies of `<tool_call>…</tool_call>` (the last one may be unclosed), by string search: linear."""
    bodies, pos = [], 0
    while (start := text.find(_OPEN_TAG, pos)) != -1:
        start += len(_OPEN_TAG)
        end = text.find(_CLOSE_TAG, start)
        if end == -1:
            bodies.append(text[start:].strip())
            break
        bodies.append(text[start:end].strip())
        pos = end + len(_CLOSE_TAG)
    return bodies


def parse_tool_calls(text: str, names: list[str]) -> list[dict[str, Any]]:
    """Tool calls a model wrote at the very start of its reply, for tools that exist; else []."""
    s = text.strip()
    if s.startswith(_OPEN_TAG):
        bodies = _tool_bodies(s)
    elif s.startswith("{"):
        bodies = [s]
    else:
        return []
    calls = []
    for body in bodies:
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return []
        if not isinstance(obj, dict) or obj.get("name") not in names:
            return []
        args = obj.get("arguments", obj.get("args", obj.get("parameters", {})))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return []
        if not isinstance(args, dict):
            return []
        calls.append({"name": obj["name"], "args": args, "id": new_call_id(), "type": "tool_call"})
    return calls


def could_be_tool_call(prefix: str) -> bool:
    """While streaming: might a reply starting with `prefix` turn out to be a tool call (hold it back)?"""
    s = prefix.lstrip()
    return s.startswith("{") or s.startswith("<tool_call>") or (bool(s) and "<tool_call>".startswith(s))


# -- the prompt ------------------------------------------------------------------------------------------


def _tool_line(msg: ToolMessage, calls: dict[str, dict[str, Any]]) -> str:
    call = calls.get(msg.tool_call_id or "", {})
    name = msg.name or call.get("name") or "tool"
    content = text_of(msg).strip()
    if "\n" in content:
        content = "\n" + "\n".join("  " + line for line in content.splitlines())
    return f"- {name}: {content}"


def fold(history: list[BaseMessage]) -> list[BaseMessage]:
    """Alternating user/assistant messages any chat template accepts: tool calls are dropped and tool
    results are appended to the user message they answer; same-role neighbours are merged."""
    calls: dict[str, dict[str, Any]] = {}
    out: list[BaseMessage] = []
    results: list[str] = []

    def flush_results() -> None:
        if results:
            note = "Use these tool results in your answer:\n" + "\n".join(results)
            if out and isinstance(out[-1], HumanMessage):
                out[-1] = HumanMessage(content=f"{text_of(out[-1])}\n\n{note}")
            else:
                out.append(HumanMessage(content=note))
            results.clear()

    for m in history:
        if isinstance(m, ToolMessage):
            results.append(_tool_line(m, calls))
            continue
        if isinstance(m, AIMessage) and m.tool_calls:
            for c in m.tool_calls:
                calls[c.get("id") or ""] = c
            continue
        flush_results()
        if isinstance(m, HumanMessage):
            if out and isinstance(out[-1], HumanMessage):
                out[-1] = HumanMessage(content=f"{text_of(out[-1])}\n\n{text_of(m)}")
            else:
                out.append(HumanMessage(content=text_of(m)))
        elif isinstance(m, AIMessage):
            if out and isinstance(out[-1], AIMessage):
                out[-1] = AIMessage(content=f"{text_of(out[-1])}\n\n{text_of(m)}")
            else:
                out.append(AIMessage(content=text_of(m)))
    flush_results()
    while out and isinstance(out[0], AIMessage):  # templates want the user first
        out.pop(0)
    return out


def tool_prompt(names: list[str]) -> str:
    return (
        "You can use tools: " + ", ".join(names) + ". To use one, reply with only "
        '<tool_call>{"name": "<tool>", "arguments": {...}}</tool_call> and nothing else.'
    )


def build_prompt(state: AgentState, ctx: AgentContext, opts: AgentOptions) -> list[BaseMessage]:
    system = [ctx.instructions or DEFAULT_INSTRUCTIONS]
    memories = state.get("memories") or []
    if memories:
        system.append("What you remember about this user:\n" + "\n".join(f"- {t}" for t in memories))
    if opts.tool_prompt and opts.tool_names:
        system.append(tool_prompt(opts.tool_names))
    history = list(state["messages"])
    trimmed = trim_messages(
        history,
        max_tokens=opts.history_tokens,
        token_counter=count_tokens_approximately,
        strategy="last",
        start_on="human",
        allow_partial=False,
    )
    if not any(isinstance(m, HumanMessage) for m in trimmed):
        human = last_human(history)
        trimmed = history[history.index(human) :] if human is not None else history[-1:]
    return [SystemMessage(content="\n\n".join(system)), *fold(trimmed)]


def turn_summary(state: AgentState, now: dt.datetime | None = None) -> str | None:
    msgs = state["messages"]
    human = last_human(msgs)
    answer = msgs[-1] if msgs and isinstance(msgs[-1], AIMessage) and not msgs[-1].tool_calls else None
    if human is None or answer is None:
        return None
    day = (now or dt.datetime.now()).strftime("%Y-%m-%d")

    def clip(s: str, n: int = 200) -> str:
        s = " ".join(s.split())
        return s if len(s) <= n else s[: n - 1] + "…"

    said, answered = clip(text_of(human)), clip(text_of(answer))
    return f'In a conversation on {day} the user said: "{said}" and was answered: "{answered}"'


# -- the graph --------------------------------------------------------------------------------------------


def tool_error(e: Exception) -> str:
    """A tool's failure as its result (the model sees it), except an EngineError (e.g. `quota_exceeded`
    from save_memory), which ends the run with that error for the client to see."""
    if isinstance(e, EngineError):
        raise e
    return TOOL_CALL_ERROR_TEMPLATE.format(error=repr(e))


def build_graph(memory: Any | None, checkpointer: Any, opts: AgentOptions | None = None):
    """Compile the agent graph over `memory` (a MemoryStore or None) with `checkpointer` (threads)."""
    opts = opts or AgentOptions()
    tools = all_tools(memory, search_k=opts.memory_k or 4, max_distance=opts.max_distance)
    opts.tool_names = [t.name for t in tools]

    async def recall(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
        human = last_human(state["messages"])
        if memory is None or opts.memory_k <= 0 or human is None:
            return {"memories": []}
        ctx = runtime.context
        found = await memory.search(
            ctx.scope, text_of(human), k=opts.memory_k, exclude_thread=ctx.thread_id, max_distance=opts.max_distance
        )
        return {"memories": [m.text for m in found]}

    async def route(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
        last = state["messages"][-1] if state["messages"] else None
        if not isinstance(last, HumanMessage):
            return {}
        text = text_of(last)
        if len(text) > INLINE_DETECT_CHARS:  # linear, but not free: keep the event loop free meanwhile
            found = await asyncio.to_thread(intents.detect, text, memory is not None)
        else:
            found = intents.detect(text, memory=memory is not None)
        if not found:
            return {}
        calls = [{"name": i.name, "args": i.args, "id": new_call_id(), "type": "tool_call"} for i in found]
        return {"messages": [AIMessage(content="", tool_calls=calls)]}

    async def answer(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
        ctx = runtime.context
        reply = await ctx.model.ainvoke(build_prompt(state, ctx, opts))
        calls = parse_tool_calls(text_of(reply), opts.tool_names)
        if calls:
            reply = AIMessage(
                content="",
                tool_calls=calls,
                id=reply.id,
                usage_metadata=getattr(reply, "usage_metadata", None),
                response_metadata=reply.response_metadata,
            )
        return {"messages": [reply]}

    async def remember(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
        if memory is None or not opts.summaries:
            return {}
        summary = turn_summary(state)
        if summary:
            ctx = runtime.context
            try:
                await memory.add(ctx.scope, summary, kind="summary", thread_id=ctx.thread_id)
            except EngineError as e:  # e.g. the key's memory quota is reached: summaries are skipped
                log.info("turn summary for thread %s not saved: %s", ctx.thread_id, e.error.message)
            except Exception as e:  # the answer stands even if memory cannot take the summary
                log.warning("could not save a turn summary for thread %s: %s", ctx.thread_id, e)
        return {}

    def after_route(state: AgentState) -> str:
        last = state["messages"][-1] if state["messages"] else None
        return "tools" if isinstance(last, AIMessage) and last.tool_calls else "answer"

    def after_answer(state: AgentState) -> str:
        last = state["messages"][-1]
        return "tools" if isinstance(last, AIMessage) and last.tool_calls else "remember"

    g = StateGraph(AgentState, context_schema=AgentContext)
    g.add_node("recall", recall)
    g.add_node("route", route)
    g.add_node("tools", ToolNode(tools, handle_tool_errors=tool_error))
    g.add_node("answer", answer)
    g.add_node("remember", remember)
    g.add_edge(START, "recall")
    g.add_edge("recall", "route")
    g.add_conditional_edges("route", after_route, {"tools": "tools", "answer": "answer"})
    g.add_edge("tools", "answer")
    g.add_conditional_edges("answer", after_answer, {"tools": "tools", "remember": "remember"})
    g.add_edge("remember", END)
    return g.compile(checkpointer=checkpointer)
