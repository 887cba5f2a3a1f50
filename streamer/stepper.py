"""The stepper: how a planned step runs on the device, for the step loop.

It owns the model runner's side of a step: launching it, keeping at most one step in flight
(`overlap`), waiting for the device and collecting the sampled ids with the device's own timing.
It knows nothing of requests; the batcher (streamer/batcher.py) turns what it collects into tokens.

Two ways to run a step, chosen by `EngineConfig.launch`:
- "inline" (CUDA's default): a launch only queues work on the device, so it runs on the step
  loop's thread, and the wait polls the device between the other tasks' turns;
- "thread" (the CPU's): a launch computes the whole step, so launch and collect run in a worker
  thread while the request tasks and the sockets go on.
With `overlap` (CUDA's default) the stepper launches step N+1 before it collects step N, so the
device runs N+1 while the host records and sends N's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from gpu.runner import Launched, ModelRunner, SeqInput
from streamer.scheduler import StepPlan


@dataclass(slots=True)
class InFlight:
    """A launched step whose ids are not collected yet."""

    plan: StepPlan
    launched: Launched
    rows: dict[int, int]  # id(seq) -> its row in the step's sampled ids (for the next step's feeds)


@dataclass(slots=True)
class Collected:
    """A step that came back: its ids (or the device's error), and the device's time on it."""

    step: InFlight
    sampled: list[int | None] | None
    error: Exception | None = None
    seconds: float = 0.0  # the device's time on the step
    idle_gap: float = 0.0  # how long the device sat idle before it (0 after an idle loop)
    logprobs: dict | None = None  # seq position in the plan -> (log-probability, top pairs), where asked


class Stepper:
    def __init__(self, runner: ModelRunner, overlap: bool, inline: bool) -> None:
        self.runner = runner
        self.overlap = overlap
        self.inline = inline
        self.inflight: InFlight | None = None  # the launched step not collected yet (overlap)
        self._previous: Launched | None = None  # the step collected last, for the device's idle gap
        self._limiter = trio.CapacityLimiter(1)

    @property
    def busy(self) -> bool:
        return self.inflight is not None

    def in_flight_rows(self) -> dict[int, int] | None:
        """Rows of the step in flight, whose sampled ids feed the next step's decodes on the device."""
        return self.inflight.rows if self.inflight is not None else None

    def idle(self) -> None:
        """The loop has nothing to run: the next step's idle gap is not the device's doing."""
        self._previous = None

    def runs_eagerly(self, plan: StepPlan) -> bool:
        """Whether launching `plan` holds the host for milliseconds (not one decode graph replay)."""
        return not (plan.num_decodes == len(plan.chunks) and self.runner.replays(len(plan.chunks)))

    async def step(self, plan: StepPlan | None, inputs: list[SeqInput] | None, rows: dict[int, int] | None,
                   masks=None) -> tuple[Collected | None, Exception | None]:
        """Launch `plan` (None: nothing new), then collect the step launched before it (overlap)
        or `plan` itself. Returns what was collected, if anything, and the launch's error, if any.

        Shielded: a launched step is always collected (the arena is never left half-written,
        nothing computed is lost). A cancel that came meanwhile lands at the caller's next
        checkpoint, after it has recorded what came back. `masks`: the grammar masks of the
        step (gpu/runner.ModelRunner.launch); deferred ones come through `sample_deferred`."""
        prev, self.inflight = self.inflight, None
        runner = self.runner
        launched: Launched | None = None
        launch_error: Exception | None = None
        waiting: InFlight | None = None  # the step to collect now
        collected: Collected | None = None

        def launch() -> None:
            nonlocal launched, launch_error, waiting
            if plan is not None:
                try:
                    launched = runner.launch(inputs, plan.swap_out, plan.swap_in, masks)
                except Exception as exc:
                    launch_error = exc
            mine = InFlight(plan, launched, rows) if launched is not None else None
            waiting = prev if self.overlap else mine
            if self.overlap:
                self.inflight = mine

        def collect() -> None:
            nonlocal collected
            collected = self._collect(waiting)

        with trio.CancelScope(shield=True):
            if self.inline:
                launch()
                await trio.sleep(0)  # at least one schedule point a step: the request tasks run
                if waiting is not None:
                    try:
                        while not runner.ready(waiting.launched):  # (a device fault may surface here)
                            await trio.sleep(0)
                    except Exception as exc:
                        collected = self._failed(waiting, exc)
                    else:
                        collect()
            else:

                def work() -> None:
                    launch()
                    if waiting is not None:
                        collect()

                await trio.to_thread.run_sync(work, limiter=self._limiter)
        return collected, launch_error

    def deferred(self) -> InFlight | None:
        """The step in flight, if its sampling waits for grammar masks."""
        step = self.inflight
        return step if step is not None and step.launched.deferred is not None else None

    def sample_deferred(self, bitmask) -> None:
        """Queue the deferred sampling of the step in flight with its grammar masks."""
        self.runner.sample_deferred(self.inflight.launched, bitmask)

    def flush(self) -> Collected | None:
        """At shutdown: wait for the step in flight, if any (blocks up to one step's time)."""
        step, self.inflight = self.inflight, None
        return self._collect(step) if step is not None else None

    def _collect(self, step: InFlight) -> Collected:
        try:
            if step.launched.deferred is not None:  # its masks never came (a failed step before it): unmasked
                self.runner.sample_deferred(step.launched, None)
            sampled = self.runner.collect(step.launched)
        except Exception as exc:
            return self._failed(step, exc)
        seconds, gap = self.runner.timing(step.launched, self._previous)
        self._previous = step.launched
        return Collected(step, sampled, None, seconds, gap, self.runner.logprobs(step.launched))

    def _failed(self, step: InFlight, exc: Exception) -> Collected:
        self._previous = None
        return Collected(step, None, exc)
