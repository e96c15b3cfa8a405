"""Deterministic intent detection: which tools a user message obviously needs.

Small local models (SmolLM2-135M) do not emit tool-call JSON reliably, so the graph's router node uses
these rules to issue real tool calls (an AIMessage with `tool_calls`, run by the ToolNode) for
arithmetic, "what time/date is it", facts worth remembering and questions about what is remembered.
The rules are deliberately plain; what they catch is visible in the thread as tool calls and results.

Everything here runs in time linear in the text, on at most its last `MAX_SCAN` characters: arithmetic
is found by a scan over tokens (no regex over user text that can backtrack), the other patterns have no
overlapping quantifiers next to each other (possessive `\\s++` where a run of spaces is followed by a
word), and the end-anchored rules strip their tails with string operations. A crafted message of any
length is handled in milliseconds; the graph still runs long messages on a worker thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from appliance.agent.tools import CalculatorError, safe_eval

MAX_SCAN = 2000  # characters of a message (its end: the latest words) that the rules look at
MAX_FACTS = 8  # facts saved from one message at most


@dataclass
class Intent:
    name: str
    args: dict[str, Any] = field(default_factory=dict)


def _tail(text: str) -> str:
    return text[-MAX_SCAN:] if len(text) > MAX_SCAN else text


# -- arithmetic ----------------------------------------------------------------------------------

_WORD_OPS = [
    (re.compile(r"\bto the power of\b", re.I), "**"),
    (re.compile(r"\bmultiplied by\b|\btimes\b", re.I), "*"),
    (re.compile(r"\bdivided by\b", re.I), "/"),
    (re.compile(r"\bplus\b", re.I), "+"),
    (re.compile(r"\bminus\b", re.I), "-"),
    (re.compile(r"\bmod(?:ulo)?\b", re.I), "%"),
]
_TIMES_X = re.compile(r"(?<=\d)\s*+[xX]\s*+(?=\d)")
# One token per match, the alternatives disjoint: numbers, operators, parentheses, spaces, anything else.
_TOKEN = re.compile(r"(\d+(?:\.\d+)?)|(\*\*|[-+*/%^×÷])|(\()|(\))|(\s+)|([^\d\s()*+\-/%^×÷]+)")
_NUM, _OP, _OPEN, _CLOSE, _SPACE = 1, 2, 3, 4, 5
_MATH_CUE = re.compile(r"\b(calculate|compute|what(?:'s| is)|how much|evaluate|solve|equals?)\b|=", re.I)
_DATE_LIKE = re.compile(r"^\s*\d{1,4}[-/]\d{1,2}[-/]\d{1,4}\s*$")
_SPACES = re.compile(r"\s+")


def _normalize_math(text: str) -> str:
    for pat, op in _WORD_OPS:
        text = pat.sub(f" {op} ", text)
    return _TIMES_X.sub(" * ", text)


def _balance(expr: str) -> str:
    """Drop unmatched parentheses at the ends (linear: counts are kept, not recounted)."""
    expr = expr.strip()
    opens, closes = expr.count("("), expr.count(")")
    lo, hi = 0, len(expr)
    while opens > closes and lo < hi and expr[lo] == "(":
        lo, opens = lo + 1, opens - 1
        while lo < hi and expr[lo].isspace():
            lo += 1
    while closes > opens and hi > lo and expr[hi - 1] == ")":
        hi, closes = hi - 1, closes - 1
        while hi > lo and expr[hi - 1].isspace():
            hi -= 1
    return expr[lo:hi]


def _expressions(text: str) -> list[str]:
    """Spans of `text` shaped like `operand (op operand)+`, where an operand is `(* -? number )*`,
    leftmost first and each as long as it goes (what a greedy regex would find), in one pass over tokens."""
    kinds: list[int] = []
    spans: list[tuple[int, int]] = []
    for m in _TOKEN.finditer(text):
        if m.lastindex != _SPACE:
            kinds.append(m.lastindex or 0)
            spans.append(m.span())
    n = len(kinds)

    def operand(i: int) -> tuple[int, int]:
        """(end, -1) after an operand starting at token i, or (-1, where it failed)."""
        while i < n and kinds[i] == _OPEN:
            i += 1
        if i < n and kinds[i] == _OP and text[spans[i][0]] == "-" and spans[i][1] - spans[i][0] == 1:
            i += 1
        if i < n and kinds[i] == _NUM:
            i += 1
            while i < n and kinds[i] == _CLOSE:
                i += 1
            return i, -1
        return -1, i

    out: list[str] = []
    i = 0
    while i < n:
        end, failed = operand(i)
        if end < 0:
            i = max(i + 1, failed)  # every start up to `failed` fails there too
            continue
        pairs = 0
        while end < n and kinds[end] == _OP:
            nxt, _ = operand(end + 1)
            if nxt < 0:
                break
            end, pairs = nxt, pairs + 1
        if pairs:
            out.append(text[spans[i][0] : spans[end - 1][1]])
        i = end  # a later start inside this operand ends the same way
    return out


def find_arithmetic(text: str) -> str | None:
    """The arithmetic expression a message asks about, if it clearly asks about one."""
    text = _tail(text)
    norm = _normalize_math(text)
    matches = [_balance(m) for m in _expressions(norm)]
    matches = [m for m in matches if m and not _DATE_LIKE.match(m)]
    if not matches:
        return None
    expr = max(matches, key=len)
    compact = _SPACES.sub("", text)
    if not _MATH_CUE.search(text) and len(_SPACES.sub("", expr)) < 0.6 * len(compact.rstrip("?.!")):
        return None
    try:
        safe_eval(expr)
    except CalculatorError as e:
        if "division by zero" not in str(e) and "too large" not in str(e) and "range" not in str(e):
            return None
    return " ".join(expr.split())


# -- date and time -------------------------------------------------------------------------------

_TIME = re.compile(
    r"\b(what(?:'s| is)?\s++(?:the\s++)?(?:current\s++|today'?s\s++)?(?:time|date|day)\b"
    r"|what\s++time\b|time\s++is\s++it|today'?s\s++date|what\s++day\s++(?:is\s++)?(?:it|today)"
    r"|current\s++(?:time|date)|date\s++today)",
    re.I,
)

# -- facts worth remembering ----------------------------------------------------------------------

_VERB_3RD = {"like": "likes", "love": "loves", "enjoy": "enjoys", "prefer": "prefers", "hate": "hates"}
_VERB_3RD |= {"dislike": "dislikes", "live": "lives", "work": "works", "study": "studies"}

_NAME = re.compile(
    r"(?i:\bmy name is|\bcall me|\bi am called|\bi'm called)\s++([A-Za-z][\w'-]*+(?:\s++[A-Z][\w'-]*+){0,2})"
)
_LIKES = re.compile(r"(?i)\bi\s++(?:really\s++|also\s++)?(like|love|enjoy|prefer|hate|dislike)\s++([^.!?\n]{1,80})")
_LIVES = re.compile(r"(?i)\bi\s++(live|work|study)\s++(in|at|for)\s++([^.!?\n,]{1,60})")
_FAVOURITE = re.compile(r"(?i)\bmy\s++(favou?rite\s+[a-z ]{1,30}?)\s+is\s++([^.!?\n,]{1,60})")
_AGE = re.compile(r"(?i)\bi(?:\s++am|'m)\s++(\d{1,3})\s++years?\s++old")
_REMEMBER_HEAD = re.compile(r"(?i)(?:please\s++)?remember(?:\s++that)?[:,]?\s++")
_QUESTIONISH = re.compile(r"(?i)^\s*+(do|does|did|what|which|who|why|how|can|could|would|should|is|are)\b")
_CLAUSE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")

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
    parts = _CLAUSE_BREAK.split(text)
    return [p for p in parts if p.strip() and not p.strip().endswith("?") and not _QUESTIONISH.match(p)]


def _remember(text: str) -> str | None:
    """What a "remember (that) …" message asks to remember: the rest of the message, without one final
    `.` or `!`, 3 to 300 characters on one line."""
    t = text.lstrip()
    m = _REMEMBER_HEAD.match(t)
    if not m:
        return None
    rest = t[m.end() :].rstrip()
    if rest[-1:] in (".", "!") and len(rest) > 3:
        rest = rest[:-1]
    if not 3 <= len(rest) <= 300 or "\n" in rest:
        return None
    return rest


def find_facts(text: str) -> list[str]:
    """Durable facts a user states about themselves, rewritten in the third person."""
    text = _tail(text)
    said = _remember(text)
    if said is not None and not said.strip().endswith("?"):
        return [_sentence(third_person(said))]
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
        if len(facts) >= 4 * MAX_FACTS:
            break
    return list(dict.fromkeys(facts))[:MAX_FACTS]


# -- questions about what is remembered ------------------------------------------------------------

# Matched against the message with its final punctuation already stripped, anchored at its end (\Z).
_RECALL = re.compile(
    r"(?i)\b(?:what\s++do\s++you\s++(?:remember|know)\s++about\s++(.{1,60})"
    r"|do\s++you\s++remember\s++(.{1,60})"
    r"|what(?:'s|\s++is|\s++are)\s++my\s++(.{1,40})"
    r"|(who\s++am\s++i))\Z"
)


def find_recall(text: str) -> str | None:
    body = _tail(text).strip().rstrip("?.!").rstrip()
    m = _RECALL.search(body)
    if not m:
        return None
    if m.group(4):
        return "the user's name"
    if m.group(3):
        return "the user's " + m.group(3).strip()
    subject = (m.group(1) or m.group(2) or "").strip()
    return third_person(subject) if subject and subject.lower() != "me" else "the user"


def detect(text: str, memory: bool = True) -> list[Intent]:
    """The tool calls a user message obviously needs, in a stable order (linear time; see the top)."""
    text = _tail(text)
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
