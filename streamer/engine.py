"""The engine: request tasks meet the one step loop through channels.

`open_engine(config)` loads the model, sizes the KV arena and starts the step loop in a nursery
it owns. The engine is three parts:
- `Engine` (here): the trio step loop, the channels request tasks send it submits and cancels
  through, and what request tasks and the core process (streamer/core.py) call;
- `Batcher` (streamer/batcher.py): the synchronous core. It owns the one table of live requests,
  the scheduler and the KV allocator, plans steps and turns sampled ids into events;
- `Stepper` (streamer/stepper.py): how a planned step runs on the device, overlapped or not.
The step loop is the only task that calls the batcher and the stepper; a request's task holds
just its `Generation` (streamer/request.py).
"""

from __future__ import annotations

import math
import sys
import threading
import time
import uuid
from collections.abc import Sequence as SeqType
from contextlib import asynccontextmanager
from functools import partial

import structlog
import trio
from prometheus_client import generate_latest

from gpu.models import LoadedModel
from gpu.runner import ModelRunner
from gpu.sampler import SampleSpec
from streamer.allocator import AllocatorStats, BlockAllocator, HostSlots
from streamer.batcher import Batcher, EngineStats
from streamer.build import TuneResult, load_runner, running_limit, tune_budget
from streamer.config import DEFAULT_BATCH_TOKENS, EngineConfig
from streamer.controller import build_controller
from streamer.detok import Detokenizer
from streamer.metrics import Metrics
from streamer.policy import Policy
from streamer.prompt import check_prompt, encode_chat, encode_prompt
from streamer.request import AbortAll, Cancel, Compiled, EventQueue, Generation, Request, Submit
from streamer.scheduler import Scheduler, Sequence
from streamer.static import StaticScheduler
from streamer.stepper import Stepper
from streamer.types import RequestError, SamplingParams, check_priority

__all__ = ["Engine", "EngineStats", "build_engine", "open_engine", "run_engine"]

log = structlog.get_logger("streamer")
LOOP_LAG_PERIOD_S = 0.01  # how often watch_loop measures the event loop's lag
SEND_BATCHES = 3  # scheduler batches the step loop yields before an eager launch (see run)


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
        self.limits = f"context {self.max_context}, KV arena {num_blocks * config.block_size} tokens"
        self.block_size = config.block_size
        self.max_running = max_running or running_limit(config, num_blocks)
        cuda = runner.device.type == "cuda"
        overlap = config.overlap if config.overlap is not None else cuda
        self.stepper = Stepper(runner, overlap, (config.launch or ("inline" if cuda else "thread")) == "inline")
        # With objectives, the controller steers the budget and the running cap (applied before
        # each plan); else the budget is explicit, auto-tuned or the default.
        self.tuned = tuned
        controller = build_controller(config.slo_ttft_ms, config.slo_itl_ms, config.max_batch_tokens,
                                      tuned and tuned.budget, self.max_running, time.monotonic())
        budget = controller.budget if controller else (
            config.max_batch_tokens or (tuned and tuned.budget) or DEFAULT_BATCH_TOKENS)
        allocator = BlockAllocator(num_blocks)
        host_slots = HostSlots(runner.swap.num_slots if runner.swap else 0)
        args = (allocator, config.block_size, budget, self.max_running)
        kw = dict(prefix_caching=config.prefix_caching,
                  policy=Policy.parse(config.policy, config.prefill_share, config.aging_s))
        if config.static_batch:  # the benchmark baseline
            scheduler = StaticScheduler(*args, config.static_batch, config.static_padding, self.capacity, **kw)
        else:
            scheduler = Scheduler(*args, host_slots=host_slots, **kw)
        self.metrics = Metrics()
        self.batcher = Batcher(scheduler, allocator, host_slots, self.metrics, controller, self.max_running)
        # Read-only views for the doors, tools and tests; the batcher and the stepper own them.
        self.runner, self.scheduler, self.allocator, self.controller = runner, scheduler, allocator, controller
        self.host_slots = host_slots
        self._inbox_send, self._inbox = trio.open_memory_channel(config.max_waiting)
        # Cancels never wait behind a full inbox. Unbounded in type only: each live request
        # cancels at most once, so it holds at most as many messages as there are requests.
        self._control_send, self._control = trio.open_memory_channel(math.inf)
        self._grammar_lock = threading.Lock()
        self._grammar_compiler = None  # streamer/grammar.Grammars, built at the first request with a grammar
        self._tasks: trio.Nursery | None = None  # run_engine's nursery: grammar compiles run in it
        self._closing = False
        self._accepting = True  # False once stop_accepting() was called (drain)
        self._drained = trio.Event()  # set by the step loop once, after stop_accepting, nothing is live
        self.metrics.watch_live(lambda: len(scheduler.running), lambda: len(scheduler.waiting),
                                lambda: allocator.statistics().used_blocks,
                                lambda: allocator.statistics().free_blocks)
        self.metrics.watch_knobs(lambda: scheduler.max_batch_tokens,  # read at scrape time
                                 lambda: scheduler.max_running)

    @property
    def overlap(self) -> bool:
        return self.stepper.overlap

    @property
    def launch_inline(self) -> bool:
        return self.stepper.inline

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
                          SampleSpec(params.temperature, params.top_k, params.top_p, params.seed,
                                     logprobs=-1 if params.logprobs is None else params.logprobs))
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
        (the `itl_sent` series in /stats). The latency controller steers on the step loop's own
        gaps, not these (docs/CONTROLLER.md)."""
        self.batcher.delivered += gaps

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
        return len(self.batcher.requests)

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

    def statistics(self) -> EngineStats:
        return self.batcher.statistics()

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
        batcher, stepper = self.batcher, self.stepper
        while True:
            if not batcher.has_work() and not stepper.busy:
                stepper.idle()
                if not self._accepting and not batcher.requests and not self._inbox.statistics().current_buffer_used:
                    self._drained.set()  # stays drained: nothing new is accepted any more
                self._handle(await self._inbox.receive())  # block when idle
            self._drain(self._control, math.inf)
            # Drain when busy, but only up to max_waiting: past it the inbox fills and submit()
            # answers "overloaded" at once instead of growing an unbounded queue.
            self._drain(self._inbox, self.config.max_waiting - len(self.scheduler.waiting))
            batcher.reap_departed(time.monotonic())
            plan = batcher.plan()
            if plan is None and not stepper.busy:
                await trio.sleep(0)
                continue
            if plan is not None and stepper.inline and stepper.runs_eagerly(plan):
                # A launch from Python holds the event loop (eagerly, for milliseconds): first the tokens of the
                # step collected last go out. Three scheduler batches: in the first the request
                # tasks take their tokens and wake their sockets' writers, which send in the
                # second, whatever the order of tasks within a batch; this task goes on in the third.
                # (Decode steps replay a graph in well under a millisecond and do not wait: their
                # tokens go out while the step polls the device.)
                for _ in range(SEND_BATCHES):
                    await trio.sleep(0)
            inputs, rows, masks = batcher.inputs(plan, stepper.in_flight_rows()) if plan is not None else (None,) * 3
            done, launch_error = await stepper.step(plan, inputs, rows, masks)
            if done is not None:
                batcher.collected(done)
            if stepper.deferred() is not None:  # its grammar masks need the tokens just collected
                stepper.sample_deferred(batcher.deferred_masks())
            if launch_error is not None:
                batcher.fail(plan, launch_error)
            await trio.lowlevel.checkpoint_if_cancelled()  # a cancel the step held back lands here

    def _drain(self, channel: trio.MemoryReceiveChannel, limit: float) -> None:
        while limit > 0:
            try:
                self._handle(channel.receive_nowait())
            except trio.WouldBlock:
                return
            limit -= 1

    def _handle(self, msg) -> None:
        if isinstance(msg, Submit):
            if msg.request.params.grammar is None:
                self.batcher.add(msg.request)
            else:
                self.batcher.add_compiling(msg.request)
                self._tasks.start_soon(self._compile, msg.request.seq.request_id, msg.request.params.grammar)
        elif isinstance(msg, Compiled):
            self.batcher.compiled(msg.request_id, msg.matcher, msg.error)
        elif isinstance(msg, Cancel):
            self.batcher.cancel(msg.request_id)
        elif isinstance(msg, AbortAll):
            self._drain(self._inbox, math.inf)  # accepted submits still in the inbox are live too
            self.batcher.abort_all(msg.error)

    async def _compile(self, request_id: str, grammar: tuple[str, str]) -> None:
        """Compile a request's grammar in a worker thread; the step loop then schedules it."""
        try:
            matcher = await trio.to_thread.run_sync(self._matcher, grammar)
            msg = Compiled(request_id, matcher)
        except RequestError as exc:
            msg = Compiled(request_id, None, exc)
        except Exception as exc:
            log.error("grammar_failed", request_id=request_id, exc_info=exc)
            msg = Compiled(request_id, None, RequestError("internal", f"grammar compile failed: {type(exc).__name__}"))
        self._control_send.send_nowait(msg)
        self._wake()

    def _matcher(self, grammar: tuple[str, str]):
        """A new matcher of `grammar` (blocking: a worker thread's). The model's grammar compiler
        (streamer/grammar.py) is built at the first grammar."""
        from streamer.grammar import Grammars, GrammarSpec

        with self._grammar_lock:
            if self._grammar_compiler is None:
                grammars = Grammars(self.tokenizer, self.loaded.model.spec.vocab_size, self.loaded.eos_token_ids)
                self._grammar_compiler = self.batcher.grammars = grammars
        return self._grammar_compiler.compile(GrammarSpec(*grammar)).matcher()

    def _close_all(self, reason: str, error: RequestError) -> None:
        self._closing = True
        # The last steps' tokens are (being) computed: deliver them (and finishes) first.
        done = self.stepper.flush()
        if done is not None:
            self.batcher.collected(done)
        for rid in list(self.batcher.requests):
            self.batcher.end(rid, reason, error)


def build_engine(config: EngineConfig) -> Engine:
    """Load the model and size the arena (blocking; run it in a thread)."""
    loaded, runner, num_blocks, max_running = load_runner(config)
    return Engine(config, loaded, runner, num_blocks, tune_budget(config, loaded, runner, num_blocks), max_running)


@asynccontextmanager
async def open_engine(config: EngineConfig):
    """Build the engine for `config` (in a worker thread) and run it while the block lasts."""
    engine = await trio.to_thread.run_sync(build_engine, config)
    async with run_engine(engine):
        yield engine


@asynccontextmanager
async def run_engine(engine: Engine):
    """Run a built engine's step loop while the block lasts; then end what is still live."""
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
             max_running=engine.max_running, tensor_parallel=engine.config.tensor_parallel_size)
    try:
        async with trio.open_nursery() as nursery:
            engine._tasks = nursery
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
        close = getattr(engine.runner, "close", None)  # tensor parallel: stops the other ranks
        if close is not None:
            close()
