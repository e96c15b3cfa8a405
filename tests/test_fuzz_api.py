"""Fuzz the running server against its own OpenAPI document (schemathesis): positive and negative cases.

No 5xx, every status and body as documented, invalid input rejected with a 4xx in the error shape.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.config._checks import NegativeDataRejectionConfig
from schemathesis.specs.openapi import checks as oa_checks

from appliance.api.openapi import PATHS, document
from tests.conftest import Server, start_server

MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # A small context and generation cap keep each generated request fast.
    server = start_server(
        tmp_path_factory.mktemp("fuzz"),
        "--context-size",
        "512",
        "--default-max-tokens",
        "8",
        "--parallel",
        "2",
        env={"APPLIANCE_MAX_QUEUE": "64"},
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")
    schema.config.update(base_url=fuzz_server.base_url)
    # An invalid body over the size limit is rejected with 413 before it is parsed: a rejection too.
    rejected = NegativeDataRejectionConfig().expected_statuses
    schema.config.checks.negative_data_rejection = NegativeDataRejectionConfig(expected_statuses=[*rejected, "413"])
    return schema


CHECKS = [
    schemathesis.checks.not_a_server_error,
    oa_checks.status_code_conformance,
    oa_checks.content_type_conformance,
    oa_checks.response_schema_conformance,
    oa_checks.response_headers_conformance,
    oa_checks.negative_data_rejection,
]
OPERATIONS = [
    (m.upper(), path) for path, item in PATHS.items() for m in item if m in ("get", "post", "delete", "put", "patch")
]


def _bound(case) -> None:
    """Keep generation short: a large valid token count is lowered (its validation is what the fuzz checks)."""
    body = case.body if isinstance(case.body, dict) else None
    if body is None:
        return
    if case.path in ("/v1/chat/completions", "/v1/completions"):
        mt = body.get("max_tokens")
        if isinstance(mt, int) and not isinstance(mt, bool) and 16 < mt < 10**6:
            body["max_tokens"] = 16
    elif case.path == "/v1/responses":
        mt = body.get("max_output_tokens")
        if isinstance(mt, int) and not isinstance(mt, bool) and 16 < mt < 10**6:
            body["max_output_tokens"] = 16
    elif case.path in ("/api/chat", "/api/generate") and isinstance(body.get("options"), dict):
        n = body["options"].get("num_predict")
        if isinstance(n, int) and not isinstance(n, bool) and n > 16:
            body["options"]["num_predict"] = 16


# Random model names only reach the 404 path: most cases get a model the server has, so that generation,
# the agent and embeddings run with fuzzed parameters too.
SERVED_MODELS = {
    "/v1/chat/completions": ["default"],
    "/v1/completions": ["default"],
    "/api/chat": ["default"],
    "/api/generate": ["default"],
    "/api/show": ["default"],
    "/v1/embeddings": ["all-minilm-l6-v2"],
    "/api/embed": ["all-minilm-l6-v2"],
    "/api/embeddings": ["all-minilm-l6-v2"],
    "/v1/responses": ["default"],
    "/tokenize": ["default"],
    "/detokenize": ["default"],
}


def _served_model(case) -> None:
    names, body = SERVED_MODELS.get(case.path), case.body
    if names and isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"]:
        h = zlib.crc32(json.dumps(body, sort_keys=True, default=str).encode())
        if h % 4:
            body["model"] = names[h % len(names)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_api_conforms_to_its_openapi_document(api_schema, method: str, path: str, mode: GenerationMode) -> None:
    # (schemathesis' own pytest integration, schema.parametrize() with from_fixture, fails on pytest 9.)
    if path not in api_schema.raw_schema["paths"]:
        pytest.skip(f"{path} is not served")
    operation = api_schema[path][method]
    if mode is GenerationMode.NEGATIVE and not operation.body and not operation.query:
        pytest.skip("nothing to make invalid (any string is a valid path parameter)")

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=not os.environ.get("FUZZ_EXAMPLES"),
    )
    def run(case) -> None:
        _served_model(case)
        _bound(case)
        case.call_and_validate(checks=CHECKS, timeout=120)

    run()


def test_document_is_valid_openapi() -> None:
    """The full document (every path, served or not) is valid OpenAPI 3.1 with resolvable references."""
    doc = document()
    assert doc["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(doc)  # raises on an invalid document
    for path in ("/health", "/v1/models", "/v1/models/{model_id}", "/v1/chat/completions", "/v1/completions"):
        assert path in PATHS


@pytest.mark.slow
def test_served_document_lists_served_routes(fuzz_server: Server) -> None:
    doc = httpx.get(f"{fuzz_server.base_url}/openapi.json").json()
    for path in ("/health", "/metrics", "/v1/models", "/v1/models/{model_id}", "/v1/chat/completions"):
        assert path in doc["paths"], path


@pytest.mark.slow
def test_wrongly_typed_fields_are_rejected(fuzz_server: Server) -> None:
    base = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for field, value in [("max_tokens", "2"), ("stream", 0), ("temperature", "1"), ("max_tokens", 2.0)]:
        r = httpx.post(f"{fuzz_server.base_url}/v1/chat/completions", json={**base, field: value}, timeout=60)
        assert r.status_code == 400, (field, value, r.status_code)
        assert r.json()["error"]["param"] == field


@pytest.mark.slow
def test_wrongly_typed_embedding_fields_are_rejected(fuzz_server: Server) -> None:
    base = {"model": "all-minilm-l6-v2", "input": "hi"}
    for field, value in [("user", {"id": 1}), ("dimensions", "384"), ("dimensions", True), ("input", 7)]:
        r = httpx.post(f"{fuzz_server.base_url}/v1/embeddings", json={**base, field: value}, timeout=60)
        assert r.status_code == 400, (field, value, r.status_code)
        assert r.json()["error"]["param"] == field
