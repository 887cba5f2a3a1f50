"""The engine: request tasks meet the one step loop through channels.

`open_engine(config)` loads the model, sizes the KV arena and starts the step loop in a nursery
it owns. The step loop is the only code that touches the scheduler, the allocator and request
state; each request's task holds just its `Generation` (streamer/request.py). On CUDA a step's
launch only queues work on the device, so the loop launches on its own thread and polls for the
ids, letting the request tasks run meanwhile; on the CPU, where launching computes the step, the
step runs in a worker thread so websockets keep flowing while it computes.

With `overlap` (CUDA's default) the loop keeps one step queued ahead of the device: it plans and
launches step N+1, waits for step N's ids, then records, detokenizes and sends them while the
device runs N+1. So the host's work per step hides behind the device's, as long as it is
shorter. The scheduler plans N+1 without N's ids (streamer/scheduler.py says how), and the runner
feeds them to N+1 on the device (gpu/runner.py). Without overlap, step N+1 is planned after N's
ids are back.
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from collections.abc import Sequence as SeqType
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import structlog
import trio
from prometheus_client import generate_latest

from gpu.models import LoadedModel
from gpu.runner import Launched, ModelRunner, SeqInput
from gpu.sampler import SampleSpec
from streamer.allocator import AllocatorStats, BlockAllocator, HostSlots
from streamer.build import TuneResult, load_runner, running_limit, tune_budget
from streamer.config import DEFAULT_BATCH_TOKENS, EngineConfig
from streamer.controller import build_controller
from streamer.detok import Detokenizer, add_batch
from streamer.metrics import Metrics, StepRecord
from streamer.policy import Policy
from streamer.prompt import check_prompt, encode_chat, encode_prompt
from streamer.request import AbortAll, Cancel, EventQueue, Generation, Request, Submit
from streamer.scheduler import Scheduler, Sequence, StepPlan
from streamer.static import StaticScheduler
from streamer.types import FinishEvent, RequestError, SamplingParams, Timing, TokenEvent, check_priority

log = structlog.get_logger("streamer")
GREEDY = SampleSpec()
LOOP_LAG_PERIOD_S = 0.01  # how often watch_loop measures the event loop's lag
SEND_BATCHES = 3  # scheduler batches the step loop yields before an eager launch (see run)


@dataclass(slots=True)
class InFlight:
    """A launched step whose ids are not collected yet."""

    plan: StepPlan
    launched: Launched
    rows: dict[int, int]  # id(seq) -> its row in the step's sampled ids (for the next step's feeds)


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


class Engine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, runner: ModelRunner, num_blocks: int,
                 tuned: TuneResult | None = None, max_running: int | None = None) -> None:
        self.config = config
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.max_context = loaded.model.spec.max_position
        # The longest sequence (prompt + completion) one request may reach: the context, or the
        # whole KV arena if that is smaller.
        self.capacity = min(self.max_context, num_blocks * config.block_size)
        self.runner = runner
        self.limits = f"context {self.max_context}, KV arena {num_blocks * config.block_size} tokens"
        self.overlap = config.overlap if config.overlap is not None else runner.device.type == "cuda"
        # Launch on the loop's own thread and poll for the ids (`launch` "inline", CUDA's default: launching
        # only queues work), or launch and wait in a worker thread ("thread", the CPU's: launch computes the step).
        self.launch_inline = (config.launch or ("inline" if runner.device.type == "cuda" else "thread")) == "inline"
        self.block_size = config.block_size
        self.max_running = max_running or running_limit(config, num_blocks)
        self.allocator = BlockAllocator(num_blocks)
        self.host_slots = HostSlots(runner.swap.num_slots if runner.swap else 0)
        # [controller] With objectives, the controller steers the budget and the running cap
        # (applied before each schedule()); else the budget is explicit, auto-tuned or the default.
        self.tuned = tuned
        self.controller = build_controller(config.slo_ttft_ms, config.slo_itl_ms, config.max_batch_tokens,
                                           tuned and tuned.budget, self.max_running, time.monotonic())
        budget = self.controller.budget if self.controller else (
            config.max_batch_tokens or (tuned and tuned.budget) or DEFAULT_BATCH_TOKENS)
        args = (self.allocator, config.block_size, budget, self.max_running)
        kw = dict(prefix_caching=config.prefix_caching,
                  policy=Policy.parse(config.policy, config.prefill_share, config.aging_s))
        if config.static_batch:  # the benchmark baseline
            self.scheduler = StaticScheduler(*args, config.static_batch, config.static_padding, self.capacity, **kw)
        else:
            self.scheduler = Scheduler(*args, host_slots=self.host_slots, **kw)
        self._inbox_send, self._inbox = trio.open_memory_channel(config.max_waiting)
        # Cancels never wait behind a full inbox. Unbounded in type only: each live request
        # cancels at most once, so it holds at most as many messages as there are requests.
        self._control_send, self._control = trio.open_memory_channel(math.inf)
        self._requests: dict[str, Request] = {}  # owned by the step loop
        self._delivered: list[float] = []  # sent-frame gaps reported by the doors; the step loop empties it
        self._limiter = trio.CapacityLimiter(1)
        self._steps = 0
        self._closing = False
        self._accepting = True  # False once stop_accepting() was called (drain)
        self._drained = trio.Event()  # set by the step loop once, after stop_accepting, nothing is live
        self._last_reap = 0.0
        self._inflight: InFlight | None = None  # the launched step not collected yet (overlap)
        self._last_collected: Launched | None = None  # the step before, for the device's idle gap; None after idle
        self.metrics = Metrics()
        self.metrics.watch_live(lambda: len(self.scheduler.running), lambda: len(self.scheduler.waiting),
                                lambda: self.allocator.statistics().used_blocks,
                                lambda: self.allocator.statistics().free_blocks)
        self.metrics.watch_knobs(lambda: self.scheduler.max_batch_tokens,  # [controller] read at scrape time
                                 lambda: self.scheduler.max_running)

    # --- request side (any task) ---------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def submit(self, prompt_ids: SeqType[int], params: SamplingParams, request_id: str | None = None,
               priority: int = 0, client: str = "") -> Generation:
        """Queue a request; raises RequestError when it cannot be served. `priority` and `client`
        matter under the `priority` and `fair` policies."""
        ids = list(prompt_ids)
        key = uuid.uuid4().hex  # engine-wide unique; clients' ids may repeat across connections
        events = EventQueue(self.config.max_buffered_events)
        max_tokens = self.accept(key, ids, params, events, Detokenizer(self.tokenizer, ids, params.stop),
                                 request_id or key, priority, client)
        # Room for every event of the generation: the engine's put never blocks or drops. (Set
        # before the step loop, on this thread, first looks at the request.)
        events.capacity = min(max_tokens + 1, self.config.max_buffered_events)
        return Generation(key, len(ids), events, partial(self._control_send.send_nowait, Cancel(key)))

    def _check(self, ids: list[int], params: SamplingParams, priority: int) -> int:
        """Refuse what cannot be served (RequestError); the request's effective max_tokens."""
        if self._closing or not self._accepting:
            raise RequestError("shutting_down", "the server is shutting down")
        check_priority(priority)
        capacity = self.capacity
        check_prompt(ids, self.loaded.model.spec.vocab_size, capacity, self.limits)
        return min(params.max_tokens, capacity - len(ids))

    def accept(self, key: str, ids: list[int], params: SamplingParams, outbox, detok: Detokenizer | None,
               label: str, priority: int = 0, client: str = "") -> int:
        """Queue a request whose events go to `outbox` (an EventQueue, or the core's link to a
        front end); `detok` None: the tokens go out as ids and text is the receiver's business.
        Returns its effective max_tokens; raises RequestError when it cannot be served."""
        max_tokens = self._check(ids, params, priority)
        seq = Sequence(key, ids, max_tokens, frozenset() if params.ignore_eos else self.loaded.eos_token_ids,
                       priority=priority, client=client)
        request = Request(seq, params, outbox, detok, time.monotonic(), label,
                          SampleSpec(params.temperature, params.top_k, params.top_p, params.seed))
        try:
            self._inbox_send.send_nowait(Submit(request))
        except trio.WouldBlock:
            raise RequestError("overloaded", "too many requests are waiting; try again later") from None
        return max_tokens

    def cancel(self, key: str) -> None:
        """Ask the step loop to end request `key` as cancelled (idempotent; never blocks)."""
        self._control_send.send_nowait(Cancel(key))

    def delivered(self, gaps: list[float]) -> None:
        """A front door sent token frames to clients, each `gaps[i]` seconds after the previous
        token frame of the same stream. Never blocks; the step loop records them at its next step
        (the `itl_sent` series in /stats). The latency controller keeps steering on the step
        loop's own gaps: steered on these, it refused work without meeting its ITL objective
        (docs/BENCHMARKS.md, seventh session)."""
        self._delivered += gaps

    def generate(self, prompt: str | SeqType[int], params: SamplingParams | None = None, request_id=None):
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else prompt
        return self.submit(ids, params or SamplingParams(), request_id)

    def count_error(self, code: str) -> None:
        """A door refused something with `code` before it reached the engine."""
        self.metrics.error(code)

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

    @property
    def budget_source(self) -> str:
        """Who sets the step budget: "controller", "config" (explicit), "auto-tune" or "default"."""
        if self.controller:
            return "controller"
        return "config" if self.config.max_batch_tokens else "auto-tune" if self.tuned else "default"

    def batching(self) -> dict:
        """The step budget and running cap in force, who set them, and why (for /stats)."""
        t = self.tuned
        return {
            "max_batch_tokens": self.scheduler.max_batch_tokens,
            "running_cap": self.controller and self.controller.running_cap,
            "source": self.budget_source,
            "auto_tune": t and {"budget": t.budget, "tok_s": {str(b): round(v, 1) for b, v in t.tok_s.items()}},
            "controller": self.controller and self.controller.stats(),
        }

    def kv_statistics(self) -> AllocatorStats:
        return self.allocator.statistics()

    # --- what the doors read (web/observe.py, web/app.py), as the EngineHandle protocol has it ---
    async def stats(self, hdr: bool = False) -> dict:
        return self.snapshot(hdr=hdr)

    async def metrics_text(self) -> bytes:
        return self.prometheus_text()

    def prometheus_text(self) -> bytes:
        return generate_latest(self.metrics.registry)

    async def health(self) -> dict:
        kv = self.allocator.statistics()
        return {"model": self.model_name, "max_context": self.max_context,
                "kv": {"total_blocks": kv.total_blocks, "free_blocks": kv.free_blocks, "used_blocks": kv.used_blocks}}

    def snapshot(self, step_window_s: float = 1.0, hdr: bool = False) -> dict:
        """/stats: the metrics snapshot plus live scheduler and KV figures.

        `running`, `waiting` and `kv` come from the scheduler and the allocator now, not from the
        last step (which goes stale when the server is idle); `recent_steps` sums the steps that
        ended in the last `step_window_s`. `hdr` adds the since-start HDR histograms, encoded, so
        a client (tools/loadgen.py) can diff two snapshots and read one run's exact percentiles.
        """
        now = time.monotonic()
        snap = self.metrics.snapshot(now)
        s = self.statistics()
        recent = [r for r in self.metrics.steps if r.t_end > now - step_window_s]
        tokens = [r.tokens for r in recent]
        snap.update(
            model=self.model_name,
            running=s.running,
            waiting=s.waiting,
            kv_used_blocks=s.kv.used_blocks,
            kv_free_blocks=s.kv.free_blocks,
            steps=s.steps,
            preemptions=s.preemptions,
            batching=self.batching(),
            recomputed_tokens=s.recomputed_tokens,
            swap={
                "swaps_out": s.swaps_out,
                "swaps_in": s.swaps_in,
                "swapped_out_blocks": s.swapped_out_blocks,
                "swapped_in_blocks": s.swapped_in_blocks,
                "host_slots": s.swap_slots,
                "host_slots_free": s.swap_slots_free,
            },
            kv={
                "total_blocks": s.kv.total_blocks,
                "used_blocks": s.kv.used_blocks,
                "free_blocks": s.kv.free_blocks,
                "usage": round(s.kv.used_blocks / s.kv.total_blocks, 4) if s.kv.total_blocks else 0.0,
            },
            recent_steps={
                "window_s": step_window_s,
                "steps": len(recent),
                "batch_tokens_mean": round(sum(tokens) / len(tokens), 2) if tokens else 0.0,
                "batch_tokens_max": max(tokens, default=0),
                "prefill_tokens": sum(r.prefill_tokens for r in recent),
                "decode_tokens": sum(r.decode_tokens for r in recent),
                # the device's time in those steps, and idle between them waiting for the host
                "device_s": round(sum(r.seconds for r in recent), 6),
                "device_idle_s": round(sum(r.idle_gap for r in recent), 6),
            },
        )
        if hdr:
            snap["hdr"] = {name: h.encode().decode("ascii") for name, h in self.metrics.total.items()}
        return snap

    def statistics(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(len(s.running), len(s.waiting), self._steps, s.num_preemptions, s.prefix_hit_tokens,
                           self.allocator.statistics(), s.recomputed_tokens, s.num_swaps_out, s.num_swaps_in,
                           s.swapped_out_blocks, s.swapped_in_blocks, self.host_slots.num_slots,
                           self.host_slots.num_free)

    # --- the step loop (one task) --------------------------------------------------------------
    async def watch_loop(self) -> None:
        """Record, `LOOP_LAG_PERIOD_S` apart, how late the event loop wakes a task that slept: the
        time every stream's next frame waits too, since one thread runs the step loop, the request
        tasks and the sockets (`loop_lag` in /stats). A blocking call or a long stretch of Python
        on that thread shows here first."""
        while True:
            t = time.monotonic()
            await trio.sleep(LOOP_LAG_PERIOD_S)
            now = time.monotonic()
            self.metrics.observe("loop_lag", max(0.0, now - t - LOOP_LAG_PERIOD_S), now)

    async def run(self) -> None:
        while True:
            if not self.scheduler.has_work() and self._inflight is None:
                self._last_collected = None
                if not self._accepting and not self._requests and not self._inbox.statistics().current_buffer_used:
                    self._drained.set()  # stays drained: nothing new is accepted any more
                self._handle(await self._inbox.receive())  # block when idle
            self._drain(self._control, math.inf)
            # Drain when busy, but only up to max_waiting: past it the inbox fills and submit()
            # answers "overloaded" at once instead of growing an unbounded queue.
            self._drain(self._inbox, self.config.max_waiting - len(self.scheduler.waiting))
            self._reap_departed()
            if self.controller:  # [controller] admission, then its knobs as decided after the last step
                if self.controller.shed_after_s is not None:
                    self._shed_late(time.monotonic() - self.controller.shed_after_s)
                self.scheduler.max_batch_tokens = self.controller.budget
                # Lowering it preempts nobody: the scheduler only stops admitting until fewer run.
                self.scheduler.max_running = self.controller.running_cap or self.max_running
            plan = self.scheduler.schedule() if self.scheduler.has_work() else None
            if plan is not None and not plan.chunks and not plan.swap_out:
                plan = None
            if plan is None and self._inflight is None:
                await trio.sleep(0)
                continue
            if plan is not None and self.launch_inline and self._runs_eagerly(plan):
                # A launch from Python holds the event loop (eagerly, for milliseconds): first the tokens of the
                # step collected last go out. Three scheduler batches: in the first the request
                # tasks take their tokens and wake their sockets' writers, which send in the
                # second, whatever the order of tasks within a batch; this task goes on in the third.
                # (Decode steps replay a graph in well under a millisecond and do not wait: their
                # tokens go out while the step polls the device.)
                for _ in range(SEND_BATCHES):
                    await trio.sleep(0)
            await self._step(plan)

    def _runs_eagerly(self, plan: StepPlan) -> bool:
        return not (all(c.length == 1 and c.sample for c in plan.chunks) and self.runner.replays(len(plan.chunks)))

    def _shed_late(self, cutoff: float) -> None:
        """[controller] Refuse the requests waiting unstarted since before `cutoff`: they could no
        longer get a first token within the TTFT objective. The waiting queue keeps new requests in
        arrival order (preempted ones, skipped here, go in front), so the walk stops at the first
        new one that arrived in time."""
        late = []
        for seq in self.scheduler.waiting:
            if seq.output_ids or seq.num_preemptions:
                continue  # started once: its client has tokens already
            req = self._requests.get(seq.request_id)
            if req is None:
                continue
            if req.t_arrival >= cutoff:
                break
            late.append(seq.request_id)
        for rid in late:
            self._end(rid, "error", RequestError(
                "overloaded", "the server could not start this request within its first-token objective; try again later"))
        self.controller.observe_shed(len(late))

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
        """A request whose reader is gone (client left) is aborted and its blocks freed. Requests
        that get tokens notice at their next send; this sweep (20 times a second) finds the rest."""
        now = time.monotonic()
        if now - self._last_reap < 0.05:
            return
        self._last_reap = now
        for rid, req in list(self._requests.items()):
            if req.outbox.reader_gone:
                self._end(rid, "cancelled")

    async def _step(self, plan: StepPlan | None) -> None:
        """Launch `plan` (None: nothing new to run), then collect the step launched before it
        (overlap) or `plan` itself; then record and send the collected ids."""
        prev, self._inflight = self._inflight, None
        inputs, rows = self._inputs(plan, prev) if plan is not None else (None, None)
        runner, out = self.runner, {}
        handle = None  # the step to collect now

        def launch() -> None:
            nonlocal handle
            if plan is not None:
                try:
                    out["launched"] = runner.launch(inputs, plan.swap_out, plan.swap_in)
                except Exception as exc:
                    out["launch_error"] = exc
            # overlap: the step launched before this one; serial: this one
            handle = prev.launched if prev is not None else None if self.overlap else out.get("launched")

        def collect() -> None:
            try:
                out["sampled"] = runner.collect(handle)
            except Exception as exc:
                out["collect_error"] = exc

        # Shielded: a launched step is always collected and its ids recorded (the arena is never
        # left half-written, nothing computed is lost); a cancel lands right after.
        with trio.CancelScope(shield=True):
            if self.launch_inline:
                # On CUDA a launch only queues work (~0.5 ms for a decode step): it runs here,
                # and the wait for the device polls between the other tasks' turns. No thread
                # hand-offs, no GIL contention with the request tasks.
                launch()
                await trio.sleep(0)  # at least one schedule point a step: the request tasks run
                if handle is not None:
                    try:
                        while not runner.ready(handle):  # (a device fault may surface here)
                            await trio.sleep(0)
                    except Exception as exc:
                        out["collect_error"] = exc
                    else:
                        collect()
            else:  # the CPU computes the whole step in launch(): in the worker thread

                def work() -> None:
                    launch()
                    if handle is not None:
                        collect()

                await trio.to_thread.run_sync(work, limiter=self._limiter)
        launched = InFlight(plan, out["launched"], rows) if "launched" in out else None
        done = prev if self.overlap else launched
        if self.overlap:
            self._inflight = launched
        if done is not None and ("sampled" in out or "collect_error" in out):
            if "collect_error" in out:
                self._fail(done.plan, out["collect_error"])
            else:
                self._retire(done, out["sampled"])
        if "launch_error" in out:
            self._fail(plan, out["launch_error"])
        await trio.lowlevel.checkpoint_if_cancelled()  # the cancel the shield held back, if any

    def _inputs(self, plan: StepPlan, prev: InFlight | None) -> tuple[list[SeqInput], dict[int, int]]:
        """The runner's inputs for `plan`, and each sampling request's row in its sampled ids."""
        now = time.monotonic()
        inputs = []
        rows: dict[int, int] = {}
        for c in plan.chunks:
            seq = c.seq
            req = self._requests.get(seq.request_id)  # None: a padding row (padded static batches)
            if req is not None and req.t_scheduled is None:
                req.t_scheduled = now
                self.metrics.observe("queue", now - req.t_arrival, now)
            spec = None
            if c.sample:
                spec = req.spec if req is not None else GREEDY
                if spec.seed is not None:  # a seeded draw depends on which completion token it is:
                    p = req.params        # those known, then those still in flight
                    spec = SampleSpec(p.temperature, p.top_k, p.top_p, p.seed, len(seq.output_ids) + seq.pending - 1)
                rows[id(seq)] = len(rows)
            end = c.start + c.length
            # block_table is not copied: nothing changes it before launch() has read it
            if end > len(seq.prompt_ids) + len(seq.output_ids):  # a decode of the token the step in flight samples
                inputs.append(SeqInput([0], c.start, seq.block_table, spec, prev.rows[id(seq)]))
            else:
                inputs.append(SeqInput(seq.token_ids(c.start, end), c.start, seq.block_table, spec))
        return inputs, rows

    def _retire(self, step: InFlight, sampled: list[int | None]) -> None:
        """A collected step: record its ids, then detokenize and send them (with overlap, while
        the device runs the next step). A request that ended while the step ran (cancel, stop
        string) gets no token from it: update() skips it."""
        self._steps += 1
        outputs = self.scheduler.update(step.plan, sampled)
        self._record_step(step, len(outputs))
        self._emit(outputs)

    def _fail(self, plan: StepPlan, exc: Exception) -> None:
        """A step that raised fails its own requests; the engine serves on."""
        log.error("step_failed", tokens=plan.num_tokens, requests=[c.seq.request_id for c in plan.chunks],
                  exc_info=exc)
        self._last_collected = None
        # Those swapped out in this step go too: their copy to the host may not have run.
        failed = [c.seq for c in plan.chunks] + [s for s in plan.preempted if s.swap_slots]
        for seq in failed:
            if seq.request_id in self._requests:
                self._end(seq.request_id, "error", RequestError("internal", f"model step failed: {type(exc).__name__}"))

    def _emit(self, outputs: list) -> None:
        """Send a collected step's tokens: detokenize, apply stop strings, stamp metrics."""
        if not outputs:
            return
        now = time.monotonic()
        gaps: list[float] = []
        live = []  # (request, output); ending one request below never ends another, so all are looked up first
        for out in outputs:
            req = self._requests.get(out.seq.request_id)
            if req is None:
                continue  # ended (cancelled, aborted) after its step
            if req.t_first is None:
                req.t_first = now
                self.metrics.observe("ttft", now - req.t_arrival, now)
                if self.controller:  # [controller]
                    self.controller.observe_ttft(now - req.t_arrival)
            elif req.t_last is not None:
                gaps.append(now - req.t_last)
            req.t_last = now
            live.append((req, out))
        # Requests with a detokenizer get text (in-process); the core's get ids only.
        texts = iter(add_batch([(req.detok, out.token_id) for req, out in live if req.detok is not None]))
        for req, out in live:
            reason = out.finish_reason
            text = ""
            if req.detok is not None:
                text = next(texts)
                if req.detok.stopped and reason is None:
                    reason = "stop"
                    self.scheduler.finish(req.seq.request_id, reason)  # its token of the step in flight is dropped
                if reason:
                    text += req.detok.finish()
            self._send(req, TokenEvent(len(req.seq.output_ids) - 1, out.token_id, text))
            if reason:
                self._end(req.seq.request_id, reason)  # a no-op if _send already ended it
        self.metrics.emitted(len(outputs), gaps, now)
        delivered, self._delivered = self._delivered, []
        self.metrics.gaps("itl_sent", delivered, now)
        if self.controller:  # [controller]
            for gap in gaps:
                self.controller.observe_token(gap)

    def _record_step(self, step: InFlight, generated: int) -> None:
        plan, t_end = step.plan, time.monotonic()
        decode = sum(c.length for c in plan.chunks if c.length == 1 and c.sample)
        kv = self.allocator.statistics()
        # The device's own time for the step, and how long it sat idle before it (CUDA events)
        seconds, gap = self.runner.timing(step.launched, self._last_collected)
        self._last_collected = step.launched
        rec = StepRecord(t_end, seconds, gap, plan.num_tokens - decode, decode, generated,
                         len(self.scheduler.running), len(self.scheduler.waiting), kv.used_blocks, kv.free_blocks)
        s = self.scheduler
        self.metrics.step(rec, len(plan.preempted), s.prefix_hit_tokens, s.recomputed_tokens,
                          (s.num_swaps_out, s.num_swaps_in, s.swapped_out_blocks, s.swapped_in_blocks))
        if self.controller:  # [controller] may decide new knobs for the next schedule()
            first = next((s for s in self.scheduler.waiting if not s.output_ids), None)  # not a preempted one
            oldest = t_end - self._requests[first.request_id].t_arrival if first else 0.0
            self.controller.observe_step(t_end, plan.num_tokens, len(self.scheduler.running),
                                         len(self.scheduler.waiting), oldest, plan.num_tokens - decode)

    def _send(self, req: Request, event) -> None:
        """Never blocks: the engine does not wait for any client."""
        outbox = req.outbox
        if isinstance(event, TokenEvent) and len(outbox) >= outbox.capacity - 1:
            # A token may take any slot but the last. The client stopped reading: keep the last
            # slot for the error, abort, free the KV.
            self._end(req.seq.request_id, "error", RequestError("slow_consumer", "the client stopped reading its tokens"))
            return
        if not outbox.put(event) and isinstance(event, TokenEvent):  # the reader left: abort now, free the KV
            self._end(req.seq.request_id, "cancelled")

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
        # The last steps' tokens are (being) computed: deliver them (and finishes) first.
        step, self._inflight = self._inflight, None
        if step is not None:
            try:
                sampled = self.runner.collect(step.launched)  # blocks up to a step's time, once, at shutdown
            except Exception as exc:
                self._fail(step.plan, exc)
            else:
                self._retire(step, sampled)
        for rid in list(self._requests):
            self._end(rid, reason, error)


def build_engine(config: EngineConfig) -> Engine:
    """Load the model and size the arena (blocking; run it in a thread)."""
    loaded, runner, num_blocks, max_running = load_runner(config)
    return Engine(config, loaded, runner, num_blocks, tune_budget(config, loaded, runner, num_blocks), max_running)


@asynccontextmanager
async def open_engine(config: EngineConfig):
    engine = await trio.to_thread.run_sync(build_engine, config)
    # Where steps run in the worker thread (the CPU), it needs the GIL briefly after each step to
    # hand back the sampled ids, while this thread streams the previous step's tokens. Python's
    # default 5 ms switch interval would hold a step back that long; 0.5 ms bounds the wait
    # (restored on exit). (On CUDA the step loop launches and waits on its own thread.)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, 0.0005))
    log.info("engine_ready", model=engine.model_name, kv_blocks=engine.allocator.num_blocks,
             block_size=engine.block_size, kv_tokens=engine.allocator.num_blocks * engine.block_size,
             device=str(engine.runner.device), attention=engine.runner.backend.name,
             max_batch_tokens=engine.scheduler.max_batch_tokens, budget_source=engine.budget_source,
             max_running=engine.max_running)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.run)
            nursery.start_soon(engine.watch_loop)
            try:
                yield engine
            finally:
                nursery.cancel_scope.cancel()
    finally:
        sys.setswitchinterval(interval)
        # The step loop has exited (its step finished first), so its state is ours to close.
        engine._close_all("error", RequestError("shutting_down", "the engine stopped"))

