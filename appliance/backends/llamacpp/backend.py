"""A GGUF model served by a supervised worker process: the `Backend` the engine sees.

Composes the parts: `Admission` (bounded queue for the slots), `Supervisor` (the worker process and
its state), the pipe `protocol`, and `Residency` (memory budget and keep-alive timers, shared by all
models). What is left here: one generation's round trip, demultiplexing worker events to the streams
waiting for them, and the keep-alive clock.

Each generation gets its own id (uuid4 hex) for the pipe and for cancels. The client's X-Request-Id
(`req.request_id`) is never used to route: two clients sending the same one must each get their own
tokens, and a disconnect must cancel only its own generation.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Any

from appliance.backends.base import BackendState, BackendStatus
from appliance.backends.llamacpp.admission import Admission
from appliance.backends.llamacpp.process import WorkerProcess
from appliance.backends.llamacpp.protocol import (
    Cancel,
    Events,
    Failed,
    Finished,
    GenRequest,
    Text,
    TokenizeRequest,
    TokenizeResult,
)
from appliance.backends.llamacpp.residency import Residency
from appliance.backends.llamacpp.supervisor import Supervisor
from appliance.backends.llamacpp.tool_calls import tool_parser
from appliance.config import LlamaCppBackendSpec, Settings
from appliance.engine.types import (
    Admitted,
    EngineError,
    Error,
    Event,
    Finish,
    GenerateRequest,
    Token,
    TokenLogprob,
)

_DETAILS = (
    "architecture",
    "parameters",
    "size",
    "name",
    "file_type",
    "n_ctx_train",
    "tool_format",
    "kv_cache_type",
    "batch_invariant",
)


class LlamaCppBackend:
    name = "llamacpp"
    can_load = True
    queues = True

    def __init__(
        self,
        model_id: str,
        spec: LlamaCppBackendSpec,
        settings: Settings,
        residency: Residency | None = None,
        early: WorkerProcess | None = None,  # this model's worker, spawned before the app was built
    ):
        self.model_id = model_id
        self.spec = spec
        self.settings = settings
        self.parallel = spec.parallel or settings.parallel
        self.pinned = False  # the default model: never unloaded for idleness (eviction still may)
        self.last_used = time.monotonic()
        self.expires_at: float | None = None  # when keep-alive runs out (monotonic); None: never / not loaded
        self.residency = residency
        self.admission = Admission(model_id, self.parallel, settings.max_queue, settings.queue_timeout)
        self.supervisor = Supervisor(
            model_id,
            spec,
            settings,
            self.parallel,
            on_events=self._on_events,
            on_lost=self._on_lost,
            prepare=self._make_room if residency is not None else None,
            early=early,
        )
        self._streams: dict[str, asyncio.Queue] = {}  # generation id -> its events
        self._holds = 0  # load() calls waiting for the worker: busy, so keep-alive leaves it alone
        if residency is not None:
            residency.register(self)

    # -- state --------------------------------------------------------------------------------------
    @property
    def state(self) -> BackendState:
        return self.supervisor.state

    @property
    def ready(self) -> bool:
        return self.state is BackendState.READY

    @property
    def loaded(self) -> bool:
        return self.supervisor.loaded

    @property
    def busy(self) -> bool:
        return self.admission.busy or self._holds > 0

    def memory(self) -> int:
        return self.supervisor.memory()

    def status(self) -> BackendStatus:
        sup, loaded = self.supervisor, self.loaded
        expires_in = None
        if self.expires_at is not None and loaded:
            expires_in = max(0.0, round(self.expires_at - time.monotonic(), 1))
        return BackendStatus(
            kind=self.name,
            state=sup.state,
            loaded=loaded,
            serviceable=sup.state in (BackendState.READY, BackendState.UNLOADED),
            in_flight=self.admission.running,
            queued=self.admission.queued,
            slots=self.parallel,
            memory_bytes=sup.memory() if loaded else 0,
            expires_in=expires_in,
            restarts=sup.restarts,
            error=sup.error,
            pid=sup.pid,
            path=str(sup.path) if sup.path else self.spec.path,
            context_length=sup.info.get("n_ctx"),
            details={k: sup.info[k] for k in _DETAILS if k in sup.info},
        )

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.supervisor.state not in (BackendState.LOADING, BackendState.READY):
            self.expires_at = None  # a stale keep-alive must not unload the model we are loading now
        await self.supervisor.start()

    async def close(self) -> None:
        await self.supervisor.close()

    async def unload(self, reason: str) -> None:
        self.expires_at = None
        if self.residency is not None:
            self.residency.touched(self)  # disarms the keep-alive timer
        await self.supervisor.stop(reason)

    async def load(self, keep_alive: float | None = None) -> None:
        """Load now (Ollama's empty generate request) and start the keep-alive clock."""
        self._holds += 1
        try:
            await self.supervisor.wait_ready(self.settings.worker_start_timeout)
        finally:
            self._holds -= 1
        self._touch(keep_alive)

    async def stats(self, timeout: float = 1.0) -> dict[str, Any] | None:
        return await self.supervisor.stats(timeout)

    async def _make_room(self) -> None:
        assert self.residency is not None
        await self.residency.make_room(self, self.supervisor.estimate())

    def _touch(self, keep_alive: float | None) -> None:
        """Note a use; restart the keep-alive clock (Ollama semantics: < 0 forever, 0 unload now)."""
        now = time.monotonic()
        self.last_used = now
        ka = self.settings.keep_alive if keep_alive is None else keep_alive
        if keep_alive is None and self.pinned:
            ka = -1
        self.expires_at = None if ka < 0 else now + ka
        if self.residency is not None:
            self.residency.touched(self)

    # -- serving ------------------------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event | Admitted]:
        async with self.admission.slot():
            yield Admitted()  # the router's first-token clock starts now, not while queued
            try:
                await self.supervisor.wait_ready(self.settings.worker_start_timeout)
                async with contextlib.aclosing(self._run(req)) as events:  # closed now: the cancel goes at once
                    async for ev in events:
                        yield ev
            finally:
                self._touch(req.keep_alive)

    async def _run(self, req: GenerateRequest) -> AsyncIterator[Event]:
        gen_id = uuid.uuid4().hex  # never req.request_id: see the module docstring
        q: asyncio.Queue = asyncio.Queue()
        self._streams[gen_id] = q
        msg = GenRequest(
            id=gen_id,
            messages=list(req.messages) if req.messages is not None else None,
            prompt=req.prompt,
            params=req.params,
            default_max_tokens=self.settings.default_max_tokens,
            tools=list(req.tools),
            tool_choice=req.tool_choice,
            parallel_tool_calls=req.parallel_tool_calls,
        )
        spans = LogprobSpans() if req.params.logprobs is not None else None
        parser = tool_parser(req, self.supervisor.info.get("tool_format", "generic"), spans and spans.take)
        sent = self.supervisor.send(msg)
        pid = self.supervisor.pid
        done = False
        try:
            if not sent:
                raise EngineError.of(
                    503, "The model worker is not running.", type="server_error", code="worker_unavailable"
                )
            while True:
                ev = await q.get()
                if isinstance(ev, Text):
                    if parser is None:
                        yield Token(ev.text, list(ev.logprobs) if ev.logprobs is not None else None)
                        continue
                    if spans is not None and ev.logprobs:
                        spans.add(ev.logprobs)
                        if late := spans.late():
                            yield Token("", late)
                    for out in parser.feed(ev.text):
                        yield out
                elif isinstance(ev, Finished):
                    done = True
                    for out in parser.close() if parser is not None else []:
                        yield out
                    called = parser is not None and parser.calls > 0 and ev.reason == "stop"
                    yield Finish("tool_calls" if called else ev.reason, ev.usage)
                    return
                elif isinstance(ev, Failed):
                    done = True
                    yield ev.error
                    return
                elif isinstance(ev, Error):  # the worker went away (crash, unload, shutdown)
                    done = True
                    yield ev
                    return
        finally:
            self._streams.pop(gen_id, None)
            if sent and not done and self.supervisor.pid == pid:
                self.supervisor.send(Cancel(gen_id))

    # -- tokenizer (/tokenize, /detokenize) ----------------------------------------------------------
    async def _tokenizer(self, msg: TokenizeRequest) -> TokenizeResult:
        await self.supervisor.wait_ready(self.settings.worker_start_timeout)  # loads the model if need be
        res = await self.supervisor.tokenize(msg)
        if res.error is not None:
            raise EngineError.of(400, res.error, code="invalid_value", param="tokens")
        return res

    async def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        res = await self._tokenizer(TokenizeRequest(uuid.uuid4().hex, text=text, add_special=add_special))
        return list(res.tokens or [])

    async def detokenize(self, tokens: list[int]) -> str:
        return (await self._tokenizer(TokenizeRequest(uuid.uuid4().hex, tokens=list(tokens)))).text or ""

    # -- supervisor callbacks (event loop thread) ---------------------------------------------------
    def _on_events(self, msg: Events) -> None:
        for ev in msg.events:
            # Started and FirstToken are not forwarded: usage comes with Finished, TTFT from the engine's clock.
            if isinstance(ev, Text | Finished | Failed):
                q = self._streams.get(ev.id)
                if q is not None:
                    q.put_nowait(ev)

    def _on_lost(self, error: Error) -> None:
        for q in self._streams.values():
            q.put_nowait(error)


_HEX = re.compile(r"\\x([0-9a-f]{2})")


class LogprobSpans:
    """Where each token's text lies in the generated text, so that the text a tool-call parser lets through
    gets the logprobs of the tokens it came from (a call's own text gets none, as on OpenAI).

    A token's characters are what the worker's incremental UTF-8 decoder (scheduler.py) made of its bytes,
    replayed here: none for the first bytes of a split character, the whole character for the token that
    completes it. `take(start, end)` gives the entries of the tokens whose text overlaps [start, end) (a
    token with no characters counts as the one it starts) and drops earlier ones nobody took (a call's)."""

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.chars = 0
        self.pending: deque[tuple[TokenLogprob, int, int]] = deque()
        self.span = (0, 0)  # the last text handed out

    def add(self, entries: Iterable[TokenLogprob]) -> None:
        for e in entries:
            t = e.token
            raw = bytes(int(h, 16) for h in _HEX.findall(t)) if t.startswith("bytes:") else t.encode()
            n = len(self.decoder.decode(raw))
            self.pending.append((e, self.chars, self.chars + n))
            self.chars += n

    def late(self) -> list[TokenLogprob]:
        """Entries that came after the text they overlap went out: the worker sends a token's entry once all
        of its text has gone, so a tail it held back (a possible stop string) delays it."""
        return self.take(*self.span)

    def take(self, start: int, end: int) -> list[TokenLogprob]:
        self.span = (start, end)
        out = []
        while self.pending and self.pending[0][1] < end:
            e, a, b = self.pending.popleft()
            if max(b, a + 1) > start:
                out.append(e)
        return out
