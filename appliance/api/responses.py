"""OpenAI's Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}, GET …/{id}/input_items.

Thin: parse (api/protocol/responses.py) → engine → render (api/protocol/responses_out.py) → frame. Stored
responses (api/response_store.py) belong to the API key that made them; another key gets 404.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from appliance.api.errors import client_error, error_response
from appliance.api.protocol import responses as wire
from appliance.api.protocol import responses_items as items
from appliance.api.protocol import responses_out as out
from appliance.api.protocol.common import parse
from appliance.api.response_store import StoredResponses
from appliance.api.sse import json_response, sse_response
from appliance.api.streaming import caller, note_request, pump, until_disconnect
from appliance.engine.types import Error, Message


def _store(request: Request) -> StoredResponses:
    return request.app.state.responses


def _owner(request: Request) -> str:
    return getattr(request.state, "principal", None) or ""


def _not_found(rid: str, param: str = "response_id"):
    code = "previous_response_not_found" if param == "previous_response_id" else "response_not_found"
    return client_error(404, f"Response with id '{rid}' not found.", code, param)


async def create(request: Request) -> Response:
    body = parse(wire.ResponseRequest, await request.body())
    owner = _owner(request)
    context: list[Message] = []
    if body.previous_response_id is not None:
        prev = await _store(request).get(owner, body.previous_response_id)
        if prev is None:
            raise _not_found(body.previous_response_id, "previous_response_id")
        context = prev.context
    req, convo = wire.generate_request(body, context, **caller(request))
    note_request(request, req)
    stream = await until_disconnect(request, request.app.state.engine.open(req))
    renderer = out.ResponseRenderer(body, stream.model.id)
    headers = {"X-Appliance-Backend": stream.backend}

    async def save() -> None:
        final = renderer.final
        if body.store and final is not None:
            turns = convo + out.output_messages(final.output)
            await _store(request).put(owner, final.id, final.model_dump_json(), turns, convo[len(context) :])

    if body.stream:

        async def events() -> AsyncIterator[BaseModel]:
            async for item in pump(request, stream, renderer):
                if isinstance(item, out.LifecycleEvent) and item.response is renderer.final:
                    await save()  # stored before the client learns the id it may chain from
                yield item

        return sse_response(events(), headers, named=True)

    async def drain() -> None:
        async for _ in pump(request, stream, renderer):
            pass

    await until_disconnect(request, drain())
    if renderer.error is not None or renderer.final is None:
        err = renderer.error or Error(500, "the stream ended without finishing", "server_error")
        return error_response(err, request.url.path, headers)
    await save()
    return json_response(renderer.final, headers)


async def get(request: Request) -> Response:
    rid = request.path_params["response_id"]
    stored = await _store(request).get(_owner(request), rid)
    if stored is None:
        raise _not_found(rid)
    return Response(stored.body, media_type="application/json")


async def input_items(request: Request) -> Response:
    rid = request.path_params["response_id"]
    q = items.ItemsQuery.of(request.query_params)
    stored = await _store(request).get(_owner(request), rid)
    if stored is None:
        raise _not_found(rid)
    return json_response(items.page(items.input_items(rid, stored.input), q))


async def delete(request: Request) -> Response:
    rid = request.path_params["response_id"]
    if not await _store(request).delete(_owner(request), rid):
        raise _not_found(rid)
    return json_response(out.ResponseDeleted(id=rid))


routes = [
    Route("/v1/responses", create, methods=["POST"]),
    Route("/v1/responses/{response_id}", get, methods=["GET"]),
    Route("/v1/responses/{response_id}", delete, methods=["DELETE"]),
    Route("/v1/responses/{response_id}/input_items", input_items, methods=["GET"]),
]
