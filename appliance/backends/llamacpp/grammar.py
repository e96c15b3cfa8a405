"""Structured outputs for llama.cpp: a client's output format as a GBNF grammar for the grammar sampler.

llama-cpp-python's JSON-schema converter silently ignores keywords it cannot express (`minimum`,
`multipleOf`, `not`, ...), which would give an answer that parses but does not validate. So every schema is
walked first, and a keyword outside what the converter honours is refused with a 400 that names it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from appliance.engine.types import OutputFormat, Tool, ToolChoice

# Keywords the converter turns into grammar rules, and annotations that constrain nothing.
_HONOURED = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "pattern", "format",
    "minLength", "maxLength",
}  # fmt: skip
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                "readOnly", "writeOnly", "strict", "nullable"}  # fmt: skip
_FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
MAX_SCHEMA_BYTES = 64 * 1024


class UnsupportedSchema(ValueError):
    """A schema the grammar cannot enforce; the message names the keyword and where it is, `param` the
    request field it came from."""

    def __init__(self, message: str, param: str = "response_format"):
        super().__init__(message)
        self.param = param


def check_schema(schema: Any, where: str = "schema") -> None:
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise UnsupportedSchema(f"{where} must be a JSON schema object")
    for key, value in schema.items():
        at = f"{where}.{key}"
        if key in _ANNOTATIONS:
            continue
        if key not in _HONOURED:
            raise UnsupportedSchema(f"'{key}' (at {at}) is not supported by the grammar")
        if key == "type":
            types = value if isinstance(value, list) else [value]
            if not types or any(t not in _TYPES for t in types):
                raise UnsupportedSchema(f"{at} must name JSON types ({', '.join(sorted(_TYPES))})")
        elif key == "format" and value not in _FORMATS:
            raise UnsupportedSchema(f"format '{value}' (at {at}) is not supported; use one of {sorted(_FORMATS)}")
        elif key == "$ref" and not (isinstance(value, str) and value.startswith("#/")):
            raise UnsupportedSchema(f"only local references are supported ({at})")
        elif key in ("properties", "$defs", "definitions"):
            if not isinstance(value, dict):
                raise UnsupportedSchema(f"{at} must be an object")
            for name, sub in value.items():
                check_schema(sub, f"{at}.{name}")
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if not isinstance(value, list) or not value:
                raise UnsupportedSchema(f"{at} must be a non-empty array")
            for i, sub in enumerate(value):
                check_schema(sub, f"{at}[{i}]")
        elif key in ("items", "additionalProperties") and not isinstance(value, bool):
            check_schema(value, at)


def gbnf(fmt: OutputFormat | None, parses: Callable[[str], bool] = lambda g: True) -> str | None:
    """The grammar for an output format (None: free text); `parses` checks it with llama.cpp's own parser.
    Raises UnsupportedSchema."""
    if fmt is None or fmt.kind == "text":
        return None
    from llama_cpp import llama_grammar

    if fmt.kind == "json_object" or fmt.schema is None:
        return llama_grammar.JSON_GBNF
    text = json.dumps(fmt.schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise UnsupportedSchema(f"the schema is larger than {MAX_SCHEMA_BYTES} bytes")
    check_schema(fmt.schema)
    try:
        grammar = llama_grammar.json_schema_to_gbnf(text)
    except (ValueError, AssertionError, KeyError, TypeError, RecursionError) as e:
        raise UnsupportedSchema(f"the schema cannot be turned into a grammar: {e}") from None
    if not parses(grammar):
        raise UnsupportedSchema("llama.cpp cannot parse the grammar made from the schema")
    return grammar


# -- tool calls -----------------------------------------------------------------------------------

MAX_TOOL_CALLS = 4  # calls in one reply when parallel calls are allowed


def _lit(s: str) -> str:
    """A GBNF string literal (JSON's escapes are GBNF's)."""
    return json.dumps(s)


def tool_gbnf(
    tools: list[Tool],
    choice: ToolChoice,
    parallel: bool,
    tool_format: str,
    output: OutputFormat | None = None,
    parses: Callable[[str], bool] = lambda g: True,
) -> str | None:
    """The grammar for a request with tools (None: free text).

    `required` / a named function: one call whose arguments match that function's schema (a native-hermes
    model may make up to MAX_TOOL_CALLS with parallel calls allowed; a generic model makes one call per
    turn, as llama.cpp's server does: untrained models repeat calls until the token limit otherwise).
    `auto` on a generic model: such a call, or a plain answer that does not start with `<` (or, with a
    response_format, that format). `auto` on a native
    model: the model's own syntax, unconstrained (the parser reads it); `none`: only the response_format.
    Raises UnsupportedSchema (naming the tool) for a schema the grammar cannot enforce.
    """
    mode = choice.mode if tools else "none"
    if mode == "none" or (mode == "auto" and tool_format != "generic"):
        return gbnf(output, parses)
    from llama_cpp.llama_grammar import SchemaConverter

    conv = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    key = "parameters" if tool_format == "native-llama3" else "arguments"
    alts = []
    for i, t in enumerate(tools):
        if mode == "function" and t.name != choice.name:
            continue
        params = t.parameters or {"type": "object", "properties": {}}
        args = _visit(conv, params, f"tool{i}", f"tools[{i}].function.parameters", "tools")
        head = "{" + json.dumps("name") + ": " + json.dumps(t.name) + ", " + json.dumps(key) + ": "
        alts.append(f'{_lit(head)} {args} "}}"')
    if not alts:
        raise UnsupportedSchema(f"no tool is named {choice.name!r}", "tool_choice")
    rules = [f"zz-call ::= {' | '.join(alts)}"]
    if tool_format == "native-llama3":
        rules.append("zz-calls ::= zz-call")
    else:
        rules.append(f"zz-one ::= {_lit('<tool_call>' + chr(10))} zz-call {_lit(chr(10) + '</tool_call>')}")
        more = MAX_TOOL_CALLS - 1 if parallel and mode != "function" and tool_format != "generic" else 0
        rules.append(f'zz-calls ::= zz-one ("\\n" zz-one){{0,{more}}}' if more else "zz-calls ::= zz-one")
    if mode == "auto":
        if output is not None and output.kind != "text":
            schema = output.schema if output.kind == "json_schema" and output.schema is not None else {"type": "object"}
            text_rule = _visit(conv, schema, "zz-format", "schema", "response_format")
        else:
            rules.append("zz-text ::= [^<] .*")
            text_rule = "zz-text"
        rules.append(f"root ::= zz-calls | {text_rule}")
    else:
        rules.append("root ::= zz-calls")
    grammar = conv.format_grammar() + "\n" + "\n".join(rules)
    if not parses(grammar):
        raise UnsupportedSchema("llama.cpp cannot parse the grammar made from the tools' schemas")
    return grammar


def _visit(conv: Any, schema: Any, name: str, where: str, param: str) -> str:
    """Add `schema`'s rules to a converter under `name` (its $refs resolved within it); the rule's name."""
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise UnsupportedSchema(f"{where} is larger than {MAX_SCHEMA_BYTES} bytes", param)
    try:
        check_schema(schema, where)
    except UnsupportedSchema as e:
        raise UnsupportedSchema(str(e), param) from None
    try:
        return conv.visit(conv.resolve_refs(json.loads(json.dumps(schema)), name), name)
    except (ValueError, AssertionError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise UnsupportedSchema(f"{where} cannot be turned into a grammar: {e}", param) from None
