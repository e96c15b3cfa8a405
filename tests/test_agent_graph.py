"""The agent's logic over the real engine path with a scripted backend (tests/fakes.py) and bag-of-words
embeddings (no model, no torch): the model's own tool calls (ToolCallDelta events) → tools → answer, the
forced first step and `respond`, auto mode and tool rounds, the answer prompt with the results, summaries
kept out of memory when the answer ignores its tools, memory injection, per-user isolation, threads (ids
per owner), 409/400, loop and time limits, cancellation, and the /v1/threads and /v1/memories endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk
from pydantic import Field
from starlette.applications import Starlette

from appliance.agent.graph import ANSWER_NOTE, MEMORY_NOTE, MEMORY_PREFIX, AgentOptions, build_graph
from appliance.agent.service import AgentService
from appliance.agent.threads import stored_id
from appliance.api import threads as threads_api
from appliance.api.errors import engine_error_handler
from appliance.api.protocol.threads import message_of
from appliance.engine.router import Engine
from appliance.engine.types import (
    EngineError,
    Error,
    Finish,
    GenerateRequest,
    Message,
    SamplingParams,
    Token,
    ToolChoice,
)
from tests.fakes import ScriptedBackend, Step, calls, ok, scripted_registry, settings, slow

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOOLS = ["calculator", "current_datetime", "search_memory", "save_memory"]


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


class ScriptedModel(BaseChatModel):
    """A LangChain-level stand-in (used by tests/test_roles.py): text replies from a script, streamed word by
    word, never a tool call; records prompts."""

    script: list[Any] = Field(default_factory=list)
    prompts: list[list[BaseMessage]] = Field(default_factory=list)
    delay: float = 0.0

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self.bind(tools=tools, **kwargs)

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
    s = settings(data_dir=tmp_path_factory.mktemp("agent"), agent_timeout=30, agent_recursion_limit=8)
    backend = ScriptedBackend("llamacpp")
    engine = Engine(scripted_registry(s, {"m": [backend]}), s)
    svc = AgentService(s, engine=engine, embeddings=WordsEmbedder())
    svc.backend = backend  # type: ignore[attr-defined]  (for the tests)
    await svc.start()
    await svc.ready()
    yield svc
    await svc.close()


@pytest.fixture
def backend(agent: AgentService) -> ScriptedBackend:
    b: ScriptedBackend = agent.backend  # type: ignore[attr-defined]
    b.script.clear()
    b.calls.clear()
    b.default = ok("OK.")
    return b


@contextlib.contextmanager
def options(agent: AgentService, **kw: Any) -> Iterator[None]:
    """Run with a graph compiled with other AgentOptions."""
    graph = agent.graph
    agent.graph = build_graph(agent.memory, agent.threads.saver, AgentOptions(**kw))
    try:
        yield
    finally:
        agent.graph = graph


async def run(agent: AgentService, text: str, thread: str | None = None, user: str | None = None, **kw):
    req = GenerateRequest(model="agent", messages=[Message("user", text)], thread_id=thread, user=user, **kw)
    events = [ev async for ev in agent.generate(req, "agent", "m")]
    return req, events


def answer_of(events: list) -> str:
    assert not [e for e in events if isinstance(e, Error)], events
    assert isinstance(events[-1], Finish)
    return "".join(e.text for e in events if isinstance(e, Token))


def prompt_text(req: GenerateRequest) -> str:
    return "\n".join(f"{m.role}: {m.content}" for m in req.messages or [])


def offered(req: GenerateRequest) -> list[str]:
    return [t.name for t in req.tools]


async def thread_messages(agent: AgentService, tid: str, scope: str = "default") -> list[Any]:
    """A thread's history, read as the API does: by its stored id (the owner's scope and the client's id)."""
    state = await agent.graph.aget_state({"configurable": {"thread_id": stored_id(scope, tid)}})
    return [message_of(m).model_dump() for m in state.values["messages"]]


async def summaries(agent: AgentService, scope: str) -> list[str]:
    return [m.text for m in (await agent.memory.list(scope))[0] if m.kind == "summary"]


async def test_model_calls_a_tool_then_answers_with_its_result(agent: AgentService, backend: ScriptedBackend) -> None:
    backend.then(calls(("calculator", {"expression": "12 * 7"})), ok("12 times 7 is 84."))
    req, events = await run(agent, "What is 12 * 7?", user="calc", params=SamplingParams(temperature=0.8))
    assert answer_of(events) == "12 times 7 is 84."
    assert req.thread_id and req.thread_id.startswith("thread_")  # a new thread id, for the X-Thread-Id echo
    msgs = await thread_messages(agent, req.thread_id, "calc")
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
    call = msgs[1]["tool_calls"][0]
    assert call["id"] == "call_scripted0" and call["function"]["name"] == "calculator"
    assert call["function"]["arguments"] == '{"expression": "12 * 7"}'
    assert msgs[2] == {"role": "tool", "content": "12 * 7 = 84", "name": "calculator", "tool_call_id": call["id"]}
    assert msgs[3] == {"role": "assistant", "content": "12 times 7 is 84."}

    first, second = backend.calls
    # the first step: the tools and `respond`, one of which the grammar makes the model call
    assert offered(first) == [*TOOLS, "respond"] and first.tool_choice == ToolChoice("required")
    expression = first.tools[0].parameters["properties"]["expression"]
    assert (
        expression["type"] == "string"
        and re.fullmatch(expression["pattern"], "(3 + 4) * 12")
        and not re.fullmatch(expression["pattern"], "12")
    )
    assert [m.role for m in first.messages] == ["system", "user"] and "`calculator`" in first.messages[0].content
    # the tool step is greedy; the answer keeps the client's sampling
    assert first.params.temperature == 0.0 and second.params.temperature == 0.8
    # the answer: no tools, the result stated in the system prompt and the last user message
    assert second.tools == [] and [m.role for m in second.messages] == ["system", "user"]
    assert second.messages[0].content.endswith("\n\nTool result: calculator: 12 * 7 = 84")
    last = second.messages[-1].content
    assert last == f"What is 12 * 7?\n\nTool result: calculator: 12 * 7 = 84\n{ANSWER_NOTE}"
    u = events[-1].usage
    assert (u.prompt_tokens, u.completion_tokens) == (6, 4 + 5)  # both model calls
    assert len(await summaries(agent, "calc")) == 1  # the answer used the result: the turn is remembered


async def test_recalled_memories_are_stated_to_an_answer_without_results(
    agent: AgentService, backend: ScriptedBackend
) -> None:
    """A turn that calls no tool (or whose search finds nothing) answers with the recalled memories stated in
    its user message, as results are; a turn with a result of its own does not get them."""
    await agent.memory.add("fido-owner", "The user's dog is called Biscuit.", kind="fact", thread_id="t0")
    backend.then(calls(("respond", {})), ok("Your dog is Biscuit."))
    await run(agent, "What is my dog called?", user="fido-owner")
    last = backend.calls[1].messages[-1].content
    assert last == f"What is my dog called?\n\n{MEMORY_PREFIX}The user's dog is called Biscuit.\n{MEMORY_NOTE}"

    backend.calls.clear()
    backend.then(calls(("calculator", {"expression": "2 + 2"})), ok("2 + 2 = 4."))
    await run(agent, "What is 2 + 2 for my dog?", user="fido-owner")
    last = backend.calls[1].messages[-1].content
    assert MEMORY_PREFIX not in last and last.endswith(ANSWER_NOTE)


async def test_respond_answers_without_a_stored_call(agent: AgentService, backend: ScriptedBackend) -> None:
    backend.then(calls(("respond", {})), ok("Hello there!"))
    req, events = await run(agent, "Hi!")
    assert answer_of(events) == "Hello there!"
    msgs = await thread_messages(agent, req.thread_id)
    assert msgs == [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello there!"}]
    assert offered(backend.calls[0])[-1] == "respond" and backend.calls[1].tools == []


async def test_a_backend_that_answers_in_text_is_an_answer(agent: AgentService, backend: ScriptedBackend) -> None:
    """A model that answers despite the forced choice (e.g. a fallback without tool support): one call."""
    backend.then(ok("Just text."))
    req, events = await run(agent, "Hello?")
    assert answer_of(events) == "Just text." and len(backend.calls) == 1
    assert [m["role"] for m in await thread_messages(agent, req.thread_id)] == ["user", "assistant"]


async def test_an_answer_that_ignores_its_tools_is_not_remembered(
    agent: AgentService, backend: ScriptedBackend
) -> None:
    backend.then(calls(("calculator", {"expression": "12 * 7"})), ok("Sorry, the tool cannot do arithmetic."))
    req, events = await run(agent, "What is 12 * 7?", user="ignorer")
    assert answer_of(events) == "Sorry, the tool cannot do arithmetic."
    assert [m["role"] for m in await thread_messages(agent, req.thread_id, "ignorer")][-2] == "tool"
    assert await summaries(agent, "ignorer") == []


async def test_auto_mode_and_several_tool_rounds(agent: AgentService, backend: ScriptedBackend) -> None:
    with options(agent, tool_choice="auto", tool_rounds=3):
        backend.then(ok("Plain answer."))
        _, events = await run(agent, "Tell me a joke.")
        assert answer_of(events) == "Plain answer."
        assert offered(backend.calls[0]) == TOOLS and backend.calls[0].tool_choice == ToolChoice("auto")

        backend.calls.clear()
        backend.then(
            calls(("calculator", {"expression": "2 + 3"})),
            calls(("calculator", {"expression": "5 * 10"}), ("current_datetime", {})),
            ok("It is 50."),
        )
        req, events = await run(agent, "What is (2 + 3) * 10?")
        assert answer_of(events) == "It is 50."
        roles = [m["role"] for m in await thread_messages(agent, req.thread_id)]
        assert roles == ["user", "assistant", "tool", "assistant", "tool", "tool", "assistant"]
        assert [offered(r) for r in backend.calls] == [TOOLS] * 3
        # later steps see this turn's calls and results as structured messages, for the backend to render
        third = backend.calls[2].messages
        assert [m.role for m in third] == ["system", "user", "assistant", "tool", "assistant", "tool", "tool"]
        assert third[2].tool_calls[0].name == "calculator" and third[3].tool_call_id == third[2].tool_calls[0].id
        assert third[5].content == "5 * 10 = 50" and third[5].name == "calculator"


async def test_tool_rounds_end_with_an_answer_without_tools(agent: AgentService, backend: ScriptedBackend) -> None:
    backend.default = calls(("current_datetime", {}))  # a model that would call tools forever
    with options(agent, tool_choice="auto", tool_rounds=2):
        req, events = await run(agent, "Loop please")
    text = answer_of(events)
    assert [offered(r) for r in backend.calls] == [TOOLS, TOOLS, []]
    assert text == ""  # the scripted "answer" step still returned calls, which are ignored: no tools offered
    roles = [m["role"] for m in await thread_messages(agent, req.thread_id)]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]


async def test_runaway_tool_loop_hits_the_recursion_limit(agent: AgentService, backend: ScriptedBackend) -> None:
    backend.default = calls(("current_datetime", {}))
    with options(agent, tool_choice="auto", tool_rounds=20):
        _, events = await run(agent, "Loop forever please")
    err = events[-1]
    assert isinstance(err, Error) and err.code == "agent_recursion_limit" and err.status == 500


async def test_thread_continues_with_history(agent: AgentService, backend: ScriptedBackend) -> None:
    backend.then(calls(("calculator", {"expression": "6 * 7"})), ok("It is 42."), calls(("respond", {})), ok("Yes."))
    _, events = await run(agent, "What is 6 * 7?", thread="kites", user="kiter")
    first = events[-1].usage.prompt_tokens
    _, events = await run(agent, "Are you sure?", thread="kites", user="kiter")
    assert answer_of(events) == "Yes."
    # the earlier turn, its tool result folded into its user message, then the new question
    msgs = backend.calls[2].messages
    assert [m.role for m in msgs] == ["system", "user", "assistant", "user"]
    assert "6 * 7 = 42" in msgs[1].content and msgs[2].content == "It is 42." and msgs[3].content == "Are you sure?"
    assert ANSWER_NOTE not in msgs[1].content  # only the current turn is told to answer from its results
    assert events[-1].usage.prompt_tokens > 0 and first > 0
    msgs = await thread_messages(agent, "kites", "kiter")
    assert [m["content"] for m in msgs if m["role"] == "user"] == ["What is 6 * 7?", "Are you sure?"]


async def test_memory_is_saved_recalled_in_new_threads_and_isolated(
    agent: AgentService, backend: ScriptedBackend
) -> None:
    backend.then(calls(("save_memory", {"fact": "The user's name is Alice."})), ok("Hello Alice."))
    await run(agent, "My name is Alice.", user="alice")
    backend.then(calls(("save_memory", {"fact": "The user's name is Bob."})), ok("Hello Bob."))
    await run(agent, "My name is Bob.", user="bob")
    facts = {m.text for m in (await agent.memory.list("alice"))[0] if m.kind == "fact"}
    assert facts == {"The user's name is Alice."}

    backend.calls.clear()
    backend.then(calls(("search_memory", {"query": "user's name"})), ok("Your name is Alice."))
    req, events = await run(agent, "What is my name?", user="alice")  # a new thread: only memory knows
    assert answer_of(events) == "Your name is Alice."
    msgs = await thread_messages(agent, req.thread_id, "alice")
    assert msgs[1]["tool_calls"][0]["function"]["name"] == "search_memory"
    assert "Alice" in msgs[2]["content"] and "Bob" not in msgs[2]["content"]
    answer_prompt = prompt_text(backend.calls[1])
    # what search_memory found is stated as a recalled memory, in the system prompt and the user message
    assert answer_prompt.count(f"{MEMORY_PREFIX}The user's name is Alice.") == 2, answer_prompt
    assert "What you remember about this user" not in answer_prompt  # no second list beside it
    assert "Bob" not in answer_prompt + prompt_text(backend.calls[0])

    backend.calls.clear()
    backend.then(calls(("search_memory", {"query": "name"})), ok("I do not know."))
    req, _ = await run(agent, "What is my name?", user="carol")
    msgs = await thread_messages(agent, req.thread_id, "carol")
    assert msgs[2]["content"] == "Nothing remembered about that."
    assert all("Alice" not in prompt_text(r) and "Bob" not in prompt_text(r) for r in backend.calls)


async def test_slow_run_times_out(agent: AgentService, backend: ScriptedBackend) -> None:
    agent.settings.agent_timeout = 0.5
    try:
        backend.then(slow(2.0))
        _, events = await run(agent, "Count slowly", thread="slow")
    finally:
        agent.settings.agent_timeout = 30
    err = events[-1]
    assert isinstance(err, Error) and err.code == "agent_timeout" and err.status == 504
    assert stored_id("default", "slow") not in agent.busy  # the thread is free again
    await asyncio.sleep(0.05)
    assert backend.in_flight == 0  # and the model's generation was stopped


async def test_closing_the_stream_stops_the_model_within_a_step(agent: AgentService, backend: ScriptedBackend) -> None:
    """What a client disconnect does (the API closes the engine stream): the model's generation ends at once."""
    words = [Token(f" w{i}") for i in range(200)]
    backend.then(calls(("respond", {})), Step([*words, Finish("stop", ok().events[-1].usage)], gap=0.02))
    req = GenerateRequest(model="agent", messages=[Message("user", "Tell a long story.")], thread_id="quitter")
    gen = agent.generate(req, "agent", "m")
    async for ev in gen:
        if isinstance(ev, Token) and ev.text:
            break
    assert backend.in_flight == 1
    t = time.monotonic()
    await gen.aclose()
    while backend.in_flight and time.monotonic() - t < 1:
        await asyncio.sleep(0.005)
    assert backend.in_flight == 0 and time.monotonic() - t < 0.1  # one 20 ms "decode step", not 4 s
    assert stored_id("default", "quitter") not in agent.busy


async def test_concurrent_requests_on_one_thread_get_409(agent: AgentService, backend: ScriptedBackend) -> None:
    backend.then(calls(("respond", {})), Step(ok("a b c d e f g h").events, gap=0.05))
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


async def test_another_users_thread_id_is_a_fresh_thread(agent: AgentService, backend: ScriptedBackend) -> None:
    """No existence oracle: another user's thread id is simply a new thread of one's own."""
    backend.then(ok("Hi Alice."), ok("Hi Mallory."))
    await run(agent, "hello, my secret is 1234", thread="alices-thread", user="alice")
    _, events = await run(agent, "let me read that", thread="alices-thread", user="mallory")
    assert answer_of(events) == "Hi Mallory."
    assert "1234" not in prompt_text(backend.calls[-1])  # nothing of alice's thread reached mallory's prompt
    mine = await thread_messages(agent, "alices-thread", "mallory")
    assert [m["content"] for m in mine if m["role"] == "user"] == ["let me read that"]
    theirs = await thread_messages(agent, "alices-thread", "alice")
    assert [m["content"] for m in theirs if m["role"] == "user"] == ["hello, my secret is 1234"]
    # both may use it at once: they are two threads
    assert (await agent.threads.get(stored_id("alice", "alices-thread"))).scope == "alice"
    assert (await agent.threads.get(stored_id("mallory", "alices-thread"))).scope == "mallory"


async def test_embeddings_loading_is_503_and_leaves_no_half_turn(agent: AgentService, backend: ScriptedBackend) -> None:
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


async def test_completions_and_client_tools_on_the_agent_are_400(agent: AgentService) -> None:
    req = GenerateRequest(model="agent", prompt="hi")
    with pytest.raises(EngineError) as e:
        [ev async for ev in agent.generate(req, "agent", "m")]
    assert e.value.error.status == 400 and e.value.error.param == "model"
    req = GenerateRequest(model="agent", messages=[Message("system", "Be terse.")])
    with pytest.raises(EngineError) as e:
        [ev async for ev in agent.generate(req, "agent", "m")]
    assert e.value.error.status == 400 and e.value.error.param == "messages"
    from appliance.engine.types import Tool

    req = GenerateRequest(model="agent", messages=[Message("user", "hi")], tools=[Tool("mine")])
    with pytest.raises(EngineError) as e:
        [ev async for ev in agent.generate(req, "agent", "m")]
    assert e.value.error.status == 400 and e.value.error.param == "tools"


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


async def test_threads_endpoints(agent: AgentService, backend: ScriptedBackend, http: httpx.AsyncClient) -> None:
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


async def test_threads_are_private_to_a_key(
    agent: AgentService, backend: ScriptedBackend, http: httpx.AsyncClient
) -> None:
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


# -- on a model with a tokenizer (llama.cpp): the kind as one token, then the call in the user's words ---------


class TokenizingBackend(ScriptedBackend):
    """A scripted backend with its own vocabulary, as llama.cpp's: the agent's one-token choice runs on it."""

    async def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return [1000 + sum(map(ord, text))]

    async def detokenize(self, tokens: list[int]) -> str:
        return ""


@pytest_asyncio.fixture(loop_scope="module")
async def tokenizing_agent(tmp_path: Any):
    s = settings(data_dir=tmp_path, agent_timeout=30, agent_recursion_limit=8)
    backend = TokenizingBackend("llamacpp")
    svc = AgentService(s, engine=Engine(scripted_registry(s, {"m": [backend]}), s), embeddings=WordsEmbedder())
    svc.backend = backend  # type: ignore[attr-defined]
    await svc.start()
    await svc.ready()
    yield svc
    await svc.close()


async def test_on_a_small_model_facts_and_searches_are_the_users_own_words(tokenizing_agent: AgentService) -> None:
    """The kind of message is one greedy token restricted to the labels' first tokens; a fact to save is then
    one of the endings of the user's sentence (what a 135M model copies right), and a search is the question."""
    agent, backend = tokenizing_agent, tokenizing_agent.backend  # type: ignore[attr-defined]
    backend.then(ok("remember"), calls(("save_memory", {"fact": "I live in Lisbon."})), ok("Noted."))
    await run(agent, 'Remember that I live in "Lisbon".', user="lis")
    label, call, _ = backend.calls
    assert label.params.max_tokens == 1 and label.params.temperature == 0.0 and len(label.params.logit_bias) == 5
    assert call.tool_choice == ToolChoice("function", "save_memory") and offered(call) == ["save_memory"]
    fact = call.tools[0].parameters["properties"]["fact"]
    assert fact["enum"] == ["Remember that I live in Lisbon.", "that I live in Lisbon.", "I live in Lisbon."]
    mems = (await agent.memory.list("lis"))[0]
    assert [(m.kind, m.text) for m in mems] == [("fact", "I live in Lisbon.")]  # and no summary beside it

    backend.calls.clear()
    backend.then(ok("my"), calls(("search_memory", {"query": "Where do I live?"})), ok("You live in Lisbon."))
    _, events = await run(agent, "Where do I live?", user="lis")
    assert answer_of(events) == "You live in Lisbon."
    _, search, answer = backend.calls
    assert search.tools[0].parameters["properties"]["query"]["enum"] == ["Where do I live?"]
    assert prompt_text(answer).count(f"{MEMORY_PREFIX}I live in Lisbon.") == 2
