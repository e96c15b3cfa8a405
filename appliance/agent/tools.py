"""The agent's tools: a safe calculator, the current date and time, and memory search/save.

The calculator never calls eval: it parses with `ast` and walks a tree that may only hold numbers,
+ - * / ** % and unary + -, with bounds on length, size, exponents and results.
"""

from __future__ import annotations

import ast
import datetime as dt
import math
import operator
from typing import Any

from langchain.tools import ToolRuntime
from langchain_core.tools import BaseTool, ToolException, tool

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


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with numbers, + - * / ** % and parentheses, e.g. "(3 + 4) * 12"."""
    try:
        return f"{expression.strip()} = {format_number(safe_eval(expression))}"
    except CalculatorError as e:
        raise ToolException(f"calculator error: {e}") from None


calculator.handle_tool_error = True


def now_text(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now().astimezone()
    return now.strftime("%A, %B %-d, %Y, %H:%M:%S") + f" (time zone {now.tzname() or 'local'}; ISO {now.isoformat()})"


@tool
def current_datetime() -> str:
    """The current date and time on the server."""
    return f"It is {now_text()}."


def memory_tools(memory: Any, search_k: int = 4, max_distance: float | None = None) -> list[BaseTool]:
    """search_memory and save_memory over `memory` (a MemoryStore), scoped by the run's user."""

    @tool
    async def search_memory(query: str, runtime: ToolRuntime[Any]) -> str:
        """Search what you remember about the user (facts and earlier conversations)."""
        ctx = runtime.context
        found = await memory.search(
            ctx.scope, query, k=search_k, exclude_thread=ctx.thread_id, max_distance=max_distance
        )
        if not found:
            return "Nothing remembered about that."
        return "\n".join(f"- {m.text}" for m in found)

    @tool
    async def save_memory(fact: str, runtime: ToolRuntime[Any]) -> str:
        """Remember a durable fact about the user for later conversations."""
        ctx = runtime.context
        mem = await memory.add(ctx.scope, fact, kind="fact", thread_id=ctx.thread_id)
        return f"Saved to memory: {mem.text}"

    return [search_memory, save_memory]


def all_tools(memory: Any | None, search_k: int = 4, max_distance: float | None = None) -> list[BaseTool]:
    tools: list[BaseTool] = [calculator, current_datetime]
    if memory is not None:
        tools += memory_tools(memory, search_k, max_distance)
    return tools
