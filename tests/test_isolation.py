"""Requests are isolated from each other even when clients send the same X-Request-Id (issue 13, point 1).

The id that routes tokens and cancels between the API process and the model worker is made up by the
server per generation; the client's X-Request-Id is only echoed and logged.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.slow

SAME_ID = "the-same-request-id"
PROMPTS = ["Name three colours.", "Write a haiku about the sea."]


def body(prompt: str, max_tokens: int = 32) -> dict:
    return {
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
    }


async def stream_chat(client: httpx.AsyncClient, prompt: str, stop_after: int | None = None) -> tuple[str, str]:
    """(text, finish_reason) of one streamed chat; `stop_after` chunks: disconnect early."""
    text, reason, chunks = "", "", 0
    async with client.stream("POST", "/v1/chat/completions", json=body(prompt), headers={"X-Request-Id": SAME_ID}) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["x-request-id"] == SAME_ID  # still echoed
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            assert "error" not in doc, doc
            for choice in doc["choices"]:
                text += choice["delta"].get("content") or ""
                reason = choice.get("finish_reason") or reason
            chunks += 1
            if stop_after is not None and chunks >= stop_after:
                return text, "disconnected"
    return text, reason


async def test_two_clients_with_the_same_request_id_each_get_their_own_output(appliance_server: Server) -> None:
    async with httpx.AsyncClient(base_url=appliance_server.base_url, timeout=120) as client:
        alone = [await stream_chat(client, p) for p in PROMPTS]
        assert alone[0][0] != alone[1][0] and all(t for t, _ in alone)
        for _ in range(2):
            together = await asyncio.gather(*(stream_chat(client, p) for p in PROMPTS))
            assert list(together) == alone


async def test_a_disconnect_cancels_only_its_own_generation(appliance_server: Server) -> None:
    async with httpx.AsyncClient(base_url=appliance_server.base_url, timeout=120) as client:
        alone = await stream_chat(client, PROMPTS[1])
        quitter = asyncio.create_task(stream_chat(client, PROMPTS[0], stop_after=2))
        stayer = asyncio.create_task(stream_chat(client, PROMPTS[1]))
        await quitter
        assert await stayer == alone
