"""The agent under a hostile or heavy user: crafted messages cannot stall the event loop (nothing scans the
user's text: the model picks the tools), thread checkpoints grow linearly with a thread's history, per-key
quotas on threads and memories, and `appliance data assign` (moving data from `default` or an old key name
to a key's id)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.agent.service import AgentService
from appliance.agent.threads import stored_id
from appliance.app import create_app
from appliance.cli import main
from appliance.config import Settings
from appliance.engine.router import Engine
from appliance.engine.types import EngineError, Finish
from appliance.memory.store import MemoryStore
from tests.fakes import ScriptedBackend, calls, ok, scripted_registry
from tests.test_agent_graph import WordsEmbedder, answer_of, run

N = 10_000

CRAFTED = {
    "spaces after an operator": "1 +" + " " * N + "x",
    "digits and operators": "1 + " * (N // 4),
    "digits and spaces": "1 " * (N // 2),
    "operators and spaces": "+ " * (N // 2) + "x",
    "minus signs": "1" + " -" * (N // 2) + " x",
    "nested parentheses": "(" * (N // 2 - 2) + "1+1" + ")" * (N // 2 - 2),
    "open parentheses": "(" * N + "x",
    "times x": "1 x " * (N // 4),
    "decimal points": "1." * (N // 2),
    "mixed arithmetic": "calculate " + "( - 1 . 2 * " * (N // 12),
    "my name is": "my name is " * (N // 11),
    "likes": "I like " * (N // 7),
    "remember with spaces": "remember that xyz" + " " * N + "y",
    "recall with spaces": "what is my x" + " " * N + "y?",
    "favourite with spaces": "my favourite " + " " * N + "x is y",
    "i with spaces": "i" + " " * N + "x",
    "what time": "what " * (N // 5),
    "question marks": "who am i" + " ?" * (N // 2),
    "newlines": "I like tea\n" * (N // 11),
}


def crafted_message() -> str:
    """One message of N characters mixing the worst cases above."""
    return "".join(text[: N // len(CRAFTED)] for text in CRAFTED.values())[:N]


# -- /health while a crafted agent message is handled ---------------------------------------------------


class Embedder(WordsEmbedder):
    scheduled, error, load_seconds = False, None, 0.1
    id = "all-minilm-l6-v2"

    async def embed_with_usage(self, texts: list[str]) -> tuple[list[list[float]], int]:
        return await self.embed(texts), sum(len(t.split()) for t in texts)


@contextlib.asynccontextmanager
async def app_client(settings: Settings, backend: ScriptedBackend) -> AsyncIterator[httpx.AsyncClient]:
    """The whole app over a scripted model backend: the agent runs through the engine as in production."""
    app = create_app(
        settings,
        backend_factories={"llamacpp": lambda model_id, spec: backend},
        embeddings=Embedder(),
    )
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        c.app = app  # type: ignore[attr-defined]
        yield c


async def test_health_answers_while_a_crafted_agent_message_is_handled(tmp_path: Path) -> None:
    backend = ScriptedBackend("llamacpp", default=ok("Noted."))
    settings = Settings(data_dir=tmp_path / "data", embeddings_preload=False)
    async with app_client(settings, backend) as c:
        await c.app.state.agent.ready()
        assert (await c.get("/health")).status_code == 200
        latencies: list[float] = []
        done = asyncio.Event()

        async def poll() -> None:
            while not done.is_set():
                t = time.perf_counter()
                r = await c.get("/health")
                latencies.append(time.perf_counter() - t)
                assert r.status_code in (200, 503)
                await asyncio.sleep(0.002)

        poller = asyncio.create_task(poll())
        try:
            for _ in range(3):
                r = await c.post(
                    "/v1/chat/completions",
                    json={"model": "agent", "messages": [{"role": "user", "content": crafted_message()}]},
                    timeout=60,
                )
                assert r.status_code == 200, r.text
        finally:
            done.set()
            await poller
        assert backend.calls[-1].messages[-1].content == crafted_message()  # it did reach the model
    assert len(latencies) >= 5
    assert max(latencies) < 0.2, f"/health took up to {max(latencies) * 1000:.0f} ms"
    assert statistics.median(latencies) < 0.05


# -- checkpoints grow linearly -------------------------------------------------------------------------------


async def used_bytes(agent: AgentService) -> int:
    """Bytes of the thread database in use (pages minus free pages: freed space is reused)."""
    pages = await agent.threads.pragma("page_count")
    free = await agent.threads.pragma("freelist_count")
    return (pages - free) * await agent.threads.pragma("page_size")


@contextlib.asynccontextmanager
async def agent_service(tmp: Path, **kw: Any) -> AsyncIterator[AgentService]:
    """An agent over the engine with a scripted model `m` (svc.backend; by default it answers "OK.")."""
    settings = Settings(data_dir=tmp, agent_timeout=10, agent_recursion_limit=8, default_model="m", **kw)
    backend = ScriptedBackend("llamacpp", default=ok("OK."))
    svc = AgentService(
        settings, engine=Engine(scripted_registry(settings, {"m": [backend]}), settings), embeddings=WordsEmbedder()
    )
    svc.backend = backend  # type: ignore[attr-defined]
    await svc.start()
    await svc.ready()
    try:
        yield svc
    finally:
        await svc.close()


async def test_thread_storage_grows_linearly_with_its_history(tmp_path: Path) -> None:
    async with agent_service(tmp_path, agent_memory_k=0) as agent:
        sizes = {}
        filler = "lorem ipsum dolor sit amet " * 40  # ~1 KB a turn, so history dominates the file
        for turn in range(1, 31):
            agent.backend.then(ok(f"Answer {turn}: {filler}"))  # type: ignore[attr-defined]
            _, events = await run(agent, f"Turn {turn}: {filler}", thread="long")
            assert isinstance(events[-1], Finish), events[-1]
            if turn in (15, 30):
                sizes[turn] = await used_bytes(agent)
        # linear: twice the history takes about twice the space (it took 4x when every step kept a copy)
        assert sizes[30] < 2.6 * sizes[15] + 64 * 1024, sizes
        state = await agent.graph.aget_state({"configurable": {"thread_id": stored_id("default", "long")}})
        assert len(state.values["messages"]) == 60  # the whole history is still there
        async with agent.threads.conn.execute(
            "SELECT COUNT(*) FROM checkpoints WHERE thread_id = ?", (stored_id("default", "long"),)
        ) as cur:
            assert (await cur.fetchone())[0] == 1


# -- quotas -----------------------------------------------------------------------------------------------------


async def test_thread_quota(tmp_path: Path) -> None:
    async with agent_service(tmp_path, max_threads_per_key=2) as agent:
        for tid in ("a", "b"):
            assert answer_of((await run(agent, "hello", thread=tid, user="u"))[1])
        with pytest.raises(EngineError) as e:  # before the stream starts: the client gets a plain 429
            await run(agent, "hello", thread="c", user="u")
        err = e.value.error
        assert err.status == 429 and err.code == "quota_exceeded"
        assert "APPLIANCE_MAX_THREADS_PER_KEY" in err.message and "DELETE /v1/threads" in err.message
        assert await agent.threads.get(stored_id("u", "c")) is None
        assert answer_of((await run(agent, "again", thread="a", user="u"))[1])  # existing threads continue
        assert answer_of((await run(agent, "hello", thread="c", user="v"))[1])  # another key is not affected
        await agent.threads.delete(stored_id("u", "b"))
        assert answer_of((await run(agent, "hello", thread="c", user="u"))[1])  # room again


async def test_the_thread_quota_holds_under_concurrent_creates(tmp_path: Path) -> None:
    """Ten new threads at once with one place left: exactly one gets it (count and insert are one step)."""
    from appliance.agent.threads import ThreadStore

    store = ThreadStore(tmp_path / "threads.sqlite")
    await store.open()
    try:
        assert await store.create("u:first", "u", "agent", "t", limit=2)
        made = await asyncio.gather(*(store.create(f"u:{i}", "u", "agent", "t", limit=2) for i in range(10)))
        assert sum(made) == 1 and await store.count("u") == 2
        assert await store.create("v:1", "v", "agent", "t", limit=2)  # another scope has its own quota
    finally:
        await store.close()


async def test_memory_quota_in_the_store(tmp_path: Path) -> None:
    store = MemoryStore(tmp_path / "memory", WordsEmbedder(), max_per_scope=2)
    try:
        a = await store.add("alice", "one fact")
        await store.add("alice", "two facts")
        with pytest.raises(EngineError) as e:
            await store.add("alice", "three facts")
        assert e.value.error.status == 429 and e.value.error.code == "quota_exceeded"
        assert "APPLIANCE_MAX_MEMORIES_PER_KEY" in e.value.error.message
        await store.add("alice", "One  fact")  # the same fact again is not a new memory
        await store.add("bob", "three facts")  # per key
        assert await store.delete(a.id, scope="alice")
        await store.add("alice", "three facts")
        assert await store.count("alice") == 2
    finally:
        await asyncio.to_thread(store.close)


async def test_memory_quota_for_the_agent_and_the_api(tmp_path: Path) -> None:
    backend = ScriptedBackend("llamacpp", default=ok("Hi."))
    backend.then(calls(("save_memory", {"fact": "The user's name is Zed."})))
    settings = Settings(data_dir=tmp_path / "data", embeddings_preload=False, max_memories_per_key=2)
    async with app_client(settings, backend) as c:
        await c.app.state.agent.ready()
        for text in ("The user likes tea.", "The user likes jazz."):
            assert (await c.post("/v1/memories", json={"text": text})).status_code == 201
        r = await c.post("/v1/memories", json={"text": "The user likes cats."})
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["code"] == "quota_exceeded" and "DELETE /v1/memories" in err["message"]
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "agent", "messages": [{"role": "user", "content": "My name is Zed."}]},
        )
        assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded", r.text
        # a message with nothing to save is answered (its turn summary is skipped, not an error)
        r = await c.post(
            "/v1/chat/completions",
            json={"model": "agent", "messages": [{"role": "user", "content": "Tell me a story."}]},
        )
        assert r.status_code == 200, r.text


# -- appliance data assign ---------------------------------------------------------------------------------------


def cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = main(list(args))
    return rc, out.getvalue()


async def test_data_assign_moves_threads_and_memories_to_a_key(tmp_path: Path) -> None:
    data, keys = tmp_path / "data", tmp_path / "keys.toml"
    common = ("--data-dir", str(data), "--keys-file", str(keys))
    async with agent_service(data) as agent:
        agent.backend.then(  # type: ignore[attr-defined]
            calls(("save_memory", {"fact": "The user's name is Alice."})),
            ok("Hi Alice."),
            ok("Hi."),
            calls(("save_memory", {"fact": "The user likes tea."})),
            ok("Hi old alice."),
            ok("Hi."),
        )
        await run(agent, "My name is Alice.", thread="t1")  # scope "default": before keys
        await run(agent, "hello again", thread="t2")
        await run(agent, "I like tea.", thread="t1", user="alice")  # scope "alice": a key's old name
        await run(agent, "bye", thread="t9", user="bob")
    assert main(["keys", "add", "alice", "--keys-file", str(keys)]) == 0
    from appliance.security.keys import read_keys_file

    key_id = read_keys_file(keys).keys["alice"].key_id

    rc, out = await asyncio.to_thread(cli, "data", "assign", "--list", *common)
    assert rc == 0, out
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()[1:]}
    assert rows["default"] == ["2", "2"]  # 2 threads; a fact and a turn summary (a turn that saved a fact adds none)
    assert rows["alice"] == ["1", "1"] and "--from alice --to alice" in out
    assert rows["bob"][0] == "1"

    rc, out = await asyncio.to_thread(cli, "data", "assign", "--from", "default", "--to", "alice", *common)
    assert rc == 0 and "moved 2 threads and 2 memories" in out, out
    rc, out = await asyncio.to_thread(cli, "data", "assign", "--from", "alice", "--to", "alice", *common)
    assert rc == 0 and "moved 1 threads" in out and "'t1' is now 't1-2'" in out, out
    rc, out = await asyncio.to_thread(cli, "data", "assign", "--from", "bob", "--to", "nobody", *common)
    assert rc == 2 and "no key named 'nobody'" in out

    rc, out = await asyncio.to_thread(cli, "data", "assign", "--list", *common)
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()[1:]}
    assert rows[key_id] == ["3", "3"] and "default" not in rows and "alice" not in rows, out
    assert "key alice" in out

    async with agent_service(data) as agent:
        threads, _ = await agent.threads.list(key_id, 10)
        assert sorted(t.thread_id for t in threads) == ["t1", "t1-2", "t2"]
        for tid, first in (("t1", "My name is Alice."), ("t1-2", "I like tea.")):
            state = await agent.graph.aget_state({"configurable": {"thread_id": stored_id(key_id, tid)}})
            assert state.values["messages"][0].content == first
        mems, _ = await agent.memory.list(key_id)
        facts = {m.text for m in mems if m.kind == "fact"}
        assert facts == {"The user's name is Alice.", "The user likes tea."}
        assert all(m.thread_id and m.thread_id.startswith(key_id + ":") for m in mems)
        # the key continues its moved thread, and recalls the moved memory in a new one
        agent.backend.then(ok("Welcome back."), ok("You are Alice."))  # type: ignore[attr-defined]
        _, events = await run(agent, "hello", thread="t1", principal=key_id)
        assert answer_of(events) == "Welcome back."
        _, events = await run(agent, "What is my name?", principal=key_id)
        assert answer_of(events) == "You are Alice."
        prompt = agent.backend.calls[-1].messages[0].content  # type: ignore[attr-defined]
        assert "The user's name is Alice." in prompt  # recalled into the system prompt
