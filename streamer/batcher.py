"""The batcher: the engine's synchronous core. Plain Python, no trio, no device.

It owns the one table of live requests (`requests`, by engine key) with the scheduler's queues
and the KV allocator under it. The step loop (streamer/engine.py) hands it what request tasks
sent (`add`, `cancel`, `abort_all`), asks it for the next step (`plan`, `inputs`), and gives
it back what the device computed (`retire`, `fail`). It turns sampled ids into each request's
events (tokens, text where it detokenizes, the finish), ends requests and frees their blocks,
and records the step's metrics. The step loop is its only caller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from gpu.runner import SeqInput
from gpu.sampler import SampleSpec
from streamer.allocator import AllocatorStats, BlockAllocator, HostSlots
from streamer.controller import Controller
from streamer.detok import add_batch
from streamer.metrics import Metrics, StepRecord
from streamer.request import Request
from streamer.scheduler import Scheduler, StepPlan, TokenOutput
from streamer.stepper import Collected
from streamer.types import FinishEvent, Logprobs, RequestError, Timing

log = structlog.get_logger("streamer")
GREEDY = SampleSpec()
FED = [0]  # a fed decode's token_ids: a placeholder the runner replaces on the device (never mutated)
REAP_PERIOD_S = 0.05  # how often requests whose reader left are looked for


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    steps: int
    preemptions: int
    prefix_hit_tokens: int
    kv: AllocatorStats
    recomputed_tokens: int = 0
    swaps_out: int = 0  # preemptions that swapped the request's KV to the host pool
    swaps_in: int = 0
    swapped_out_blocks: int = 0
    swapped_in_blocks: int = 0
    swap_slots: int = 0  # the host pool's size in blocks (0: preemption recomputes)
    swap_slots_free: int = 0


class Batcher:
    def __init__(self, scheduler: Scheduler, allocator: BlockAllocator, host_slots: HostSlots, metrics: Metrics,
                 controller: Controller | None, max_running: int) -> None:
        self.scheduler = scheduler
        self.allocator = allocator
        self.host_slots = host_slots
        self.metrics = metrics
        self.controller = controller
        self.max_running = max_running  # the running cap when the controller sets none
        self.requests: dict[str, Request] = {}
        self.compiling: set[str] = set()  # live requests whose grammar is not compiled yet (not scheduled)
        self.grammars = None  # streamer/grammar.Grammars: the masks' arrays and their filling (the engine sets it)
        self.steps = 0
        self.delivered: list[float] = []  # sent-frame gaps the doors reported, recorded at the next step
        self._last_reap = 0.0
        self._deferred: list[Request] | None = None  # the requests of the step in flight whose masks wait

    # --- what request tasks asked for --------------------------------------------------------
    def add(self, req: Request) -> None:
        assert req.seq.request_id not in self.requests, req.seq.request_id
        self.requests[req.seq.request_id] = req
        self.scheduler.add(req.seq)

    def add_compiling(self, req: Request) -> None:
        """A request whose grammar compiles meanwhile: live (it may be cancelled), not scheduled yet."""
        assert req.seq.request_id not in self.requests, req.seq.request_id
        self.requests[req.seq.request_id] = req
        self.compiling.add(req.seq.request_id)

    def compiled(self, request_id: str, matcher, error: RequestError | None) -> None:
        """Its grammar is ready: schedule it (or end it with the compiler's error)."""
        if request_id not in self.compiling:
            return  # ended while it compiled
        if error is not None:
            self.end(request_id, "error", error)
            return
        self.compiling.discard(request_id)
        req = self.requests[request_id]
        req.matcher = matcher
        self.scheduler.add(req.seq)

    def cancel(self, request_id: str) -> None:
        if request_id in self.requests:
            self.end(request_id, "cancelled")

    def abort_all(self, error: RequestError) -> None:
        for rid in list(self.requests):
            self.end(rid, "error", error)

    def reap_departed(self, now: float) -> None:
        """A request whose reader is gone (client left) is aborted and its blocks freed. Requests
        that get tokens notice at their next send; this sweep finds the rest."""
        if now - self._last_reap < REAP_PERIOD_S:
            return
        self._last_reap = now
        for rid, req in list(self.requests.items()):
            if req.outbox.reader_gone:
                self.end(rid, "cancelled")

    # --- the next step -------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def plan(self) -> StepPlan | None:
        """The next step, or None when there is nothing to run."""
        if self.controller:  # admission, then its knobs as decided after the last step
            if self.controller.shed_after_s is not None:
                self._shed_late(time.monotonic() - self.controller.shed_after_s)
            self.scheduler.max_batch_tokens = self.controller.budget
            # Lowering it preempts nobody: the scheduler only stops admitting until fewer run.
            self.scheduler.max_running = self.controller.running_cap or self.max_running
        if not self.scheduler.has_work():
            return None
        plan = self.scheduler.schedule()
        return plan if plan.chunks or plan.swap_out else None

    def inputs(self, plan: StepPlan, in_flight: dict[int, int] | None) -> tuple[list[SeqInput], dict[int, int], tuple | None]:
        """The runner's inputs for `plan`, each sampling request's row in its sampled ids, and the
        grammar masks (rows, bitmask) of its requests under a grammar, None if it has none. The
        bitmask is None (deferred: `deferred_masks` fills it after the step in flight is
        collected) where such a request's last token is still on the device.
        `in_flight`: the rows of the step still on the device, whose ids this one's decodes take."""
        now = time.monotonic()
        inputs = []
        rows: dict[int, int] = {}
        grammar: list[tuple[int, Request]] = []
        defer = False
        get = self.requests.get
        for c in plan.chunks:
            seq = c.seq
            req = get(seq.request_id)  # None: a padding row (padded static batches)
            if req is None:
                spec = GREEDY if c.sample else None
            elif req.t_scheduled is None:
                req.t_scheduled = now
                self.metrics.observe("queue", now - req.t_arrival, now)
            end = c.start + c.length
            fed = end > len(seq.prompt_ids) + len(seq.output_ids)  # a decode of the token in flight
            if c.sample:
                if req is not None:
                    spec = req.spec
                    if spec.seed is not None:  # a seeded draw depends on which completion token it is:
                        p = req.params        # those known, then those still in flight
                        spec = SampleSpec(p.temperature, p.top_k, p.top_p, p.seed,
                                          len(seq.output_ids) + seq.pending - 1, spec.logprobs)
                    if req.matcher is not None:
                        grammar.append((len(rows), req))
                        defer = defer or fed
                rows[id(seq)] = len(rows)
            else:
                spec = None
            # block_table is not copied: nothing changes it before the launch has read it
            if fed:
                inputs.append(SeqInput(FED, c.start, seq.block_table, spec, in_flight[id(seq)]))
            else:
                inputs.append(SeqInput(seq.token_ids(c.start, end), c.start, seq.block_table, spec))
        masks = None
        if grammar:
            reqs = [req for _, req in grammar]
            masks = ([r for r, _ in grammar], None if defer else self._fill_masks(reqs))
            self._deferred = reqs if defer else None
        return inputs, rows, masks

    def deferred_masks(self):
        """The masks of the step in flight whose sampling waits for them: its requests' matchers
        have taken the tokens of the step collected before it by now."""
        reqs, self._deferred = self._deferred, None
        return self._fill_masks(reqs)

    def _fill_masks(self, reqs: list[Request]):
        bitmask = self.grammars.new_bitmask(len(reqs))
        # A request that ended since gets no mask: its token is dropped anyway.
        self.grammars.fill(bitmask, [r.matcher if r.seq.request_id in self.requests else None for r in reqs])
        return bitmask

    # --- what the device computed ------------------------------------------------------------
    def collected(self, done: Collected) -> None:
        if done.error is not None:
            self.fail(done.step.plan, done.error)
        else:
            self.retire(done)

    def retire(self, done: Collected) -> None:
        """Record a collected step's ids, then detokenize and send them. A request that ended
        while the step ran (cancel, stop string) gets no token from it: update() skips it."""
        self.steps += 1
        plan = done.step.plan
        outputs = self.scheduler.update(plan, done.sampled)
        self._record_step(plan, done, len(outputs))
        logprobs = done.logprobs and {id(plan.chunks[i].seq): Logprobs(*lp) for i, lp in done.logprobs.items()}
        self._emit(outputs, logprobs)

    def fail(self, plan: StepPlan, exc: Exception) -> None:
        """A step that raised fails its own requests; the engine serves on."""
        log.error("step_failed", tokens=plan.num_tokens, requests=[c.seq.request_id for c in plan.chunks],
                  exc_info=exc)
        # Those swapped out in this step go too: their copy to the host may not have run.
        failed = [c.seq for c in plan.chunks] + [s for s in plan.preempted if s.swap_slots]
        for seq in failed:
            if seq.request_id in self.requests:
                self.end(seq.request_id, "error", RequestError("internal", f"model step failed: {type(exc).__name__}"))

    def end(self, request_id: str, reason: str, error: RequestError | None = None) -> None:
        """Finish a request: free its blocks, send its FinishEvent, log its canonical line."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        if request_id in self.compiling:
            self.compiling.discard(request_id)
            req.seq.finish_reason = reason
        else:
            self.scheduler.finish(req.seq, reason)
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

    def statistics(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(len(s.running), len(s.waiting), self.steps, s.num_preemptions, s.prefix_hit_tokens,
                           self.allocator.statistics(), s.recomputed_tokens, s.num_swaps_out, s.num_swaps_in,
                           s.swapped_out_blocks, s.swapped_in_blocks, self.host_slots.num_slots,
                           self.host_slots.num_free)

    # --- inside ------------------------------------------------------------------------------
    def _shed_late(self, cutoff: float) -> None:
        """Refuse the requests waiting unstarted since before `cutoff`: they could no longer get
        a first token within the TTFT objective. The waiting queue keeps new requests in arrival
        order (preempted ones, skipped here, go in front), so the walk stops at the first new one
        that arrived in time."""
        late = []
        for seq in self.scheduler.waiting:
            if seq.output_ids or seq.num_preemptions:
                continue  # started once: its client has tokens already
            req = self.requests.get(seq.request_id)
            if req is None:
                continue
            if req.t_arrival >= cutoff:
                break
            late.append(seq.request_id)
        for rid in late:
            self.end(rid, "error", RequestError(
                "overloaded", "the server could not start this request within its first-token objective; try again later"))
        self.controller.observe_shed(len(late))

    def _emit(self, outputs: list[TokenOutput], logprobs: dict[int, Logprobs] | None = None) -> None:
        """Send a collected step's tokens: detokenize, apply stop strings, stamp metrics."""
        if not outputs:
            return
        now = time.monotonic()
        gaps: list[float] = []
        get = self.requests.get
        # None: ended (cancelled, aborted) after its step. Ending one request below never ends
        # another, so all are looked up first.
        reqs = [get(out.seq.request_id) for out in outputs]
        # Requests with a detokenizer get text (in-process); the core's get ids only.
        batch = [(req.detok, out.token_id) for req, out in zip(reqs, outputs, strict=True) if req is not None and req.detok is not None]
        texts = iter(add_batch(batch) if batch else ())
        for req, out in zip(reqs, outputs, strict=True):
            if req is None:
                continue
            if req.t_last is not None:
                gaps.append(now - req.t_last)
            else:  # its first token
                req.t_first = now
                self.metrics.observe("ttft", now - req.t_arrival, now)
                if self.controller:
                    self.controller.observe_ttft(now - req.t_arrival)
            req.t_last = now
            reason = out.finish_reason
            seq = out.seq
            if req.matcher is not None and reason is None:
                if not req.matcher.accept(out.token_id):
                    self.end(seq.request_id, "error", RequestError("internal", "a token broke the request's grammar"))
                    continue
                if req.matcher.done:  # nothing may follow: the answer is complete
                    reason = "stop"
                    self.scheduler.finish(seq, reason)
            text = ""
            if req.detok is not None:
                text = next(texts)
                if req.detok.stopped and reason is None:
                    reason = "stop"
                    self.scheduler.finish(seq, reason)  # its token of the step in flight is dropped
                if reason:
                    text += req.detok.finish()
            refused = req.outbox.put_token(len(seq.output_ids) - 1, out.token_id, text,
                                           logprobs.get(id(seq)) if logprobs else None)
            if refused is not None:
                self._refused(req, refused)
            elif reason:
                self.end(seq.request_id, reason)
        self.metrics.emitted(len(outputs), gaps, now)
        delivered, self.delivered = self.delivered, []
        self.metrics.gaps("itl_sent", delivered, now)
        if self.controller:
            for gap in gaps:
                self.controller.observe_token(gap)

    def _record_step(self, plan: StepPlan, done: Collected, generated: int) -> None:
        t_end = time.monotonic()
        decode = plan.num_decodes
        kv = self.allocator.statistics()
        s = self.scheduler
        rec = StepRecord(t_end, done.seconds, done.idle_gap, plan.num_tokens - decode, decode, generated,
                         len(s.running), len(s.waiting), kv.used_blocks, kv.free_blocks)
        self.metrics.step(rec, len(plan.preempted), s.prefix_hit_tokens, s.recomputed_tokens,
                          (s.num_swaps_out, s.num_swaps_in, s.swapped_out_blocks, s.swapped_in_blocks))
        if self.controller:  # may decide new knobs for the next plan()
            first = next((q for q in s.waiting if not q.output_ids), None)  # not a preempted one
            oldest = t_end - self.requests[first.request_id].t_arrival if first else 0.0
            self.controller.observe_step(t_end, plan.num_tokens, len(s.running), len(s.waiting), oldest,
                                         plan.num_tokens - decode)

    def _send(self, req: Request, event: FinishEvent) -> None:
        """Never blocks: the engine does not wait for any client."""
        req.outbox.put(event)

    def _refused(self, req: Request, why: str) -> None:
        """A request's outbox took no token (`put_token`): its reader left, or stopped reading."""
        if why == "slow_consumer":  # the outbox kept its last slot for this error; abort, free the KV
            self.end(req.seq.request_id, "error", RequestError("slow_consumer", "the client stopped reading its tokens"))
        else:  # the reader left: abort now, free the KV
            self.end(req.seq.request_id, "cancelled")
