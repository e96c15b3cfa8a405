"""The agent's first step on a small model: which kind of message this is, as one token, then the tool's call.

A 135M model writing a call's JSON under a grammar picks `calculator` for almost anything ("please remember
…", "what is my name?"); a grammar over label words lets common prefix tokens win ("to" for "today"). The
same model ranks whole label tokens well: one greedy token, restricted by `logit_bias` to the first tokens
of the labels below, chose the right tool for 33 of the eval's 34 questions (scripts/eval_agent.py; the
labels' examples are not eval questions). The chosen tool's arguments are then written under its schema.
Needs the model's tokenizer (a llama.cpp model); other models make the one-step choice.
"""

from __future__ import annotations

from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langgraph.constants import TAG_NOSTREAM

from appliance.agent.chat_model import EngineChatModel, text_of

# label -> (tool, description); "respond" is the graph's "answer in words" signal
KINDS = {
    "math": ("calculator", "arithmetic, e.g. what is 9 + 16?"),
    "today": ("current_datetime", "today's date, day, month, year or time, e.g. what day is it?"),
    "remember": ("save_memory", "the user asks you to remember something, e.g. remember that my cat is Tom."),
    "my": ("search_memory", "the user asks about themselves, e.g. what is my cat called? where do I work?"),
    "chat": ("respond", "anything else, e.g. hello! tell me a story."),
}
HEAD = "Reply with the kind of the user's message:"


async def choose_tool(model: Any, message: BaseMessage, tools: list[str]) -> tuple[str | None, BaseMessage | None]:
    """(the tool or "respond" for the user's `message`, among `tools`; the model's reply, for its usage).
    (None, None) when the model's tokenizer is not at hand (a remote or Ollama model); (None, reply) when
    the choice came back unusable."""
    kinds = {label: (tool, help) for label, (tool, help) in KINDS.items() if tool in tools or tool == "respond"}
    first = await model.first_tokens(list(kinds)) if isinstance(model, EngineChatModel) else None
    if not first:
        return None, None
    system = HEAD + "\n" + "\n".join(f"{label}: {help}" for label, (_, help) in kinds.items())
    step = model.bind(max_tokens=1, temperature=0.0, logit_bias={t: 100.0 for t in first})
    messages = [SystemMessage(content=system), HumanMessage(content=text_of(message))]
    reply = await step.ainvoke(messages, config={"tags": [TAG_NOSTREAM]})  # the label is not the answer
    text = text_of(reply).strip()
    labels = [w for w in kinds if text and w.startswith(text)]
    return (kinds[labels[0]][0] if len(labels) == 1 else None), reply
