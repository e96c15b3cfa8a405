"""Structured outputs for llama.cpp: a client's output format as a GBNF grammar for the grammar sampler.

llama-cpp-python's JSON-schema converter silently ignores keywords it cannot express (`minimum`,
`multipleOf`, `not`, ...), which would give an answer that parses but does not validate. So every schema is
walked first, and a keyword outside what the converter honours is refused with a 400 that names it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from appliance.engine.types import OutputFormat

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
    """A schema the grammar cannot enforce; the message names the keyword and where it is."""


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
