"""The agent's LangGraph graph: the model calls the tools itself.

```
START → recall → agent ─┬─(tool calls)→ tools → agent …
                        └─(answer)────────────→ remember → END
```

* recall: the user's most relevant memories (facts, and summaries of other threads) into the state.
* agent: the run's chat model (`AgentContext.model`, the engine's own path: any model the appliance serves)
  with the tools bound (calculator, current_datetime, search_memory, save_memory). Its reply's `tool_calls`
  route the graph. With `tool_choice="forced"` (the default, for small models) the first step must call a
  tool or `respond` — a choice the backend enforces with a grammar, so even a 135M model returns a valid
  call (on a llama.cpp model the tool is first picked as one token, and a fact to save is then the user's own
  words: agent/choice.py); `respond` is a
  routing signal, not a tool, and is never stored. With `"auto"` the model calls a tool or answers in text.
  After `tool_rounds` steps with tool calls (or on `respond`) the agent answers without tools, the turn's
  tool results stated in the system prompt and in its last user message ("Tool result: calculator: 12 * 7
  = 84 / Answer with this result." — what even a 135M model copies); a turn without results of its own
  gets the recalled memories stated there the same way ("Remembered: …").
  Tool-calling steps are greedy (temperature 0); the answer keeps the client's sampling.
* tools: LangGraph's ToolNode runs the calls; the assistant's calls and the ToolMessages are part of the
  thread (GET /v1/threads/{id} shows them).
* remember: a summary of the turn goes to memory (kind "summary") for later threads — unless the answer
  ignores or contradicts what its tools returned (`uses_results`), or the turn saved a fact (the fact is
  what later threads need).

Nothing here scans the user's text with patterns: which tool to call is the model's decision.
"""

from __future__ import annotations

import datetime as dt
import logging
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

from appliance.agent.chat_model import text_of, to_engine_tool
from appliance.agent.choice import choose_tool, in_own_words
from appliance.agent.tools import all_tools, answer_keys
from appliance.engine.types import EngineError, Tool

log = logging.getLogger("appliance.agent")

DEFAULT_INSTRUCTIONS = "You are a helpful assistant. Answer the user's last message briefly and accurately."
TOOL_STEP_TOKENS = 256  # tokens a tool-calling step may take: room for any call to the agent's tools

RESPOND = Tool(
    "respond",
    "Reply to the user in words, without a tool: greetings, chat, general knowledge.",
    {"type": "object", "properties": {}},
)
TOOL_GUIDE = (
    "Call a tool when it helps: `calculator` for any arithmetic, `current_datetime` for the date, day or time, "
    "`search_memory` when the user asks about themselves or what they told you before, `save_memory` when the "
    "user tells you something about themselves to remember."
)
FORCED_GUIDE = " Otherwise call `respond`."
MEMORY_PREFIX = "Remembered: "  # recalled memories, stated in the answer step's user message like results
RESULT_PREFIX = "Tool result: "  # how a result is stated to the model (small models copy it best so)
ANSWER_NOTE = "Answer with this result."
MEMORY_NOTE = "Answer with what you remember."


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
    tool_choice: str = "forced"  # "forced": the first step calls a tool or `respond`; "auto": a tool or text
    tool_rounds: int = 1  # model steps per turn that may call tools, before the answer
    summaries: bool = True
    tool_names: list[str] = field(default_factory=list)

    @property
    def max_distance(self) -> float:
        return 1.0 - self.memory_min_score


def last_human_index(messages: list[BaseMessage]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], HumanMessage):
            return i
    return -1


def last_human(messages: list[BaseMessage]) -> HumanMessage | None:
    i = last_human_index(messages)
    return messages[i] if i >= 0 else None  # type: ignore[return-value]


def current_turn(messages: list[BaseMessage]) -> list[BaseMessage]:
    """The messages after the last user message: this turn's tool calls, results and answer."""
    return messages[last_human_index(messages) + 1 :]


# -- the prompt ------------------------------------------------------------------------------------------


def _tool_line(msg: ToolMessage, calls: dict[str, dict[str, Any]]) -> str:
    call = calls.get(msg.tool_call_id or "", {})
    name = msg.name or call.get("name") or "tool"
    content = text_of(msg).strip()
    if name == "search_memory" and content.startswith("- "):  # found memories read as recalled ones do
        return "\n".join(MEMORY_PREFIX + line.removeprefix("- ") for line in content.splitlines())
    if "\n" in content:
        content = "\n" + "\n".join("  " + line for line in content.splitlines())
    return f"{RESULT_PREFIX}{name}: {content}"


def fold(history: list[BaseMessage], final_note: str | None = None) -> list[BaseMessage]:
    """Alternating user/assistant messages any chat template accepts: tool calls are dropped and tool
    results are appended to the user message they answer (the last turn's also get `final_note`);
    same-role neighbours are merged."""
    calls: dict[str, dict[str, Any]] = {}
    out: list[BaseMessage] = []
    results: list[str] = []

    def flush_results(last: bool = False) -> None:
        if results:
            note = "\n".join(results)
            if last and final_note:
                note += "\n" + final_note
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
    flush_results(last=True)
    while out and isinstance(out[0], AIMessage):  # templates want the user first
        out.pop(0)
    return out


def build_prompt(state: AgentState, ctx: AgentContext, opts: AgentOptions, step: str) -> list[BaseMessage]:
    """The model's messages for a `step`: "tools" (the model may call tools: this turn's calls and results
    stay structured, for the backend to render) or "answer" (no tools: everything folded into plain turns,
    this turn's results stated in its user message)."""
    system = [ctx.instructions or DEFAULT_INSTRUCTIONS]
    memories = state.get("memories") or []
    history = list(state["messages"])
    if step != "answer":
        if memories:
            system.append("What you remember about this user:\n" + "\n".join(f"- {t}" for t in memories))
        system.append(TOOL_GUIDE + (FORCED_GUIDE if step == "forced" else ""))
    else:  # this turn's results (or else the recalled memories) in the system prompt as in the user message:
        # a small model follows them best from both places, and a list of memories beside them made the
        # 135M model ignore both (measured: 1 of 6 recall answers used the fact, 6 of 6 without the list)
        turn = current_turn(history)
        calls = {c.get("id") or "": c for m in turn if isinstance(m, AIMessage) for c in m.tool_calls}
        if lines := [_tool_line(m, calls) for m in turn if isinstance(m, ToolMessage)] or memory_notes(state):
            system.append("\n".join(lines))
    trimmed = trim_messages(
        history,
        max_tokens=opts.history_tokens,
        token_counter=count_tokens_approximately,
        strategy="last",
        start_on="human",
        allow_partial=False,
    )
    if not any(isinstance(m, HumanMessage) for m in trimmed):
        i = last_human_index(history)
        trimmed = history[i:] if i >= 0 else history[-1:]
    if step == "answer":
        turns = fold(trimmed, ANSWER_NOTE)
        notes = memory_notes(state)
        if notes and turns and isinstance(turns[-1], HumanMessage):
            turns[-1] = HumanMessage(content=f"{text_of(turns[-1])}\n\n" + "\n".join(notes) + f"\n{MEMORY_NOTE}")
    else:
        i = last_human_index(trimmed)
        turns = [*fold(trimmed[: i + 1]), *trimmed[i + 1 :]]
    return [SystemMessage(content="\n\n".join(system)), *turns]


def memory_notes(state: AgentState) -> list[str]:
    """The recalled memories as the answer step states them in the user's message (what a tiny model copies),
    when the turn has no result of its own to answer with: no tool was called, or search_memory found nothing."""
    memories = state.get("memories") or []
    results = [m for m in current_turn(state["messages"]) if isinstance(m, ToolMessage)]
    if not memories or any(m.name != "search_memory" or text_of(m).startswith("- ") for m in results):
        return []
    return [f"{MEMORY_PREFIX}{t}" for t in memories]


# -- did the answer use the tools' results? ----------------------------------------------------------------


def uses_results(state: AgentState) -> bool:
    """Whether the turn's answer contains what each of its tools returned (any of that result's key values:
    the calculator's number, the date, a remembered fact's distinctive word). A turn whose answer ignores
    or contradicts its tools is not summarised into memory."""
    turn = current_turn(state["messages"])
    if not turn or not isinstance(turn[-1], AIMessage):
        return False
    answer = text_of(turn[-1]).casefold()
    human = last_human(state["messages"])
    question = text_of(human) if human is not None else ""
    for m in turn:
        if isinstance(m, ToolMessage) and m.status != "error":
            keys = answer_keys(m.name or "", text_of(m), question)
            if keys and not any(k.casefold() in answer for k in keys):
                return False
    return True


def saved_a_fact(state: AgentState) -> bool:
    return any(
        isinstance(m, ToolMessage) and m.name == "save_memory" and m.status != "error"
        for m in current_turn(state["messages"])
    )


def turn_summary(state: AgentState, now: dt.datetime | None = None) -> str | None:
    msgs = state["messages"]
    human = last_human(msgs)
    answer = msgs[-1] if msgs and isinstance(msgs[-1], AIMessage) and not msgs[-1].tool_calls else None
    if human is None or answer is None or not text_of(answer).strip():
        return None
    day = (now or dt.datetime.now()).strftime("%Y-%m-%d")

    def clip(s: str, n: int = 200) -> str:
        s = " ".join(s[: 4 * n].split())
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


def _usage_sum(*messages: BaseMessage) -> dict[str, Any] | None:
    total: dict[str, Any] = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    cached, seen = 0, False
    for m in messages:
        u = getattr(m, "usage_metadata", None)
        if u:
            seen = True
            for k in ("input_tokens", "output_tokens", "total_tokens"):
                total[k] += u.get(k, 0)
            cached += (u.get("input_token_details") or {}).get("cache_read", 0) or 0
    if not seen:
        return None
    return {**total, "input_token_details": {"cache_read": cached}}


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

    def reply_message(reply: BaseMessage, *before: BaseMessage, **extra: Any) -> AIMessage:
        return AIMessage(
            content=text_of(reply),
            id=reply.id,
            usage_metadata=_usage_sum(*before, reply),  # type: ignore[arg-type]
            response_metadata=reply.response_metadata,
            **extra,
        )

    async def answer(state: AgentState, ctx: AgentContext, before: list[BaseMessage]) -> AIMessage:
        """The final reply, without tools; `before` are this step's earlier model replies (for usage)."""
        return reply_message(await ctx.model.ainvoke(build_prompt(state, ctx, opts, "answer")), *before)

    async def agent(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
        ctx = runtime.context
        rounds = sum(1 for m in current_turn(state["messages"]) if isinstance(m, AIMessage) and m.tool_calls)
        if rounds >= opts.tool_rounds or not tools:
            return {"messages": [await answer(state, ctx, [])]}
        forced = opts.tool_choice == "forced" and rounds == 0
        offered: list[Any] = [*tools, RESPOND] if forced else list(tools)
        choice: Any = "required" if forced else "auto"
        before: list[BaseMessage] = []
        human = last_human(state["messages"])
        if forced and human is not None:  # first the kind of message, as one token (agent/choice.py)
            chosen, label = await choose_tool(ctx.model, human, opts.tool_names)
            before = [label] if label is not None else []
            if chosen == RESPOND.name:
                return {"messages": [await answer(state, ctx, before)]}
            if chosen is not None:
                offered, choice, forced = [t for t in tools if t.name == chosen], chosen, False
                if own := in_own_words(to_engine_tool(offered[0]), human):
                    offered = [own]
        # A call gets its own token budget: the client's max_tokens is for the answer, and a call cut short
        # by it would run with half its arguments (seen: "12" for "12 * 7" at max_tokens 24). Tool steps
        # are greedy: a tiny model's best guess is its most likely one.
        model = ctx.model.bind_tools(offered, tool_choice=choice, max_tokens=TOOL_STEP_TOKENS, temperature=0.0)
        reply = await model.ainvoke(build_prompt(state, ctx, opts, "forced" if forced else "tools"))
        cut = reply.response_metadata.get("finish_reason") == "length"  # an unfinished call is never run
        calls = [] if cut else [c for c in reply.tool_calls if c["name"] in opts.tool_names]
        if calls:
            return {"messages": [reply_message(reply, *before, tool_calls=calls)]}
        if text_of(reply).strip():  # an answer in words (auto, or a backend that answered anyway)
            return {"messages": [reply_message(reply, *before)]}
        return {"messages": [await answer(state, ctx, [*before, reply])]}  # `respond`, or nothing usable

    async def remember(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
        if memory is None or not opts.summaries:
            return {}
        ctx = runtime.context
        if not uses_results(state):
            log.info("turn summary for thread %s not saved: the answer does not use its tool results", ctx.thread_id)
            return {}
        if saved_a_fact(state):  # the fact is the memory; a summary would only add the answer's wording,
            return {}  # which a small model gets wrong ("your name is not saved") and later threads repeat
        summary = turn_summary(state)
        if summary:
            try:
                await memory.add(ctx.scope, summary, kind="summary", thread_id=ctx.thread_id)
            except EngineError as e:  # e.g. the key's memory quota is reached: summaries are skipped
                log.info("turn summary for thread %s not saved: %s", ctx.thread_id, e.error.message)
            except Exception as e:  # the answer stands even if memory cannot take the summary
                log.warning("could not save a turn summary for thread %s: %s", ctx.thread_id, e)
        return {}

    def after_agent(state: AgentState) -> str:
        last = state["messages"][-1]
        return "tools" if isinstance(last, AIMessage) and last.tool_calls else "remember"

    g = StateGraph(AgentState, context_schema=AgentContext)
    g.add_node("recall", recall)
    g.add_node("agent", agent)
    g.add_node("tools", ToolNode(tools, handle_tool_errors=tool_error))
    g.add_node("remember", remember)
    g.add_edge(START, "recall")
    g.add_edge("recall", "agent")
    g.add_conditional_edges("agent", after_agent, {"tools": "tools", "remember": "remember"})
    g.add_edge("tools", "agent")
    g.add_edge("remember", END)
    return g.compile(checkpointer=checkpointer)
