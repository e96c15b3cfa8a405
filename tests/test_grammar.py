"""Output formats as grammars: what the converter honours passes, what it would silently drop is refused."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from appliance.backends.llamacpp.grammar import UnsupportedSchema, check_schema, gbnf
from appliance.engine.types import OutputFormat


class Item(BaseModel):
    name: str = Field(max_length=20)
    tags: list[str] = Field(max_length=3)
    kind: str | None = None


def test_pydantic_schemas_are_honoured() -> None:
    check_schema(Item.model_json_schema())
    g = gbnf(OutputFormat("json_schema", Item.model_json_schema()))
    assert g is not None and "root ::=" in g


def test_text_and_json_object() -> None:
    assert gbnf(None) is None and gbnf(OutputFormat("text")) is None
    assert "root" in (gbnf(OutputFormat("json_object")) or "")


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "integer", "minimum": 0}, "'minimum'"),
        (
            {"type": "object", "properties": {"a": {"type": "number", "multipleOf": 2}}},
            "schema.properties.a.multipleOf",
        ),
        ({"type": "string", "format": "email"}, "email"),
        ({"type": "thing"}, "JSON types"),
        ({"$ref": "http://x/y.json"}, "local references"),
        ({"anyOf": []}, "non-empty"),
    ],
)
def test_unenforceable_keywords_are_named(schema: dict, named: str) -> None:
    with pytest.raises(UnsupportedSchema, match=named.replace("[", r"\[").replace(".", r"\.")):
        gbnf(OutputFormat("json_schema", schema))


def test_a_grammar_llama_cpp_rejects_is_refused() -> None:
    with pytest.raises(UnsupportedSchema, match="cannot parse"):
        gbnf(OutputFormat("json_schema", {"type": "string"}), parses=lambda g: False)
