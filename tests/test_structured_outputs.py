"""Structured outputs with the embedded SmolLM2: a grammar forces the shape, so even a 135M model answers
with JSON that parses and, for a schema, validates. Real server, real clients (openai SDK, ollama)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import Server

pytestmark = pytest.mark.slow


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population: int
    coastal: bool
    tags: list[str] = Field(max_length=3)


SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no"]},
        "confidence": {"type": "integer"},
        "reasons": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 1, "maxItems": 2},
    },
    "required": ["answer", "confidence", "reasons"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Is Paris in France? Answer in JSON."}]


@pytest.fixture(scope="module")
def client(appliance_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{appliance_server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_output_validates(client: openai.OpenAI, seed: int) -> None:
    r = client.chat.completions.create(
        model="default",
        messages=ASK,
        max_tokens=200,
        seed=seed,
        temperature=0.8,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}},
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_sdk_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(
        model="default",
        messages=[{"role": "user", "content": "Describe Lisbon as JSON."}],
        response_format=City,
        max_tokens=300,
        temperature=0,
    )
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and len(city.tags) <= 3


def test_json_object_output_parses(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="default", messages=ASK, max_tokens=120, temperature=0, response_format={"type": "json_object"}
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_streamed_and_completion_outputs_are_constrained_too(client: openai.OpenAI) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
    parts = client.chat.completions.create(
        model="default", messages=ASK, max_tokens=200, temperature=0, stream=True, response_format=rf
    )
    text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    r = client.completions.create(
        model="default", prompt="Paris facts:", max_tokens=200, temperature=0, extra_body={"response_format": rf}
    )
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}}, "minimum"),
        ({"type": "object", "not": {"required": ["x"]}}, "not"),
        ({"type": "string", "format": "email"}, "email"),
        ({"$ref": "https://example.com/s.json"}, "local references"),
    ],
)
def test_unsupported_schema_features_get_400(client: openai.OpenAI, schema: dict, keyword: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="default",
            messages=ASK,
            max_tokens=20,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    err = e.value.body
    assert err["param"] == "response_format" and keyword in err["message"]


def test_malformed_response_format_is_400(appliance_server: Server) -> None:
    for rf in ({"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"name": "a b"}}):
        r = httpx.post(
            f"{appliance_server.base_url}/v1/chat/completions",
            json={"model": "default", "messages": ASK, "response_format": rf},
            timeout=30,
        )
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("response_format"), r.text


def test_ollama_client_format_schema(appliance_server: Server) -> None:
    c = ollama.Client(host=appliance_server.base_url)
    r = c.chat(
        model="default",
        messages=[{"role": "user", "content": "Describe Lisbon as JSON."}],
        format=City.model_json_schema(),
        options={"temperature": 0, "num_predict": 300},
    )
    City.model_validate_json(r.message.content)
    # A prompt that the 135M model answers briefly at temperature 0: "json" mode constrains the shape, not
    # the length, and a rambling answer cut at num_predict is (rightly) an unfinished object.
    r = c.generate(
        model="default",
        prompt="Give JSON with one key, city, for Rome.",
        format="json",
        options={"temperature": 0, "num_predict": 200},
    )
    assert r.done_reason == "stop" and isinstance(json.loads(r.response), dict), r.response
