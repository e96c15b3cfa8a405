"""The agent's tools: a safe calculator, the current date and time, and memory search/save.

The calculator never calls eval: it parses with `ast` and walks a tree that may only hold numbers,
+ - * / ** % and unary + -, with bounds on length, size, exponents and results.

`answer_keys` says what an answer that uses a tool's result must contain (the graph keeps a turn out of
memory when its answer ignores its tools; scripts/eval_agent.py scores answers the same way).
"""

from __future__ import annotations

import ast
import datetime as dt
import math
import operator
from typing import Annotated, Any

from langchain.tools import ToolRuntime
from langchain_core.tools import BaseTool, ToolException, tool
from pydantic import Field

MAX_EXPRESSION = 200
MAX_NODES = 64
MAX_ABS = 1e100
MAX_EXPONENT = 1000

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    pass


def safe_eval(expression: str) -> int | float:
    """Evaluate arithmetic: numbers, + - * / ** %, unary + -, parentheses. Raises CalculatorError."""
    expr = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    if not expr:
        raise CalculatorError("empty expression")
    if len(expr) > MAX_EXPRESSION:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError("expression too complex")
    return _eval(tree.body)


def _check(v: int | float) -> int | float:
    if (isinstance(v, float) and (math.isnan(v) or math.isinf(v))) or abs(v) > MAX_ABS:
        raise CalculatorError("result out of range")
    return v


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT or (abs(left) > 1 and abs(right) * math.log10(abs(left)) > 100):
                raise CalculatorError("power too large")
            if left == 0 and right < 0:
                raise CalculatorError("division by zero")
        if isinstance(node.op, ast.Div | ast.Mod) and right == 0:
            raise CalculatorError("division by zero")
        try:
            result = _BINARY[type(node.op)](left, right)
        except (OverflowError, ValueError, ZeroDivisionError) as e:
            raise CalculatorError(str(e)) from None
        if isinstance(result, complex):
            raise CalculatorError("complex result")
        return _check(result)
    raise CalculatorError(f"only numbers and + - * / ** % are allowed (found {type(node).__name__})")


def format_number(v: int | float) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    if isinstance(v, float):
        return f"{v:.12g}"
    return str(v)


# The tools' argument schemas bound what a model may write: a backend that enforces schemas with a grammar
# (llama.cpp) makes even a tiny model write a non-empty arithmetic expression, a fact, a query.
# (No maxLength: a grammar spells it as that many nested optional characters, which slows sampling; the
# calculator and the memory store bound their inputs themselves.)
# Numbers joined by at least one operator: the grammar then keeps even the 135M model from writing "12" or
# ".12" for "12 * 7" (measured: both happened with a looser pattern).
Expression = Annotated[
    str,
    Field(
        pattern=r"^[(]*-?[0-9]+([.][0-9]+)?[)]*( *([-+*/%]|[*][*]) *[(]*-?[0-9]+([.][0-9]+)?[)]*)+$",
        description="e.g. 12 * 7",
    ),
]
# One short sentence that ends at its first full stop: the grammar then closes the call there (an open-ended
# string let the 135M model write until the call's token budget ran out, and an unfinished call is never run;
# so did an unbounded sentence, commas and all).
Fact = Annotated[str, Field(pattern=r'^[^.\n"\\]{3,160}[.]$', description="one sentence about the user")]
Query = Annotated[str, Field(min_length=1)]


@tool
def calculator(expression: Expression) -> str:
    """Calculate arithmetic: an expression with numbers, + - * / ** % and parentheses, e.g. "(3 + 4) * 12"."""
    try:
        return f"{expression.strip()} = {format_number(safe_eval(expression))}"
    except CalculatorError as e:
        raise ToolException(f"calculator error: {e}") from None


calculator.handle_tool_error = True


def now_text(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now().astimezone()
    day, zone = now.strftime("%A, %B %-d, %Y"), now.tzname() or "local time"
    return f"Today is {day}; the time is {now:%H:%M} {zone} ({now.isoformat(timespec='seconds')})"


@tool
def current_datetime() -> str:
    """Today's date, the day of the week and the current time."""
    return now_text() + "."


def memory_tools(memory: Any, search_k: int = 4, max_distance: float | None = None) -> list[BaseTool]:
    """search_memory and save_memory over `memory` (a MemoryStore), scoped by the run's user."""

    @tool
    async def search_memory(query: Query, runtime: ToolRuntime[Any]) -> str:
        """Look up what the user told you before (their name, likes, facts, earlier conversations)."""
        ctx = runtime.context
        found = await memory.search(
            ctx.scope, query, k=search_k, exclude_thread=ctx.thread_id, max_distance=max_distance
        )
        if not found:
            return "Nothing remembered about that."
        # what the user said about themselves before summaries of earlier talks: a small model answers
        # from the first line (seen: a summary's wrong answer repeated over the fact just below it)
        found.sort(key=lambda m: m.kind != "fact")
        return "\n".join(f"- {m.text}" for m in found)

    @tool
    async def save_memory(fact: Fact, runtime: ToolRuntime[Any]) -> str:
        """Remember a fact the user tells you about themselves, e.g. "The user's name is Ada."."""
        ctx = runtime.context
        mem = await memory.add(ctx.scope, fact, kind="fact", thread_id=ctx.thread_id)
        return f"Saved to memory: {mem.text}"

    return [search_memory, save_memory]


def all_tools(memory: Any | None, search_k: int = 4, max_distance: float | None = None) -> list[BaseTool]:
    tools: list[BaseTool] = [calculator, current_datetime]
    if memory is not None:
        tools += memory_tools(memory, search_k, max_distance)
    return tools


# -- what an answer that uses a result contains ----------------------------------------------------------

_STOP_TEXT = (
    "the a an and or of to in on at for with is are was were be been it its this that these those user user's "
    "users said answered conversation what which who whom when where how why do does did you your i me my "
    "mine we our they them their he she his her has have had not no yes about from into than then there"
)
_STOPWORDS = frozenset(_STOP_TEXT.split())


def _datetime_keys(text: str) -> list[str]:
    """The date and time a `current_datetime` result names, as an answer might put them."""
    try:
        when = dt.datetime.fromisoformat(text.rsplit("(", 1)[-1].split(")", 1)[0].strip())
    except ValueError:
        return []
    day, month = when.day, when.strftime("%B")
    return [
        when.strftime("%Y-%m-%d"),
        f"{month} {day}",
        f"{day} {month}",
        f"{month[:3]} {day}",
        f"{day} {month[:3]}",
        when.strftime("%A"),
        when.strftime("%H:%M"),
        f"{when.hour % 12 or 12}:{when.minute:02d}",
    ]


def _calculator_keys(text: str) -> list[str]:
    if " = " not in text:
        return []
    value = text.rsplit(" = ", 1)[1].strip()
    keys = [value]
    try:
        number = float(value)
    except ValueError:
        return keys
    if number.is_integer() and abs(number) >= 1000:
        keys.append(f"{int(number):,}")
    return keys


def _memory_keys(text: str, question: str) -> list[str]:
    """Distinctive words of the remembered facts that the question did not already say."""
    if not text.startswith("- "):
        return []  # nothing was found
    asked = {w.strip(".,!?\"'").casefold() for w in question[:2000].split()}
    words = []
    for w in text[:4000].split():
        w = w.strip(".,!?:;\"'()-").casefold()
        if len(w) >= 3 and w not in _STOPWORDS and w not in asked and not w[:1].isdigit():
            words.append(w)
    return list(dict.fromkeys(words))


def answer_keys(name: str, result: str, question: str = "") -> list[str]:
    """What an answer that uses tool `name`'s `result` contains (any one of these); [] when nothing is to be
    checked (save_memory, nothing found, an error)."""
    if name == "calculator":
        return _calculator_keys(result)
    if name == "current_datetime":
        return _datetime_keys(result)
    if name == "search_memory":
        return _memory_keys(result, question)
    return []
