"""The agent's logic with a scripted chat model and bag-of-words embeddings (no model, no torch):
tool call → tool → answer, memory injection, per-user isolation, threads (ids per owner), 409/400, loop and time limits,
and the /v1/threads and /v1/memories endpoints (with and without an API-key principal)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import pytest_asyncio
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk
from pydantic import Field
from starlette.applications import Starlette

from appliance.agent.service import AgentService
from appliance.agent.threads import stored_id
from appliance.api import threads as threads_api
from appliance.api.errors import engine_error_handler
from appliance.api.protocol.threads import message_of
from appliance.config import Settings
from appliance.engine.types import EngineError, Error, Finish, GenerateRequest, Message, Token

pytestmark = pytest.mark.asyncio(loop_scope="module")


class WordsEmbedder:
    """Bag-of-words unit vectors: texts sharing words are near."""

    id = "words"
    dimensions = 64
    ready = True
    state = "ready"

    async def embed(self, texts: list[str]) -> list[list[float]]:
        out = []
        for t in texts:
            v = [0.0] * self.dimensions
            for w in re.findall(r"\w+", t.lower()):
                v[int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dimensions] += 1.0
            n = math.sqrt(sum(x * x for x in v)) or 1.0
            out.append([x / n for x in v])
        return out

    async def wait_ready(self, timeout: float | None = None) -> None: ...
    def start(self) -> None: ...
    def close(self) -> None: ...


Reply = str | Callable[[list[BaseMessage]], str]


class ScriptedModel(BaseChatModel):
    """Replies from a script (strings, or functions of the prompt), streamed word by word; records prompts."""

    script: list[Any] = Field(default_factory=list)
    prompts: list[list[BaseMessage]] = Field(default_factory=list)
    delay: float = 0.0

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def _astream(self, messages, stop=None, run_manager=None, **kwargs):
        self.prompts.append(messages)
        reply = self.script.pop(0) if self.script else "OK."
        text = reply(messages) if callable(reply) else reply
        for word in re.findall(r"\S+\s*", text):
            if self.delay:
                await asyncio.sleep(self.delay)
            yield ChatGenerationChunk(message=AIMessageChunk(content=word))
        n_in = sum(len(str(m.content).split()) for m in messages)
        usage = {"input_tokens": n_in, "output_tokens": len(text.split()), "total_tokens": n_in + len(text.split())}
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="", usage_metadata=usage, response_metadata={"finish_reason": "stop"}, chunk_position="last"
            )
        )

    def prompt_text(self, i: int = -1) -> str:
        return "\n".join(f"{m.type}: {m.content}" for m in self.prompts[i])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def agent(tmp_path_factory: pytest.TempPathFactory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("agent"), agent_timeout=5, agent_recursion_limit=8)
    model = ScriptedModel()
    svc = AgentService(settings, model_factory=lambda model_id, req: model, embeddings=WordsEmbedder())
    svc.model = model  # for the tests
    await svc.start()
    await svc.ready()
    yield svc
    await svc.close()


@pytest.fixture
def model(agent: AgentService) -> ScriptedModel:
    m = agent.model
    m.script, m.prompts, m.delay = [], [], 0.0
    return m


async def run(agent: AgentService, text: str, thread: str | None = None, user: str | None = None, **kw):
    req = GenerateRequest(model="agent", messages=[Message("user", text)], thread_id=thread, user=user, **kw)
    events = [ev async for ev in agent.generate(req, "agent", "m")]
    return req, events


def answer_of(events: list) -> str:
    assert not [e for e in events if isinstance(e, Error)], events
    assert isinstance(events[-1], Finish)
    return "".join(e.text for e in events if isinstance(e, Token))


async def thread_messages(agent: AgentService, tid: str, scope: str = "default") -> list[Any]:
    """A thread's history, read as the API does: by its stored id (the owner's scope and the client's id)."""
    state = await agent.graph.aget_state({"configurable": {"thread_id": stored_id(scope, tid)}})
    return [message_of(m).model_dump() for m in state.values["messages"]]


async def test_tool_call_then_tool_then_answer(agent: AgentService, model: ScriptedModel) -> None:
    model.script = ["12 times 7 is 84."]
    req, events = await run(agent, "What is 12 * 7?")
    assert answer_of(events) == "12 times 7 is 84."
    assert req.thread_id and req.thread_id.startswith("thread_")  # a new thread id, for the X-Thread-Id echo
    msgs = await thread_messages(agent, req.thread_id)
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
    call = msgs[1]["tool_calls"][0]
    assert call["function"]["name"] == "calculator" and '"12 * 7"' in call["function"]["arguments"]
    assert msgs[2] == {"role": "tool", "content": "12 * 7 = 84", "name": "calculator", "tool_call_id": call["id"]}
    assert "calculator: 12 * 7 = 84" in model.prompt_text()  # the model answered with the result in context
    assert events[-1].usage.prompt_tokens > 0 and events[-1].usage.completion_tokens == 5


async def test_thread_continues_with_history(agent: AgentService, model: ScriptedModel) -> None:
    model.script = ["Nice to meet you.", "You told me about the purple kite."]
    _, events = await run(agent, "I flew a purple kite today.", thread="kites", user="kiter")
    first = events[-1].usage.prompt_tokens
    _, events = await run(agent, "What did I fly?", thread="kites", user="kiter")
    assert answer_of(events) == "You told me about the purple kite."
    prompt = model.prompt_text()
    assert "purple kite" in prompt and "Nice to meet you." in prompt
    assert events[-1].usage.prompt_tokens > first
    msgs = await thread_messages(agent, "kites", "kiter")
    assert [m["content"] for m in msgs if m["role"] == "user"] == ["I flew a purple kite today.", "What did I fly?"]


async def test_memory_is_saved_recalled_in_new_threads_and_isolated(agent: AgentService, model: ScriptedModel) -> None:
    model.script = ["Hello Alice.", "Hello Bob.", "Your name is Alice.", "I do not know your name."]
    await run(agent, "My name is Alice and I like green tea.", user="alice")
    await run(agent, "My name is Bob.", user="bob")
    facts = {m.text for m in (await agent.memory.list("alice"))[0] if m.kind == "fact"}
    assert facts == {"The user's name is Alice.", "The user likes green tea."}

    req, events = await run(agent, "What is my name?", user="alice")  # a new thread: only memory knows
    assert answer_of(events) == "Your name is Alice."
    prompt = model.prompt_text()
    assert "The user's name is Alice." in prompt
    assert "Bob" not in prompt
    msgs = await thread_messages(agent, req.thread_id, "alice")
    assert msgs[1]["tool_calls"][0]["function"]["name"] == "search_memory"
    assert "Alice" in msgs[2]["content"] and "Bob" not in msgs[2]["content"]

    await run(agent, "What is my name? Do you know anything about green tea?", user="carol")
    prompt = model.prompt_text()
    assert "Alice" not in prompt and "Bob" not in prompt and "green tea." not in prompt.split("human:")[0]


async def test_model_emitted_tool_call_is_run_and_not_shown(agent: AgentService, model: ScriptedModel) -> None:
    model.script = ['<tool_call>{"name": "calculator", "arguments": {"expression": "6 * 7"}}</tool_call>', "It is 42."]
    req, events = await run(agent, "Tell me the product of six and seven")
    assert answer_of(events) == "It is 42."
    msgs = await thread_messages(agent, req.thread_id)
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
    assert msgs[2]["content"] == "6 * 7 = 42"


async def test_runaway_tool_loop_hits_the_recursion_limit(agent: AgentService, model: ScriptedModel) -> None:
    model.script = ['{"name": "current_datetime", "arguments": {}}'] * 50
    _, events = await run(agent, "Loop forever please")
    err = events[-1]
    assert isinstance(err, Error) and err.code == "agent_recursion_limit" and err.status == 500


async def test_slow_run_times_out(agent: AgentService, model: ScriptedModel) -> None:
    agent.settings.agent_timeout = 0.5
    try:
        model.delay = 0.2
        model.script = ["one two three four five six seven eight nine ten"]
        _, events = await run(agent, "Count slowly", thread="slow")
    finally:
        agent.settings.agent_timeout = 5
    err = events[-1]
    assert isinstance(err, Error) and err.code == "agent_timeout" and err.status == 504
    assert stored_id("default", "slow") not in agent.busy  # the thread is free again


async def test_concurrent_requests_on_one_thread_get_409(agent: AgentService, model: ScriptedModel) -> None:
    model.delay = 0.05
    model.script = ["a b c d e f g h"]
    first = asyncio.create_task(run(agent, "first", thread="busy-1"))
    while stored_id("default", "busy-1") not in agent.busy:
        await asyncio.sleep(0.01)
    with pytest.raises(EngineError) as e:
        await run(agent, "second", thread="busy-1")
    assert e.value.error.status == 409 and e.value.error.code == "thread_busy"
    _, events = await first
    assert answer_of(events) == "a b c d e f g h"
    msgs = await thread_messages(agent, "busy-1")
    assert [m["content"] for m in msgs if m["role"] == "user"] == ["first"]


@pytest.mark.parametrize("bad", ["", "has space", "a/b", "x" * 129, "ünï"])
async def test_bad_thread_ids_are_400(agent: AgentService, bad: str) -> None:
    with pytest.raises(EngineError) as e:
        await run(agent, "hi", thread=bad)
    assert e.value.error.status == 400 and e.value.error.param == "X-Thread-Id"


async def test_another_users_thread_id_is_a_fresh_thread(agent: AgentService, model: ScriptedModel) -> None:
    """No existence oracle: another user's thread id is simply a new thread of one's own."""
    model.script = ["Hi Alice.", "Hi Mallory.", "Hi again."]
    await run(agent, "hello, my secret is 1234", thread="alices-thread", user="alice")
    _, events = await run(agent, "let me read that", thread="alices-thread", user="mallory")
    assert answer_of(events) == "Hi Mallory."
    assert "1234" not in model.prompt_text()  # nothing of alice's thread reached mallory's prompt
    mine = await thread_messages(agent, "alices-thread", "mallory")
    assert [m["content"] for m in mine if m["role"] == "user"] == ["let me read that"]
    theirs = await thread_messages(agent, "alices-thread", "alice")
    assert [m["content"] for m in theirs if m["role"] == "user"] == ["hello, my secret is 1234"]
    # both may use it at once: they are two threads
    assert (await agent.threads.get(stored_id("alice", "alices-thread"))).scope == "alice"
    assert (await agent.threads.get(stored_id("mallory", "alices-thread"))).scope == "mallory"


async def test_embeddings_loading_is_503_and_leaves_no_half_turn(agent: AgentService, model: ScriptedModel) -> None:
    async def loading(timeout: float | None = None) -> None:
        raise EngineError(Error(503, "loading", code="embeddings_loading"))

    agent.embeddings.wait_ready = loading
    try:
        _, events = await run(agent, "hello?", thread="early")
    finally:
        del agent.embeddings.wait_ready
    assert isinstance(events[-1], Error) and events[-1].code == "embeddings_loading" and events[-1].status == 503
    assert await agent.threads.get(stored_id("default", "early")) is None
    assert (await agent.graph.aget_state({"configurable": {"thread_id": stored_id("default", "early")}})).values == {}


async def test_completions_on_the_agent_are_400(agent: AgentService) -> None:
    req = GenerateRequest(model="agent", prompt="hi")
    with pytest.raises(EngineError) as e:
        [ev async for ev in agent.generate(req, "agent", "m")]
    assert e.value.error.status == 400 and e.value.error.param == "model"
    req = GenerateRequest(model="agent", messages=[Message("system", "Be terse.")])
    with pytest.raises(EngineError) as e:
        [ev async for ev in agent.generate(req, "agent", "m")]
    assert e.value.error.status == 400 and e.value.error.param == "messages"


# -- the HTTP endpoints ------------------------------------------------------------------------------


class PrincipalFromHeader:
    """Stands in for the API-key middleware: X-Test-Principal → scope["state"]["principal"]."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for k, v in scope["headers"]:
                if k == b"x-test-principal":
                    scope.setdefault("state", {})["principal"] = v.decode()
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def http(agent: AgentService) -> httpx.AsyncClient:
    app = Starlette(routes=threads_api.routes, exception_handlers={EngineError: engine_error_handler})
    app.state.agent = agent
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=PrincipalFromHeader(app)), base_url="http://t")


async def test_threads_endpoints(agent: AgentService, model: ScriptedModel, http: httpx.AsyncClient) -> None:
    for i in range(3):
        await run(agent, f"page test {i}", thread=f"page-{i}", user="pager")
    r = await http.get("/v1/threads", params={"user": "pager", "limit": 2})
    doc = r.json()
    assert r.status_code == 200 and doc["object"] == "list" and doc["has_more"] is True
    assert [t["id"] for t in doc["data"]] == ["page-2", "page-1"]  # newest first
    assert set(doc["data"][0]) >= {"id", "object", "created_at", "updated_at", "title", "model"}
    r = await http.get("/v1/threads", params={"user": "pager", "limit": 2, "after": "page-1"})
    assert [t["id"] for t in r.json()["data"]] == ["page-0"] and r.json()["has_more"] is False

    r = await http.get("/v1/threads/page-0")
    doc = r.json()
    assert doc["object"] == "thread" and doc["title"] == "page test 0"
    assert doc["messages"][0] == {"role": "user", "content": "page test 0"}

    assert (await http.delete("/v1/threads/page-0")).json()["deleted"] is True
    r = await http.get("/v1/threads/page-0")
    assert r.status_code == 404 and r.json()["error"]["code"] == "thread_not_found"
    assert (await agent.threads.saver.aget_tuple({"configurable": {"thread_id": stored_id("pager", "page-0")}})) is None
    assert (await http.delete("/v1/threads/page-0")).status_code == 404
    assert (await http.get("/v1/threads/bad%20id")).status_code == 400
    assert (await http.get("/v1/threads", params={"limit": 0})).status_code == 400


async def test_threads_are_private_to_a_key(agent: AgentService, http: httpx.AsyncClient) -> None:
    await run(agent, "key thread", thread="keyed", principal="key-a")
    assert (await http.get("/v1/threads/keyed", headers={"X-Test-Principal": "key-a"})).status_code == 200
    assert (await http.get("/v1/threads/keyed", headers={"X-Test-Principal": "key-b"})).status_code == 404
    assert (await http.delete("/v1/threads/keyed", headers={"X-Test-Principal": "key-b"})).status_code == 404
    listed = (await http.get("/v1/threads", headers={"X-Test-Principal": "key-b"})).json()["data"]
    assert "keyed" not in [t["id"] for t in listed]
    listed = (await http.get("/v1/threads", headers={"X-Test-Principal": "key-a"})).json()["data"]
    assert [t["id"] for t in listed] == ["keyed"]  # the client's id, not the stored one


async def test_memories_endpoints_and_key_scoping(agent: AgentService, http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/memories", json={"text": "The user owns a red bicycle.", "user": "dora"})
    assert r.status_code == 201
    mid = r.json()["id"]
    doc = (await http.get("/v1/memories", params={"user": "dora"})).json()
    assert [m["text"] for m in doc["data"]] == ["The user owns a red bicycle."] and doc["user"] == "dora"
    hits = (await http.get("/v1/memories/search", params={"user": "dora", "q": "red bicycle"})).json()["data"]
    assert hits[0]["id"] == mid and hits[0]["score"] > 0.5
    assert (await http.get("/v1/memories/search", params={"user": "eve", "q": "red bicycle"})).json()["data"] == []
    assert (await http.get("/v1/memories/search", params={"user": "dora"})).status_code == 400

    # with a key, the scope is the key's name: `user` cannot reach someone else's memories
    key = {"X-Test-Principal": "key-x"}
    await http.post("/v1/memories", json={"text": "Key x likes jazz."}, headers=key)
    r = await http.get("/v1/memories", params={"user": "dora"}, headers=key)
    assert r.status_code == 403 and r.json()["error"]["param"] == "user"
    r = await http.get("/v1/memories", headers=key)
    assert [m["text"] for m in r.json()["data"]] == ["Key x likes jazz."]
    hits = (await http.get("/v1/memories/search", params={"q": "red bicycle"}, headers=key)).json()["data"]
    assert all(h["user"] == "key-x" for h in hits)
    assert (await http.delete(f"/v1/memories/{mid}", headers=key)).status_code == 404  # dora's, not key-x's

    assert (await http.delete(f"/v1/memories/{mid}")).json()["deleted"] is True
    assert (await http.delete(f"/v1/memories/{mid}")).status_code == 404
    r = await http.delete("/v1/memories", headers=key)
    assert r.json()["deleted"] == 1
