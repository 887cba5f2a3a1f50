"""The engine: request tasks meet the one step loop through channels.

`open_engine(config)` loads the model, sizes the KV arena and starts the step loop in a nursery
it owns. The step loop is the only code that touches the scheduler, the allocator and request
state; each request's task holds just the two ends of its channels. The model step runs in a
worker thread so websockets keep flowing while the device computes.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence as SeqType
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog
import trio

from gpu.models import LoadedModel
from gpu.runner import ModelRunner, SeqInput
from gpu.sampler import SampleSpec
from streamer.allocator import AllocatorStats, BlockAllocator
from streamer.build import load_runner
from streamer.config import EngineConfig
from streamer.detok import Detokenizer
from streamer.metrics import Metrics, StepRecord
from streamer.policy import Policy
from streamer.request import AbortAll, Cancel, Generation, Request, Submit
from streamer.scheduler import Scheduler, Sequence, StepPlan
from streamer.types import FinishEvent, RequestError, SamplingParams, Timing, TokenEvent, check_priority

log = structlog.get_logger("streamer")


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    steps: int
    preemptions: int
    prefix_hit_tokens: int
    kv: AllocatorStats
    recomputed_tokens: int = 0


class Engine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, runner: ModelRunner, num_blocks: int) -> None:
        self.config = config
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.max_context = loaded.model.spec.max_position
        # The longest sequence (prompt + completion) one request may reach: the context, or the
        # whole KV arena if that is smaller.
        self.capacity = min(self.max_context, num_blocks * config.block_size)
        self.runner = runner
        self.block_size = config.block_size
        self.allocator = BlockAllocator(num_blocks)
        self.scheduler = Scheduler(self.allocator, config.block_size, config.max_batch_tokens, config.max_running,
                                   config.static_batch, config.prefix_caching,
                                   Policy.parse(config.policy, config.prefill_share, config.aging_s))
        self._inbox_send, self._inbox = trio.open_memory_channel(config.max_waiting)
        # Cancels never wait behind a full inbox. Unbounded in type only: each live request
        # cancels at most once, so it holds at most as many messages as there are requests.
        self._control_send, self._control = trio.open_memory_channel(math.inf)
        self._requests: dict[str, Request] = {}  # owned by the step loop
        self._limiter = trio.CapacityLimiter(1)
        self._steps = 0
        self._closing = False
        self._accepting = True  # False once stop_accepting() was called (drain)
        self._drained = trio.Event()  # set by the step loop once, after stop_accepting, nothing is live
        self._last_step_end: float | None = None  # None while idle
        self.metrics = Metrics()

    # --- request side (any task) ---------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise RequestError("invalid_request", "messages must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise RequestError("invalid_request", "each message needs a string 'role' and 'content'")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        except Exception as exc:  # a template that rejects the roles, say
            raise RequestError("invalid_request", f"chat template failed: {exc}") from None
        return list(ids)

    def submit(self, prompt_ids: SeqType[int], params: SamplingParams, request_id: str | None = None,
               priority: int = 0, client: str = "") -> Generation:
        """Queue a request; raises RequestError when it cannot be served. `priority` and `client`
        matter under the `priority` and `fair` policies."""
        if self._closing or not self._accepting:
            raise RequestError("shutting_down", "the server is shutting down")
        ids = list(prompt_ids)
        check_priority(priority)
        if not ids:
            raise RequestError("invalid_request", "the prompt is empty")
        vocab = self.loaded.model.spec.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise RequestError("invalid_request", f"token ids must be integers in [0, {vocab})")
        capacity = self.capacity
        if len(ids) >= capacity:
            raise RequestError(
                "prompt_too_long",
                f"prompt has {len(ids)} tokens; this server takes at most {capacity - 1} "
                f"(context {self.max_context}, KV arena {self.allocator.num_blocks * self.block_size} tokens)",
            )
        key = uuid.uuid4().hex  # engine-wide unique; clients' ids may repeat across connections
        # Room for every event of the generation: the engine's send_nowait never blocks or drops.
        max_tokens = min(params.max_tokens, capacity - len(ids))
        send, recv = trio.open_memory_channel(min(max_tokens + 1, self.config.max_buffered_events))
        seq = Sequence(key, ids, max_tokens, frozenset() if params.ignore_eos else self.loaded.eos_token_ids,
                       priority=priority, client=client)
        request = Request(seq, params, send, Detokenizer(self.tokenizer, ids, params.stop), time.monotonic(),
                          request_id or key)
        try:
            self._inbox_send.send_nowait(Submit(request))
        except trio.WouldBlock:
            raise RequestError("overloaded", "too many requests are waiting; try again later") from None
        return Generation(key, len(ids), recv, self._control_send)

    def generate(self, prompt: str | SeqType[int], params: SamplingParams | None = None, request_id=None):
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else prompt
        return self.submit(ids, params or SamplingParams(), request_id)

    # --- drain (any task; the step loop does the work) ---------------------------------------------
    def stop_accepting(self) -> None:
        """From now on submit() raises RequestError("shutting_down"); accepted requests run on."""
        self._accepting = False
        self._wake()

    async def wait_drained(self) -> None:
        """After stop_accepting(): returns once no request is live (queued, running or in the inbox)."""
        assert not self._accepting, "call stop_accepting() first"
        await self._drained.wait()

    def abort_all(self, error: RequestError) -> None:
        """Ask the step loop to end every live request with `error` (then its FinishEvent)."""
        self._control_send.send_nowait(AbortAll(error))
        self._wake()

    @property
    def live_requests(self) -> int:
        """Requests the step loop holds (a snapshot, for logs and tests)."""
        return len(self._requests)

    def _wake(self) -> None:
        # An idle step loop blocks on the inbox: a no-op message makes it look at its state again.
        # A full inbox means the loop is busy and will look anyway.
        try:
            self._inbox_send.send_nowait(None)
        except trio.WouldBlock:
            pass

    def kv_statistics(self) -> AllocatorStats:
        return self.allocator.statistics()

    def statistics(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(len(s.running), len(s.waiting), self._steps, s.num_preemptions, s.prefix_hit_tokens,
                           self.allocator.statistics(), s.recomputed_tokens)

    # --- the step loop (one task) --------------------------------------------------------------
    async def run(self) -> None:
        while True:
            if not self.scheduler.has_work():
                self._last_step_end = None
                if not self._accepting and not self._requests and not self._inbox.statistics().current_buffer_used:
                    self._drained.set()  # stays drained: nothing new is accepted any more
                self._handle(await self._inbox.receive())  # block when idle
            self._drain(self._control, math.inf)
            # Drain when busy, but only up to max_waiting: past it the inbox fills and submit()
            # answers "overloaded" at once instead of growing an unbounded queue.
            self._drain(self._inbox, self.config.max_waiting - len(self.scheduler.waiting))
            self._reap_departed()
            plan = self.scheduler.schedule()
            if not plan.chunks:
                await trio.sleep(0)
                continue
            await self._step(plan)

    def _drain(self, channel: trio.MemoryReceiveChannel, limit: float) -> None:
        while limit > 0:
            try:
                self._handle(channel.receive_nowait())
            except trio.WouldBlock:
                return
            limit -= 1

    def _handle(self, msg) -> None:
        if isinstance(msg, Submit):
            req = msg.request
            self._requests[req.seq.request_id] = req
            self.scheduler.add(req.seq)
        elif isinstance(msg, Cancel):
            if msg.request_id in self._requests:
                self._end(msg.request_id, "cancelled")
        elif isinstance(msg, AbortAll):
            self._drain(self._inbox, math.inf)  # accepted submits still in the inbox are live too
            for rid in list(self._requests):
                self._end(rid, "error", msg.error)

    def _reap_departed(self) -> None:
        """A request whose reader is gone (client left) is aborted and its blocks freed."""
        for rid, req in list(self._requests.items()):
            if req.outbox.statistics().open_receive_channels == 0:
                self._end(rid, "cancelled")

    async def _step(self, plan: StepPlan) -> None:
        t_start = time.monotonic()
        inputs = []
        for c in plan.chunks:
            req = self._requests[c.seq.request_id]
            if req.t_scheduled is None:
                req.t_scheduled = t_start
                self.metrics.observe("queue", t_start - req.t_arrival, t_start)
            spec = None
            if c.sample:
                p = req.params
                spec = SampleSpec(p.temperature, p.top_k, p.top_p, p.seed, len(c.seq.output_ids))
            inputs.append(SeqInput(c.seq.token_ids(c.start, c.start + c.length), c.start, list(c.seq.block_table), spec))
        try:
            # Not abandoned on cancel: the arena is never left half-written.
            sampled = await trio.to_thread.run_sync(self.runner.step, inputs, limiter=self._limiter)
        except Exception as exc:
            log.exception("step_failed", tokens=plan.num_tokens, requests=[c.seq.request_id for c in plan.chunks])
            for c in plan.chunks:
                if c.seq.request_id in self._requests:
                    self._end(c.seq.request_id, "error", RequestError("internal", f"model step failed: {type(exc).__name__}"))
            return
        self._steps += 1
        now = time.monotonic()
        outputs = self.scheduler.update(plan, sampled)
        for out in outputs:
            req = self._requests.get(out.seq.request_id)
            if req is None:
                continue
            if req.t_first is None:
                req.t_first = now
                self.metrics.observe("ttft", now - req.t_arrival, now)
            self.metrics.token(now - req.t_last if req.t_last else None, now)
            req.t_last = now
            text = req.detok.add(out.token_id)
            reason = out.finish_reason
            if req.detok.stopped and reason is None:
                reason = "stop"
                self.scheduler.finish(req.seq.request_id, reason)
            if reason:
                text += req.detok.finish()
            self._send(req, TokenEvent(len(req.seq.output_ids) - 1, out.token_id, text))
            if reason:
                self._end(req.seq.request_id, reason)  # a no-op if _send already ended it
        self._record_step(plan, t_start, now, len(outputs))

    def _record_step(self, plan: StepPlan, t_start: float, t_end: float, generated: int) -> None:
        decode = sum(c.length for c in plan.chunks if c.length == 1 and c.sample)
        kv = self.allocator.statistics()
        gap = t_start - self._last_step_end if self._last_step_end is not None else 0.0
        self._last_step_end = t_end
        rec = StepRecord(t_end, t_end - t_start, gap, plan.num_tokens - decode, decode, generated,
                         len(self.scheduler.running), len(self.scheduler.waiting), kv.used_blocks, kv.free_blocks)
        self.metrics.step(rec, len(plan.preempted), self.scheduler.prefix_hit_tokens, self.scheduler.recomputed_tokens)

    def _send(self, req: Request, event) -> None:
        """Never blocks: the engine does not wait for any client."""
        outbox = req.outbox
        if isinstance(event, TokenEvent) and outbox.statistics().current_buffer_used >= outbox.statistics().max_buffer_size - 1:
            # The client stopped reading: keep the last slot for the error, abort, free the KV.
            self._end(req.seq.request_id, "error", RequestError("slow_consumer", "the client stopped reading its tokens"))
            return
        try:
            outbox.send_nowait(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the reader left; _reap_departed aborts the request next step

    def _end(self, request_id: str, reason: str, error: RequestError | None = None) -> None:
        """Finish a request: free its blocks, send its FinishEvent, log its canonical line."""
        self.scheduler.finish(request_id, reason)
        req = self._requests.pop(request_id, None)
        if req is not None:
            self._finish_early(req, reason, error)

    def _finish_early(self, req: Request, reason: str, error: RequestError | None = None) -> None:
        now = time.monotonic()
        n = len(req.seq.output_ids)
        ms = lambda t: None if t is None else round((t - req.t_arrival) * 1000, 3)  # noqa: E731
        tpot = round((now - req.t_first) * 1000 / (n - 1), 3) if req.t_first and n > 1 else None
        timing = Timing(ms(req.t_scheduled), ms(req.t_first), ms(now), tpot)
        self._send(req, FinishEvent(reason, len(req.seq.prompt_ids), n, timing, error))
        req.outbox.close()
        self.metrics.observe("e2e", now - req.t_arrival, now)
        self.metrics.finished_request(reason, len(req.seq.prompt_ids), error.code if error else None)
        log.info(
            "request_finished", request_id=req.label, prompt_tokens=len(req.seq.prompt_ids),
            completion_tokens=n, queue_ms=timing.queue_ms, ttft_ms=timing.ttft_ms, tpot_ms=timing.tpot_ms,
            finish_reason=reason, preemptions=req.seq.num_preemptions, **({"error": error.code} if error else {}),
        )

    def _close_all(self, reason: str, error: RequestError) -> None:
        self._closing = True
        for rid in list(self._requests):
            self._end(rid, reason, error)


def build_engine(config: EngineConfig) -> Engine:
    """Load the model and size the arena (blocking; run it in a thread)."""
    return Engine(config, *load_runner(config))


@asynccontextmanager
async def open_engine(config: EngineConfig):
    engine = await trio.to_thread.run_sync(build_engine, config)
    log.info("engine_ready", model=engine.model_name, kv_blocks=engine.allocator.num_blocks,
             block_size=engine.block_size, kv_tokens=engine.allocator.num_blocks * engine.block_size,
             device=str(engine.runner.device), attention=engine.runner.backend.name)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.run)
            try:
                yield engine
            finally:
                nursery.cancel_scope.cancel()
    finally:
        # The step loop has exited (its step finished first), so its state is ours to close.
        engine._close_all("error", RequestError("shutting_down", "the engine stopped"))

