"""A front end's handle on the engine core in another process (the EngineHandle the web layer
uses, as the in-process Engine is one).

`EngineClient` owns this front end's table of live requests: each has its event queue (read by
its request task), its detokenizer and stop strings. Submits and cancels leave batched, one
frame per turn of the event loop; the core's one `Step` message per step is detokenized here and
wakes each request task at most once. If the core connection drops, every live request ends with
`unavailable`, new ones are refused the same way, and the client dials again.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from collections.abc import Sequence as SeqType
from dataclasses import dataclass
from functools import partial

import msgspec
import structlog
import trio

from streamer import ipc
from streamer.detok import Detokenizer, add_batch, passes
from streamer.prompt import check_prompt, encode_chat, encode_prompt
from streamer.request import EventQueue, Generation
from streamer.types import (
    FinishEvent,
    Logprobs,
    RequestError,
    SamplingParams,
    Timing,
    TokenEvent,
    check_priority,
)

log = structlog.get_logger("streamer.client")
REPORT_PERIOD_S = 0.25  # how often sent-frame gaps, edge errors and loop lag go to the core
LOOP_LAG_PERIOD_S = 0.01
REAP_PERIOD_S = 0.05  # how often requests whose reader left are looked for
RECONNECT_S = 0.2
UNAVAILABLE = "the engine core is not available"


@dataclass(eq=False, slots=True)
class Live:
    rid: int
    events: EventQueue
    detok: Detokenizer
    prompt_tokens: int
    t_arrival: float
    completion: int = 0
    t_first: float | None = None
    stopping: bool = False  # a stop string matched: the core is asked to cancel, its tokens are dropped
    prompt: list[int] | None = None  # with the output ids, kept only for an `on_finish` hook
    output: list[int] | None = None


class EngineClient:
    def __init__(self, path: str, tokenizer, frontend: int = 0, max_buffered_events: int = 1024) -> None:
        self.path = path
        self.tokenizer = tokenizer
        self.frontend = frontend
        self.max_buffered_events = max_buffered_events
        self.welcome: ipc.Welcome | None = None
        self._stream: trio.SocketStream | None = None
        self._live: dict[int, Live] = {}
        self._rids = itertools.count(1)
        self._out: list = []  # messages for the core's next frame
        self._wake = trio.Event()
        self._gaps: list[float] = []
        self._errors: list[str] = []
        self._lags: list[float] = []
        self._queries: dict[int, list] = {}  # nonce -> [event, reply body]
        self._nonces = itertools.count(1)
        self._accepting = True
        self._drained = trio.Event()
        # Called with (prompt ids, output ids) when a request finishes in the core (the router
        # learns what that core's prefix cache holds); None keeps no ids.
        self.on_finish: Callable[[list[int], list[int]], None] | None = None

    # --- the EngineHandle the doors use ------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.welcome.model if self.welcome else "?"

    @property
    def max_context(self) -> int:
        return self.welcome.max_context if self.welcome else 0

    @property
    def connected(self) -> bool:
        return self._stream is not None

    @property
    def live_requests(self) -> int:
        return len(self._live)

    def encode_prompt(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def submit(self, prompt_ids: SeqType[int], params: SamplingParams, request_id: str | None = None,
               priority: int = 0, client: str = "") -> Generation:
        if not self._accepting:
            raise RequestError("shutting_down", "the server is shutting down")
        w = self.welcome
        if w is None or self._stream is None:
            raise RequestError("unavailable", UNAVAILABLE)
        ids = list(prompt_ids)
        check_priority(priority)
        check_prompt(ids, w.vocab_size, w.capacity, w.limits)
        rid = next(self._rids)
        max_tokens = min(params.max_tokens, w.capacity - len(ids))
        events = EventQueue(min(max_tokens + 1, self.max_buffered_events))
        live = self._live[rid] = Live(rid, events, Detokenizer(self.tokenizer, ids, params.stop), len(ids),
                                      time.monotonic())
        if self.on_finish is not None:
            live.prompt, live.output = ids, []
        self._send(ipc.Submit(rid, ids, max_tokens, params.temperature, params.top_k, params.top_p, params.seed,
                              params.ignore_eos, priority, client, request_id or f"fe{self.frontend}/{rid}",
                              params.logprobs, params.grammar))
        return Generation(str(rid), len(ids), events, partial(self._cancel, rid))

    def delivered(self, gaps: list[float]) -> None:
        self._gaps += gaps

    def count_error(self, code: str) -> None:
        self._errors.append(code)

    async def stats(self, hdr: bool = False) -> dict:
        snap = msgspec.msgpack.decode(await self._query(hdr=hdr, metrics=False))
        snap["answered_by"] = {"frontend": self.frontend, "pid": os.getpid(), "live": len(self._live)}
        return snap

    async def metrics_text(self) -> bytes:
        return await self._query(hdr=False, metrics=True)

    async def health(self) -> dict:
        w = self.welcome
        if w is None or self._stream is None:
            raise RequestError("unavailable", UNAVAILABLE)
        snap = await self.stats()
        return {"model": w.model, "max_context": w.max_context, "kv": {k: snap["kv"][k] for k in
                                                                         ("total_blocks", "free_blocks", "used_blocks")}}

    def stop_accepting(self) -> None:
        self._accepting = False
        self._check_drained()

    async def wait_drained(self) -> None:
        assert not self._accepting, "call stop_accepting() first"
        await self._drained.wait()

    def abort_all(self, error: RequestError) -> None:
        for rid in list(self._live):
            self._end_here(rid, error)

    # --- the connection ------------------------------------------------------------------------
    async def run(self, *, persistent: bool = False, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection to the core (dialling again if it drops); started once connected. The
        first dial's failure raises, unless `persistent` (then it dials until the core is there)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_loop)
            nursery.start_soon(self._report_and_reap)
            started = False
            while True:
                try:
                    stream = await trio.open_unix_socket(self.path)
                except OSError:
                    if not started and not persistent:
                        raise
                    await trio.sleep(RECONNECT_S)
                    continue
                try:
                    started = await self._serve(stream, None if started else task_status) or started
                finally:
                    self._lost()
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(stream)
                await trio.sleep(RECONNECT_S)

    async def _serve(self, stream: trio.SocketStream, task_status) -> bool:
        """Serve one connection until it drops; True if the core welcomed this front end."""
        reader = ipc.FrameReader(stream, ipc.to_frontend)
        try:
            await stream.send_all(ipc.encode([ipc.Hello(self.frontend, os.getpid())]))
            first = await reader.receive()
            if not first or not isinstance(first[0], ipc.Welcome):
                raise ipc.MalformedFrame("the core did not say welcome")
            self.welcome, self._stream = first[0], stream
            log.info("core_connected", frontend=self.frontend, core_pid=self.welcome.pid)
            if task_status is not None:
                task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, stream)
                while (messages := await reader.receive()) is not None:
                    for msg in messages:
                        if isinstance(msg, ipc.Step):
                            self._on_step(msg)
                        elif isinstance(msg, ipc.StatsReply):
                            self._on_reply(msg)
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ipc.MalformedFrame, OSError) as exc:
            log.error("core_connection_lost", frontend=self.frontend, error=repr(exc))
        else:
            if self._accepting or self._live:
                log.error("core_connection_lost", frontend=self.frontend, error="closed by the core")
            else:  # both are stopping (a Ctrl-C reaches every process): the core left after the last request
                log.info("core_closed", frontend=self.frontend)
        return self._stream is stream

    async def _write(self, stream: trio.SocketStream) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            out, self._out = self._out, []
            if out:
                await stream.send_all(ipc.encode(out))

    def _send(self, msg) -> None:
        self._out.append(msg)
        if not self._wake.is_set():
            self._wake.set()

    def _lost(self) -> None:
        """The core connection is gone: every live request ends `unavailable`, and queries too."""
        self._stream = None
        self._out.clear()
        error = RequestError("unavailable", UNAVAILABLE)
        for rid in list(self._live):
            self._end_here(rid, error, tell_core=False)
        for box in self._queries.values():
            box[0].set()
        self._queries.clear()

    async def _query(self, hdr: bool, metrics: bool) -> bytes:
        if self._stream is None:
            raise RequestError("unavailable", UNAVAILABLE)
        nonce = next(self._nonces)
        box = self._queries[nonce] = [trio.Event(), None]
        self._send(ipc.StatsQuery(nonce, hdr, metrics))
        try:
            await box[0].wait()
        finally:
            self._queries.pop(nonce, None)
        if box[1] is None:
            raise RequestError("unavailable", UNAVAILABLE)
        return box[1]

    def _on_reply(self, msg: ipc.StatsReply) -> None:
        box = self._queries.get(msg.nonce)
        if box is not None:
            box[1] = msg.body
            box[0].set()

    # --- one step's events ----------------------------------------------------------------------
    def _on_step(self, step: ipc.Step) -> None:
        ending = {f.rid for f in step.finished} if step.finished else ()
        live = self._live
        lps = {lp.at: Logprobs(lp.logprob, tuple(zip(lp.top_ids, lp.top_logprobs, strict=True)))
               for lp in step.logprobs} if step.logprobs else None
        batch = []
        for at, (rid, token) in enumerate(zip(step.rids, step.tokens, strict=True)):
            req = live.get(rid)
            if req is not None and not req.stopping:
                batch.append((req, token, lps.get(at) if lps else None))
        now = time.monotonic()
        # A front end that fell behind gets several steps of a request in one frame: they are
        # taken a step at a time (pass k: each request's k-th token), as if they had come apart.
        rounds = passes([req.rid for req, _, _ in batch])
        last = {req.rid: i for i, (req, _, _) in enumerate(batch)} if len(rounds) > 1 else {}
        for indices in rounds:
            texts = add_batch([(batch[i][0].detok, batch[i][1]) for i in indices])
            for i, text in zip(indices, texts, strict=True):
                req, token, lp = batch[i]
                if req.stopping or req.rid not in live:
                    continue  # a stop string (or its end here) came at an earlier token of this frame
                if req.detok.stopped:
                    req.stopping = True
                    self._send(ipc.Cancel(req.rid))
                if req.stopping or (req.rid in ending and last.get(req.rid, i) == i):
                    text += req.detok.finish()
                if req.t_first is None:
                    req.t_first = now
                events = req.events
                if len(events) >= events.capacity - 1:  # the client stopped reading: keep the last slot for the end
                    self._end_here(req.rid, RequestError("slow_consumer", "the client stopped reading its tokens"))
                    continue
                if not events.put(TokenEvent(req.completion, token, text, lp)):  # the reader left
                    self._end_here(req.rid, None)
                    continue
                req.completion += 1
                if req.output is not None:
                    req.output.append(token)
        for f in step.finished:
            req = live.pop(f.rid, None)
            if req is None:
                continue  # ended here first (a reader that left, a slow consumer, an abort)
            error = RequestError(f.error_code, f.error_message or "") if f.error_code else None
            reason, completion = ("stop", req.completion) if req.stopping else (f.reason, f.completion_tokens)
            req.events.put(FinishEvent(reason, f.prompt_tokens, completion,
                                       Timing(f.queue_ms, f.ttft_ms, f.total_ms, f.tpot_ms), error))
            req.events.close()
            if req.output is not None and self.on_finish is not None:
                self.on_finish(req.prompt, req.output)
        if step.finished:
            self._check_drained()

    def _cancel(self, rid: int) -> None:
        """The client asked to stop: the core ends the request, and its finish comes back."""
        if rid in self._live:
            self._send(ipc.Cancel(rid))

    def _end_here(self, rid: int, error: RequestError | None, tell_core: bool = True) -> None:
        """End a request in this front end without waiting for the core (which is told to cancel)."""
        req = self._live.pop(rid, None)
        if req is None:
            return
        if tell_core:
            self._send(ipc.Cancel(rid))
        now = time.monotonic()
        ms = lambda t: None if t is None else round((t - req.t_arrival) * 1000, 3)  # noqa: E731
        req.events.put(FinishEvent("error" if error else "cancelled", req.prompt_tokens, req.completion,
                                   Timing(None, ms(req.t_first), ms(now), None), error))
        req.events.close()
        self._check_drained()

    def _check_drained(self) -> None:
        if not self._accepting and not self._live:
            self._drained.set()

    # --- housekeeping ---------------------------------------------------------------------------
    async def _watch_loop(self) -> None:
        """This front end's event-loop lag, sampled as the engine samples the core's."""
        while True:
            t = time.monotonic()
            await trio.sleep(LOOP_LAG_PERIOD_S)
            self._lags.append(max(0.0, time.monotonic() - t - LOOP_LAG_PERIOD_S))

    async def _report_and_reap(self) -> None:
        last_report = time.monotonic()
        while True:
            await trio.sleep(REAP_PERIOD_S)
            for rid, req in list(self._live.items()):
                if req.events.reader_gone:
                    self._end_here(rid, None)
            now = time.monotonic()
            if now - last_report >= REPORT_PERIOD_S and self._stream is not None:
                last_report = now
                self._send(ipc.Report(self._gaps, self._errors, self._lags, len(self._live)))
                self._gaps, self._errors, self._lags = [], [], []
