"""The agent as a service: its threads, memory and graph, and its place in the model registry.

Built by the composition root (app.py), which registers its models (`register_models`) and calls
`start()`/`close()` from the app's lifespan: the memory store opens on its own thread and the thread
store (SQLite + AsyncSqliteSaver) and graph are opened by a task, so nothing here blocks start-up.

Heavy imports (langgraph, langchain, chromadb, torch) happen off the event loop, after start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from appliance.agent.threads import THREAD_ID, stored_id
from appliance.agent.threads_pg import make_thread_store
from appliance.backends.base import BackendState, BackendStatus, NothingToLoad
from appliance.config import Settings
from appliance.engine.registry import ModelEntry
from appliance.engine.types import Admitted, EngineError, Error, Event, GenerateRequest, Token
from appliance.heap import refreeze_heap
from appliance.memory.embeddings import EMBEDDING_MODEL_ID, EmbeddingBackend, EmbeddingService
from appliance.memory.store import MemoryStore

if TYPE_CHECKING:
    from appliance.engine.router import Engine

log = logging.getLogger("appliance.agent")

AGENT_ID = "agent"
OPEN_TIMEOUT = 60.0  # seconds a request waits for the thread store and graph to open


def _import_heavy() -> None:
    import langgraph.checkpoint.sqlite.aio  # noqa: F401

    import appliance.agent.runner  # noqa: F401  (langgraph, langchain)


class AgentService:
    """Everything the agent needs, one per process."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        embeddings: Any | None = None,
        model_factory: Callable[..., Any] | None = None,
    ):
        self.settings = settings
        self.engine = engine
        self.embeddings = embeddings or EmbeddingService(
            wait=settings.embeddings_wait, threads=settings.embeddings_threads
        )
        self.memory = MemoryStore(
            settings.data_dir / "memory",
            self.embeddings,
            max_per_scope=settings.max_memories_per_key,
            url=settings.memory_url,  # a Chroma server shared by several boxes; None: embedded
        )
        self.threads = make_thread_store(settings)  # SQLite, or Postgres shared by several boxes
        self.model_factory = model_factory  # tests: a scripted chat model instead of the engine's
        self.callbacks: list[Any] = []  # LangChain callbacks of every run (app.py: tracing's agent.node spans)
        self.graph: Any = None
        self.busy: set[str] = set()
        self._opening: asyncio.Task | None = None
        self._closing = False
        self.error: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start everything in the background; returns at once (the first agent request calls it, unless
        APPLIANCE_EMBEDDINGS_PRELOAD starts it once the chat model is ready)."""
        if self._opening is not None:
            return
        self.embeddings.scheduled = self.settings.embeddings_preload
        self.memory.start()
        self._opening = asyncio.create_task(self._open(), name="agent-open")

    async def _open(self) -> None:
        try:
            try:
                await asyncio.to_thread(_import_heavy)
            finally:
                # torch's import holds the GIL for long stretches: begin it once the agent's imports are done
                if self.settings.embeddings_preload and not self._closing:
                    self.embeddings.start()
            from appliance.agent.graph import AgentOptions, build_graph

            await self.threads.open()
            s = self.settings
            opts = AgentOptions(
                memory_k=s.agent_memory_k,
                memory_min_score=s.agent_memory_min_score,
                history_tokens=s.agent_history_tokens,
                tool_choice=s.agent_tool_choice,
                tool_rounds=s.agent_tool_rounds,
            )
            graph = build_graph(self.memory, self.threads.saver, opts)
            self.graph = graph.with_config(callbacks=self.callbacks) if self.callbacks else graph
            refreeze_heap()  # langgraph, langchain and Chroma's client: out of every later full collection
            log.info("agent ready (threads in %s)", self.threads.where)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.exception("the agent could not start")
            raise

    async def ready(self) -> None:
        """Wait for the thread store and graph; 503 if they cannot open."""
        if self.graph is not None:
            return
        if self._opening is None:
            await self.start()
        assert self._opening is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._opening), OPEN_TIMEOUT)
        except TimeoutError:
            raise EngineError(Error(503, "The agent is still starting; retry shortly.", code="agent_loading")) from None
        except Exception:
            raise EngineError(
                Error(503, f"The agent could not start: {self.error}", code="agent_unavailable")
            ) from None

    async def close(self) -> None:
        self._closing = True
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
            with contextlib.suppress(BaseException):
                await self._opening
        await self.threads.close()
        await asyncio.to_thread(self.memory.close)

    # -- runs ------------------------------------------------------------------------------------

    def chat_model(self, model_id: str, req: GenerateRequest) -> Any:
        if self.model_factory is not None:
            return self.model_factory(model_id, req)
        from appliance.agent.chat_model import EngineChatModel

        return EngineChatModel(
            engine=self.engine,
            model=model_id,
            params=req.params,
            user=req.user,
            principal=req.principal,
            request_id=req.request_id,
        )

    async def generate(self, req: GenerateRequest, entry_id: str, model_id: str) -> AsyncIterator[Event]:
        if req.kind != "chat":
            raise EngineError.of(
                400,
                f"'{req.model}' is the agent; it serves POST /v1/chat/completions only.",
                code="model_not_supported",
                param="model",
            )
        if req.tools:
            raise EngineError.of(
                400,
                f"'{req.model}' is the agent: it calls its own tools (calculator, date and time, memory) and takes "
                "none from the client. Send `tools` to a chat model instead.",
                code="unsupported_parameter",
                param="tools",
            )
        if req.thread_id is None:
            req.thread_id = "thread_" + uuid.uuid4().hex  # echoed as X-Thread-Id by the adapter
        tid = req.thread_id
        if not THREAD_ID.match(tid):
            raise EngineError.of(
                400,
                "Invalid X-Thread-Id: use 1 to 128 characters from A-Z a-z 0-9 . _ -",
                code="invalid_thread_id",
                param="X-Thread-Id",
            )
        if not any(m.role in ("user", "tool") for m in req.messages or []):
            raise EngineError.of(400, "The agent needs at least one user message.", param="messages")
        self.embeddings.start()  # the turn needs it for memory: load it while the graph opens
        await self.ready()
        # Thread ids are per owner (agent/threads.py): another key's `t1` is not this key's `t1`, so there
        # is no "belongs to someone else" answer to learn from. `key` is the stored id; `tid` the client's.
        key = stored_id(req.scope, tid)
        meta = await self.threads.get(key)
        if meta is None:  # a new thread over the key's quota: a plain 429 before the stream starts
            from appliance.agent.runner import check_thread_quota

            await check_thread_quota(self, req.scope)
        if key in self.busy:
            raise EngineError.of(
                409,
                f"Thread '{tid}' is busy with another request; retry when it has finished.",
                code="thread_busy",
                param="X-Thread-Id",
            )
        self.busy.add(key)  # no await since the check: nothing can slip in between
        try:
            if not await self.threads.claim(key):  # several boxes: another node runs a turn of it
                raise EngineError.of(
                    409,
                    f"Thread '{tid}' is busy with another request (on another node); retry when it has finished.",
                    code="thread_busy",
                    param="X-Thread-Id",
                )
            try:
                yield Token("")  # admitted: the run's own errors (timeouts, memory) now come as events
                try:  # on first use the embedding model loads now: bounded by its own wait, not the run's timeout
                    await self.embeddings.wait_ready()
                except EngineError as e:
                    yield e.error
                    return
                from appliance.agent.runner import run_agent

                async for ev in run_agent(self, req, key, meta is None, entry_id, model_id):
                    yield ev
            finally:
                await self.threads.release(key)
        finally:
            self.busy.discard(key)


class AgentBackend(NothingToLoad):
    """The agent as a backend of a registry entry (kind "agent")."""

    name = "agent"

    def __init__(self, service: AgentService, entry_id: str, model_id: str):
        self.service, self.entry_id, self.model_id = service, entry_id, model_id

    @property
    def ready(self) -> bool:
        return self.service.graph is not None

    def status(self) -> BackendStatus:
        svc = self.service
        idle = svc._opening is None  # opens on its first request
        if svc.graph is not None:
            state = BackendState.READY
        elif svc.error:
            state = BackendState.FAILED
        else:
            state = BackendState.IDLE if idle else BackendState.LOADING
        return BackendStatus(
            kind="agent",
            state=state,
            loaded=False,
            serviceable=state in (BackendState.READY, BackendState.IDLE),
            in_flight=len(svc.busy),
            error=svc.error,
            upstream_model=self.model_id,
            details={
                "memory": "ready" if svc.memory.ready else (svc.memory.error or ("idle" if idle else "loading")),
                "embeddings": svc.embeddings.state,
            },
        )

    # The first agent request opens the agent (LangGraph, the thread store: seconds on a busy box) before its
    # first event: that wait is bounded by OPEN_TIMEOUT (503 agent_loading), not the router's first-token
    # timeout, so it is reported as a queue wait (Admitted once the service is ready), as llama.cpp's is.
    queues = True

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event | Admitted]:
        it = self.service.generate(req, self.entry_id, self.model_id)
        admitted = False
        try:
            async for ev in it:
                if not admitted:  # the service is open and the thread is this request's
                    admitted = True
                    yield Admitted()
                yield ev
        finally:
            await it.aclose()


def register_models(service: AgentService, registry: Any, agent: bool = True) -> None:
    """`agent`, `agent:<id>` per chat model, and the embedding model."""
    if agent:
        chat = [e for e in registry if e.kind == "chat"]
        default = registry.default.id
        registry.add(ModelEntry(AGENT_ID, [], None, [AgentBackend(service, AGENT_ID, default)], kind="agent"))
        for e in chat:
            eid = f"{AGENT_ID}:{e.id}"
            registry.add(ModelEntry(eid, [], None, [AgentBackend(service, eid, e.id)], kind="agent"))
    emb = EmbeddingBackend(service.embeddings)
    registry.add(ModelEntry(EMBEDDING_MODEL_ID, [], None, [emb], kind="embedding"))
