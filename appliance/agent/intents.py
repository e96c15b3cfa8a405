"""Deterministic intent detection: which tools a user message obviously needs.

Small local models (SmolLM2-135M) do not emit tool-call JSON reliably, so the graph's router node uses
these rules to issue real tool calls (an AIMessage with `tool_calls`, run by the ToolNode) for
arithmetic, "what time/date is it", facts worth remembering and questions about what is remembered.
The rules are deliberately plain; what they catch is visible in the thread as tool calls and results.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from appliance.agent.tools import CalculatorError, safe_eval


@dataclass
class Intent:
    name: str
    args: dict[str, Any] = field(default_factory=dict)


# -- arithmetic ----------------------------------------------------------------------------------

_WORD_OPS = [
    (re.compile(r"\bto the power of\b", re.I), "**"),
    (re.compile(r"\bmultiplied by\b|\btimes\b", re.I), "*"),
    (re.compile(r"\bdivided by\b", re.I), "/"),
    (re.compile(r"\bplus\b", re.I), "+"),
    (re.compile(r"\bminus\b", re.I), "-"),
    (re.compile(r"\bmod(?:ulo)?\b", re.I), "%"),
]
_NUM = r"\d+(?:\.\d+)?"
_OPERAND = rf"[(\s]*-?\s*{_NUM}[)\s]*"
_EXPR = re.compile(rf"{_OPERAND}(?:(?:\*\*|[-+*/%^×÷])\s*{_OPERAND})+")
_MATH_CUE = re.compile(r"\b(calculate|compute|what(?:'s| is)|how much|evaluate|solve|equals?)\b|=", re.I)
_DATE_LIKE = re.compile(r"^\s*\d{1,4}[-/]\d{1,2}[-/]\d{1,4}\s*$")


def _normalize_math(text: str) -> str:
    for pat, op in _WORD_OPS:
        text = pat.sub(f" {op} ", text)
    return re.sub(r"(?<=\d)\s*[xX]\s*(?=\d)", " * ", text)


def _balance(expr: str) -> str:
    expr = expr.strip()
    while expr.count("(") > expr.count(")") and expr.startswith("("):
        expr = expr[1:].strip()
    while expr.count(")") > expr.count("(") and expr.endswith(")"):
        expr = expr[:-1].strip()
    return expr


def find_arithmetic(text: str) -> str | None:
    """The arithmetic expression a message asks about, if it clearly asks about one."""
    norm = _normalize_math(text)
    matches = [_balance(m.group(0)) for m in _EXPR.finditer(norm)]
    matches = [m for m in matches if m and not _DATE_LIKE.match(m)]
    if not matches:
        return None
    expr = max(matches, key=len)
    compact = re.sub(r"\s+", "", text)
    if not _MATH_CUE.search(text) and len(re.sub(r"\s+", "", expr)) < 0.6 * len(compact.rstrip("?.!")):
        return None
    try:
        safe_eval(expr)
    except CalculatorError as e:
        if "division by zero" not in str(e) and "too large" not in str(e) and "range" not in str(e):
            return None
    return " ".join(expr.split())


# -- date and time -------------------------------------------------------------------------------

_TIME = re.compile(
    r"\b(what(?:'s| is)?\s+(?:the\s+)?(?:current\s+|today'?s\s+)?(?:time|date|day)\b"
    r"|what\s+time\b|time\s+is\s+it|today'?s\s+date|what\s+day\s+(?:is\s+)?(?:it|today)"
    r"|current\s+(?:time|date)|date\s+today)",
    re.I,
)

# -- facts worth remembering ----------------------------------------------------------------------

_VERB_3RD = {"like": "likes", "love": "loves", "enjoy": "enjoys", "prefer": "prefers", "hate": "hates"}
_VERB_3RD |= {"dislike": "dislikes", "live": "lives", "work": "works", "study": "studies"}

_NAME = re.compile(
    r"(?i:\bmy name is|\bcall me|\bi am called|\bi'm called)\s+([A-Za-z][\w'-]*(?:\s+[A-Z][\w'-]*){0,2})"
)
_LIKES = re.compile(r"(?i)\bi\s+(?:really\s+|also\s+)?(like|love|enjoy|prefer|hate|dislike)\s+([^.!?\n]{1,80})")
_LIVES = re.compile(r"(?i)\bi\s+(live|work|study)\s+(in|at|for)\s+([^.!?\n,]{1,60})")
_FAVOURITE = re.compile(r"(?i)\bmy\s+(favou?rite\s+[a-z ]{1,30}?)\s+is\s+([^.!?\n,]{1,60})")
_AGE = re.compile(r"(?i)\bi(?:\s+am|'m)\s+(\d{1,3})\s+years?\s+old")
_REMEMBER = re.compile(r"(?i)^\s*(?:please\s+)?remember(?:\s+that)?[:,]?\s+(.{3,300}?)[.!]?\s*$")
_QUESTIONISH = re.compile(r"(?i)^\s*(do|does|did|what|which|who|why|how|can|could|would|should|is|are)\b")

_PRONOUNS = [
    (re.compile(r"\bI am\b|\bI'm\b", re.I), "the user is"),
    (re.compile(r"\bmy\b", re.I), "the user's"),
    (re.compile(r"\bmine\b", re.I), "the user's"),
    (re.compile(r"\bme\b", re.I), "the user"),
    (re.compile(r"\bI\b"), "the user"),
]


def third_person(text: str) -> str:
    for pat, repl in _PRONOUNS:
        text = pat.sub(repl, text)
    return text.strip()


def _sentence(text: str) -> str:
    text = " ".join(text.split()).rstrip(" .")
    return text[:1].upper() + text[1:] + "."


def _clauses(text: str) -> list[str]:
    """Sentences that are statements (questions are not facts)."""
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [p for p in parts if p.strip() and not p.strip().endswith("?") and not _QUESTIONISH.match(p)]


def find_facts(text: str) -> list[str]:
    """Durable facts a user states about themselves, rewritten in the third person."""
    m = _REMEMBER.match(text)
    if m and not m.group(1).strip().endswith("?"):
        return [_sentence(third_person(m.group(1)))]
    facts: list[str] = []
    for clause in _clauses(text):
        if m := _NAME.search(clause):
            facts.append(_sentence(f"the user's name is {m.group(1)}"))
        for m in _LIKES.finditer(clause):
            facts.append(_sentence(f"the user {_VERB_3RD[m.group(1).lower()]} {third_person(m.group(2))}"))
        for m in _LIVES.finditer(clause):
            facts.append(_sentence(f"the user {_VERB_3RD[m.group(1).lower()]} {m.group(2).lower()} {m.group(3)}"))
        for m in _FAVOURITE.finditer(clause):
            facts.append(_sentence(f"the user's {m.group(1).lower()} is {third_person(m.group(2))}"))
        if m := _AGE.search(clause):
            facts.append(_sentence(f"the user is {m.group(1)} years old"))
    return list(dict.fromkeys(facts))


# -- questions about what is remembered ------------------------------------------------------------

_RECALL = re.compile(
    r"(?i)\b(?:what\s+do\s+you\s+(?:remember|know)\s+about\s+(.{1,60}?)"
    r"|do\s+you\s+remember\s+(.{1,60}?)"
    r"|what(?:'s|\s+is|\s+are)\s+my\s+(.{1,40}?)"
    r"|(who\s+am\s+i))\s*[?.!]*\s*$"
)


def find_recall(text: str) -> str | None:
    m = _RECALL.search(text.strip())
    if not m:
        return None
    if m.group(4):
        return "the user's name"
    if m.group(3):
        return "the user's " + m.group(3).strip()
    subject = (m.group(1) or m.group(2) or "").strip()
    return third_person(subject) if subject and subject.lower() != "me" else "the user"


def detect(text: str, memory: bool = True) -> list[Intent]:
    """The tool calls a user message obviously needs, in a stable order."""
    intents: list[Intent] = []
    if expr := find_arithmetic(text):
        intents.append(Intent("calculator", {"expression": expr}))
    if _TIME.search(text):
        intents.append(Intent("current_datetime", {}))
    if memory:
        for fact in find_facts(text):
            intents.append(Intent("save_memory", {"fact": fact}))
        if not any(i.name == "save_memory" for i in intents) and (query := find_recall(text)):
            intents.append(Intent("search_memory", {"query": query}))
    return intents
