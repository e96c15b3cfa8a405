"""The agent's first step on a small model: which kind of message this is, as one token, then the tool's call.

A 135M model writing a call's JSON under a grammar picks `calculator` for almost anything ("please remember
…", "what is my name?"); a grammar over label words lets common prefix tokens win ("to" for "today"). The
same model ranks whole label tokens well: one greedy token, restricted by `logit_bias` to the first tokens
of the labels below, chose the right tool for 33 of the eval's 34 questions (scripts/eval_agent.py; the
labels' examples are not eval questions). The chosen tool's arguments are then written under its schema.
Needs the model's tokenizer (a llama.cpp model); other models make the one-step choice.

A fact to save is then the user's own words: the grammar lets the model choose where in the message the fact
starts ("I live in Lisbon." out of "Remember that I live in Lisbon."). Written freely, the 135M model's facts
were made up ("The user's name is Ada." for "I work as a carpenter"; "The user's name is <user_name> and …").
"""

from __future__ import annotations

import re
from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langgraph.constants import TAG_NOSTREAM

from appliance.agent.chat_model import EngineChatModel, text_of
from appliance.engine.types import Tool

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


FACT_CHARS = 160  # as the save_memory tool's Fact allows
MIN_WORDS = 4  # a fact names what it is about
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def own_words(message: str, limit: int = 48) -> list[str]:
    """The ways to state a fact in the user's words: every ending, at a word, of each sentence of `message`
    (its last `FACT_CHARS` characters), made to fit the save_memory tool's Fact (no quotes, backslashes or
    inner full stops; ends with one)."""
    text = " ".join(message[-4 * FACT_CHARS :].replace('"', "").replace("\\", "").split())
    out: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        words = sentence.rstrip(".!?").replace(".", ",").split()[-30:]
        for i in range(max(1, len(words) - MIN_WORDS + 1)):  # "Biscuit." alone is no memory
            fact = " ".join(words[i:]) + "."
            if 4 <= len(fact) <= FACT_CHARS:
                out.append(fact)
    return list(dict.fromkeys(out[-limit:]))


def in_own_words(tool: Tool, message: BaseMessage) -> Tool | None:
    """save_memory whose `fact` is one of `own_words` of the user's `message`, or search_memory whose `query`
    is the message itself (what the recall step searches with too; a 135M model's own query found nothing
    where the question found the fact); None for other tools, or when nothing fits."""
    text = text_of(message).strip()
    if tool.name == "save_memory":
        arg, values = "fact", own_words(text)
    elif tool.name == "search_memory":
        arg, values = "query", [text] if 0 < len(text) <= 4 * FACT_CHARS else []
    else:
        return None
    if not values:
        return None
    prop = {"type": "string", "enum": values, "description": "in the user's words"}
    return Tool(tool.name, tool.description, {"type": "object", "properties": {arg: prop}, "required": [arg]})
