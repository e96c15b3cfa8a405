"""The agent end to end: a real server, the embedded SmolLM2 model, sentence-transformers memory and the
`openai` SDK. The model itself calls the tools (a grammar makes the 135M model's call valid): an arithmetic
question is answered by a real calculator call visible in its thread; threads continue across requests and
across a SIGKILL + restart; one user's memories never reach another's thread; a busy thread answers 409;
a client that leaves an agent stream stops the model at once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import Server, start_server
from tests.test_embeddings import wait_for_embeddings

pytestmark = pytest.mark.slow

# An agent turn is two or three generations: on a busy test machine, give them time.
SLOW_MACHINE = {
    "APPLIANCE_AGENT_TIMEOUT": "600",
    "APPLIANCE_FIRST_TOKEN_TIMEOUT": "300",
    "APPLIANCE_REQUEST_DEADLINE": "600",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The module's own server (the agent's prompts would otherwise warm the shared server's KV slots).
    The last test kills it with SIGKILL and restarts on its data dir."""
    s = start_server(tmp_path_factory.mktemp("agent-e2e"), "--context-size", "4096", env=SLOW_MACHINE)
    try:
        wait_for_embeddings(s)
        yield s
    finally:
        s.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=600)


def ask(client: openai.OpenAI, text: str, thread: str | None = None, user: str | None = None, max_tokens: int = 24):
    """One agent turn: (completion, thread id from the X-Thread-Id response header)."""
    raw = client.chat.completions.with_raw_response.create(
        model="agent",
        messages=[{"role": "user", "content": text}],
        temperature=0,
        max_tokens=max_tokens,
        user=user or openai.NOT_GIVEN,
        extra_headers={"X-Thread-Id": thread} if thread else None,
    )
    return raw.parse(), raw.headers["x-thread-id"]


def get_thread(server: Server, tid: str) -> dict:
    r = httpx.get(f"{server.base_url}/v1/threads/{tid}", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_agent_models_are_listed(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert {"agent", "agent:smollm2-135m-instruct", "all-minilm-l6-v2"} <= set(ids)


def test_thread_continues_across_requests(server: Server, client: openai.OpenAI) -> None:
    user = f"trip-{uuid.uuid4().hex[:6]}"
    first, tid = ask(client, "Hello! I am planning a trip to Rome next week.", user=user)
    assert tid.startswith("thread_") and first.choices[0].message.content
    second, tid2 = ask(client, "Which city am I going to?", thread=tid, user=user)
    assert tid2 == tid
    # the second request sent only the new message; the server supplied the first turn
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10
    doc = get_thread(server, tid)
    # the turns in order; a tool the model chose to call (its call and result) sits between them, visible
    turns = [m for m in doc["messages"] if m["role"] in ("user", "assistant") and not m.get("tool_calls")]
    assert [m["role"] for m in turns] == ["user", "assistant", "user", "assistant"]
    assert all(m["role"] == "tool" or m.get("tool_calls") for m in doc["messages"] if m not in turns)
    assert turns[0]["content"].startswith("Hello! I am planning a trip to Rome")
    assert turns[1]["content"] == first.choices[0].message.content
    assert turns[3]["content"] == second.choices[0].message.content
    listed = httpx.get(f"{server.base_url}/v1/threads", params={"user": user}).json()
    assert [t["id"] for t in listed["data"]] == [tid] and listed["data"][0]["model"] == "agent"


def test_streaming_and_visible_tool_calls(server: Server, client: openai.OpenAI) -> None:
    with client.chat.completions.with_streaming_response.create(
        model="agent:smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is 12 * 7?"}],
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    ) as raw:
        tid = raw.headers["x-thread-id"]
        chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    msgs = get_thread(server, tid)["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
    call = msgs[1]["tool_calls"][0]  # the model's own call (no rule picked it), run by the calculator
    assert call["type"] == "function" and call["function"]["name"] == "calculator" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"expression": "12 * 7"}
    assert msgs[2] == {"role": "tool", "content": "12 * 7 = 84", "name": "calculator", "tool_call_id": call["id"]}
    assert msgs[3]["content"] == text and "84" in text  # the answer uses the result


def test_leaving_an_agent_stream_stops_the_model(server: Server) -> None:
    """A client that disconnects after the first chunk frees the model's slot at once; the abandoned answer
    does not run on to max_tokens (the completion-token count stays far below it)."""

    def completion_tokens() -> float:
        text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
        line = 'appliance_tokens_total{backend="llamacpp",kind="completion",model="smollm2-135m-instruct"}'
        return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line))

    before = completion_tokens()
    body = {
        "model": "agent",
        "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}],
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=600) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # the first chunk of the answer: leave
    left = time.monotonic()
    while server.backend("smollm2-135m-instruct")["in_flight"] and time.monotonic() - left < 30:
        time.sleep(0.05)
    assert server.backend("smollm2-135m-instruct")["in_flight"] == 0
    freed = time.monotonic() - left
    time.sleep(1.0)
    spent = completion_tokens() - before
    assert spent < 100, f"{spent} completion tokens after leaving (max_tokens 400)"
    assert freed < 10, f"the slot was freed {freed:.1f}s after the client left"


def test_memory_is_per_user_end_to_end(server: Server, client: openai.OpenAI) -> None:
    alice, bob = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}"
    ask(client, "Please remember that my name is Alice.", user=alice)
    mems = httpx.get(f"{server.base_url}/v1/memories", params={"user": alice}).json()["data"]
    assert any("Alice" in m["text"] for m in mems), mems  # the model's save_memory fact (or the turn's summary)

    _, tid = ask(client, "What is my name?", user=bob)
    msgs = get_thread(server, tid)["messages"]
    assert all("Alice" not in (m["content"] or "") for m in msgs)
    bob_mems = httpx.get(f"{server.base_url}/v1/memories", params={"user": bob}).json()["data"]
    assert all("Alice" not in m["text"] for m in bob_mems)
    hits = httpx.get(f"{server.base_url}/v1/memories/search", params={"user": bob, "q": "Alice"}).json()["data"]
    assert all(h["user"] == bob for h in hits)


def test_the_owner_gets_a_memory_back_in_a_new_thread(server: Server, client: openai.OpenAI) -> None:
    alice = f"alice-{uuid.uuid4().hex[:6]}"
    ask(client, "Please remember that my name is Alice.", user=alice)
    answer, _ = ask(client, "What is my name?", user=alice)  # recalled into the prompt, or by the memory tool
    assert "Alice" in answer.choices[0].message.content


def test_concurrent_requests_on_one_thread(server: Server, client: openai.OpenAI) -> None:
    tid = f"busy-{uuid.uuid4().hex[:8]}"
    body = {
        "model": "agent",
        "messages": [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}],
        "max_tokens": 300,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{server.base_url}/v1/chat/completions", json=body, headers={"X-Thread-Id": tid}, timeout=60
    ) as first:
        assert first.status_code == 200 and first.headers["x-thread-id"] == tid
        lines = first.iter_lines()
        for line in lines:  # wait until the answer is really streaming
            if '"content":"' in line and '"content":""' not in line:
                break
        with pytest.raises(openai.ConflictError) as e:
            ask(client, "And what happened next?", thread=tid)
        assert e.value.status_code == 409 and e.value.code == "thread_busy"
    # the first client went away: the thread frees up, and its history has one user turn, not two
    deadline = time.monotonic() + 30
    while True:
        try:
            ask(client, "Thanks!", thread=tid, max_tokens=8)
            break
        except openai.ConflictError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    users = [m["content"] for m in get_thread(server, tid)["messages"] if m["role"] == "user"]
    assert users == [body["messages"][0]["content"], "Thanks!"]


def test_thread_errors(server: Server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "hi", thread="not a valid id!")
    assert e.value.param == "X-Thread-Id" and e.value.code == "invalid_thread_id"
    r = httpx.get(f"{server.base_url}/v1/threads/no-such-thread")
    assert r.status_code == 404 and r.json()["error"]["code"] == "thread_not_found"
    assert httpx.delete(f"{server.base_url}/v1/threads/no-such-thread").status_code == 404
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="agent", prompt="hi", max_tokens=4)
    assert e.value.param == "model"


def test_delete_thread(server: Server, client: openai.OpenAI) -> None:
    _, tid = ask(client, "Hello there.", max_tokens=8)
    r = httpx.delete(f"{server.base_url}/v1/threads/{tid}")
    assert r.status_code == 200 and r.json() == {"id": tid, "object": "thread.deleted", "deleted": True}
    assert httpx.get(f"{server.base_url}/v1/threads/{tid}").status_code == 404


# -- durability: SIGKILL in the middle of a run, then restart on the same data dir --------------------


def embedding_state(server: Server) -> str:
    doc = server.health(verbose=True)
    return next(m for m in doc["models"] if m["id"] == "all-minilm-l6-v2")["backends"][0]["state"]


def _kill_worker(pid: int | None) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_sigkill_mid_run_then_restart(server: Server) -> None:
    s1 = server
    worker = None
    try:
        worker = s1.worker_pid()
        c1 = openai.OpenAI(base_url=f"{s1.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        tid, user = "durable-1", "dur"
        ask(c1, "Please remember that my name is Zoltan.", thread=tid, user=user)
        ask(c1, "What is 2 + 3?", thread=tid, user=user)
        completed = get_thread(s1, tid)["messages"]
        assert [m["role"] for m in completed].count("user") == 2
        # a memory for certain (whether the 135M model saved the name itself varies): it must survive the kill
        r = httpx.post(f"{s1.base_url}/v1/memories", json={"text": "The user's name is Zoltan.", "user": user})
        assert r.status_code == 201, r.text

        body = {
            "model": "agent",
            "user": user,
            "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}],
            "max_tokens": 400,
            "stream": True,
        }
        got_tokens = threading.Event()

        def stream() -> None:
            with (
                contextlib.suppress(httpx.HTTPError),
                httpx.stream(
                    "POST", f"{s1.base_url}/v1/chat/completions", json=body, headers={"X-Thread-Id": tid}, timeout=60
                ) as r,
            ):
                for line in r.iter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        got_tokens.set()

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        assert got_tokens.wait(60), "the third turn never started streaming"
        s1.proc.send_signal(signal.SIGKILL)
        s1.proc.wait(10)
        t.join(10)
    finally:
        s1.stop(signal.SIGKILL)
        time.sleep(0.5)
        _kill_worker(worker)  # an orphaned worker must not linger into the next tests

    db = s1.data_dir / "agent" / "threads.sqlite"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    s2 = start_server(s1.data_dir.parent, "--context-size", "4096", env={"APPLIANCE_EMBEDDINGS_WAIT": "0"})
    try:
        # right after start the embedding model is still loading: with no wait allowed, that is a clear 503
        if embedding_state(s2) != "ready":
            r = httpx.post(f"{s2.base_url}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "x"})
            a = httpx.post(
                f"{s2.base_url}/v1/chat/completions",
                json={"model": "agent", "messages": [{"role": "user", "content": "Hi"}], "user": user},
                headers={"X-Thread-Id": tid},
                timeout=60,
            )
            if embedding_state(s2) != "ready":
                assert r.status_code == 503 and r.json()["error"]["code"] == "embeddings_loading", r.text
                assert "retry-after" in r.headers
                assert a.status_code == 503 and a.json()["error"]["code"] == "embeddings_loading", a.text
        msgs = get_thread(s2, tid)["messages"]
        # every completed turn is there, exactly as it was
        assert msgs[: len(completed)] == completed
        mems = httpx.get(f"{s2.base_url}/v1/memories", params={"user": user}).json()["data"]
        assert any("Zoltan" in m["text"] for m in mems), mems
        # and the thread goes on after the restart, with its history in the model's context
        wait_for_embeddings(s2)
        c2 = openai.OpenAI(base_url=f"{s2.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        t4, _ = ask(c2, "Thank you.", thread=tid, user=user, max_tokens=8)
        fresh, _ = ask(c2, "Thank you.", user=user, max_tokens=8)  # the same words in a new thread
        # (usage sums every model step of a turn, so turns with different tool steps do not compare)
        assert t4.usage.prompt_tokens > fresh.usage.prompt_tokens + 100, (t4.usage, fresh.usage)
        after = get_thread(s2, tid)["messages"]
        assert [m for m in after if m["role"] == "user"][-1]["content"] == "Thank you."
        assert after[-1]["role"] == "assistant" and after[: len(completed)] == completed
    finally:
        s2.stop()
