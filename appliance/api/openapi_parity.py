"""The OpenAPI path table's entries for the Responses API, Ollama's model management and legacy embeddings,
and llama-server's tokenizer (api/openapi.py merges them into `PATHS`; `op` is its `Op`)."""

from __future__ import annotations

from typing import Any

from appliance.api.protocol import extras, responses, responses_items, responses_out

GENERATION = (400, 401, 404, 413, 429, 500, 502, 503, 504)
MANAGE = (400, 401, 403, 404, 413, 429, 500)  # model management: admin keys only
TOKENS = (400, 401, 404, 413, 429, 503)


def parity_paths(op: Any) -> dict[str, dict[str, Any]]:
    return {
        "/v1/responses": {
            "post": op(
                "createResponse",
                "Create a model response (OpenAI Responses API)",
                responses_out.ResponseObject,
                responses.ResponseRequest,
                stream="text/event-stream",
                errors=GENERATION,
            )
        },
        "/v1/responses/{response_id}": {
            "get": op(
                "getResponse", "A stored response (this key's own)", responses_out.ResponseObject, errors=(401, 404)
            ),
            "delete": op(
                "deleteResponse", "Delete a stored response", responses_out.ResponseDeleted, errors=(401, 404)
            ),
        },
        "/v1/responses/{response_id}/input_items": {
            "get": op(
                "listInputItems",
                "A stored response's input items (this key's own)",
                responses_items.ItemList,
                query=responses_items.ItemsQuery,
                errors=(400, 401, 404),
            )
        },
        "/api/pull": {
            "post": op(
                "ollamaPull",
                "Download a GGUF (a URL or Hugging Face owner/repo/file.gguf) and serve it (admin)",
                extras.StatusResponse,
                extras.PullRequest,
                stream="application/x-ndjson",
                errors=(*MANAGE, 502, 503),
                ollama=True,
            )
        },
        "/api/delete": {
            "delete": op(
                "ollamaDelete",
                "Remove a model from the models file, and its file when the appliance owns it (admin)",
                extras.StatusResponse,
                extras.DeleteRequest,
                errors=MANAGE,
                ollama=True,
            )
        },
        "/api/copy": {
            "post": op(
                "ollamaCopy",
                "Register a model under another name (admin)",
                extras.StatusResponse,
                extras.CopyRequest,
                errors=MANAGE,
                ollama=True,
            )
        },
        "/api/embeddings": {
            "post": op(
                "ollamaEmbeddings",
                "Embedding of one prompt (Ollama's legacy endpoint)",
                extras.LegacyEmbeddingsResponse,
                extras.LegacyEmbeddingsRequest,
                errors=TOKENS,
                ollama=True,
            )
        },
        "/tokenize": {
            "post": op(
                "tokenize",
                "Text to token ids (llama-server)",
                extras.TokenizeResponse,
                extras.TokenizeRequest,
                errors=TOKENS,
            )
        },
        "/detokenize": {
            "post": op(
                "detokenize",
                "Token ids to text (llama-server)",
                extras.DetokenizeResponse,
                extras.DetokenizeRequest,
                errors=TOKENS,
            )
        },
    }
