"""The latency controller: holds `--slo-ttft-ms` / `--slo-itl-ms` by turning two knobs of the
scheduler between steps, the step token budget (`budget`, its `max_batch_tokens`) and a cap on
running requests (`running_cap`, its `max_running`; None: `--max-running`), and, with a TTFT
objective, by having requests that could no longer start in time refused (`shed_after_s`).

Plain synchronous Python. The batcher (streamer/batcher.py) owns it, so only the step loop's task
calls it: with every inter-token gap as the step loop queued it, every time to first token, every
refusal, and after each step its tokens and the running and waiting counts. Once a period it takes
their P99s and decides (`_decide`). Every observation carries its own time, so tests drive it with
a fake clock (tests/test_controller.py).

The rule, why each part is there, and what it has been measured to do: docs/CONTROLLER.md.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

DECREASE = 0.5  # multiplicative decrease of the budget when ITL is over its objective
INCREASE_FRACTION = 1 / 32  # additive increase of the budget: this fraction of the ceiling per period
RUNNING_DECREASE = 0.85  # the running cap's multiplicative decrease, of the running count observed
RUNNING_INCREASE_FRACTION = 1 / 16  # its additive increase: this fraction of max_running per period
RUNNING_FLOOR = 8  # the running cap never goes below this (or max_running, if smaller)
HEADROOM = 0.8  # the knobs grow only while ITL P99 is under this fraction of its objective
MIN_STEPS = 4  # a decision needs at least this many steps of evidence
EFFECTIVE = 0.9  # a budget cut counts as working if ITL P99 falls below this fraction of its cause
COOLDOWN = 10  # periods ITL does not steer the budget after a cut that did not work
DEFAULT_CEILING = 8192  # ceiling when neither --max-batch-tokens nor auto-tuning gives one
SHED_FRACTION = 0.5  # a request not started after this fraction of the TTFT objective is refused


def p99(values: list[float]) -> float | None:
    """Nearest-rank 99th percentile (the maximum below 100 samples)."""
    if not values:
        return None
    # the (n - i)-th largest is sorted(values)[i]; heapq keeps only those ~1%: at 256 running a
    # period holds ~25k gaps, which a full sort held the event loop for ~2.3 ms (0.4 ms this way)
    i = min(len(values) - 1, int(0.99 * len(values)))
    return heapq.nlargest(len(values) - i, values)[-1]


def refused_past_p99(refused: int, served: int) -> bool:
    """Whether the nearest-rank P99 of the first-token times of `served` requests and of `refused`
    ones (each an endless wait) is one of the refused: more than 1% refused."""
    n = refused + served
    return refused > 0 and refused >= n - min(n - 1, int(0.99 * n))


@dataclass(frozen=True)
class Decision:
    """One period's evidence and what the controller did with it (shown in /stats)."""

    t: float
    steps: int
    itl_p99_s: float | None
    ttft_p99_s: float | None
    decode_step_p99_s: float | None  # loop cycles of decode-only steps
    running: int  # the most running in a step of the period
    waiting: int
    refused: int  # requests refused in the period (counted in its TTFT P99 as misses)
    budget: int
    running_cap: int | None
    action: str  # the budget: "decrease", "increase", "restore" (a cut that did not work) or "hold"
    cap_action: str  # the running cap: "tighten", "relax" or "hold"


class Controller:
    def __init__(
        self, *, ttft_slo_s: float | None, itl_slo_s: float | None, floor: int, ceiling: int, max_running: int,
        now: float, start: int | None = None, period_s: float = 0.5,
    ) -> None:
        assert ttft_slo_s is not None or itl_slo_s is not None, "a controller needs an objective"
        start = ceiling if start is None else start
        assert 1 <= floor <= start <= ceiling and max_running >= 1
        self.ttft_slo_s, self.itl_slo_s = ttft_slo_s, itl_slo_s
        self.floor, self.ceiling, self.max_running, self.period_s = floor, ceiling, max_running, period_s
        self.increase = max(1, int(ceiling * INCREASE_FRACTION))
        self.running_floor = min(RUNNING_FLOOR, max_running)
        self.running_increase = max(1, int(max_running * RUNNING_INCREASE_FRACTION))
        self.budget = start
        self.running_cap: int | None = None
        self.decisions = 0
        self.last: Decision | None = None
        self._itl: list[float] = []
        self._ttft: list[float] = []
        self._steps = self._full_steps = 0
        self._running = 0  # the most running in a step of this period
        self._oldest_wait = 0.0
        self._waiting = 0
        self._t_last = now
        self._cut: tuple[int, float] | None = None  # (budget before, ITL P99 that caused it) of last period's cut
        self._decode_cycles: list[float] = []  # this period's loop cycles that ended a decode-only step
        self._t_step: float | None = None  # when the last step ended
        self._cooldown = 0  # periods left in which ITL does not steer the budget
        self.shed = 0  # requests refused for waiting past shed_after_s
        self._shed = 0  # of them, this period's

    @property
    def shed_after_s(self) -> float | None:
        """How long a request may wait for its first step before the step loop refuses it (None:
        no TTFT objective, never)."""
        return None if self.ttft_slo_s is None else SHED_FRACTION * self.ttft_slo_s

    # --- observations (the step loop calls these) ----------------------------------------------
    def observe_token(self, gap_s: float) -> None:
        """The gap between two consecutive tokens of one request."""
        self._itl.append(gap_s)

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.append(seconds)

    def observe_shed(self, n: int) -> None:
        """n requests refused for waiting past `shed_after_s`: first tokens that missed the objective."""
        self.shed += n
        self._shed += n

    def observe_step(self, now: float, tokens: int, running: int, waiting: int, oldest_wait_s: float,
                     prefill_tokens: int | None = None) -> None:
        """After each step: its tokens, requests running and still waiting, the oldest waiting
        one's age, and (if known) how many of its tokens were prompt tokens; may decide."""
        if prefill_tokens == 0 and self._t_step is not None:
            self._decode_cycles.append(now - self._t_step)
        self._t_step = now
        self._steps += 1
        self._full_steps += tokens >= self.budget
        self._running = max(self._running, running)
        self._waiting = waiting
        self._oldest_wait = max(self._oldest_wait, oldest_wait_s)
        if now - self._t_last >= self.period_s and self._steps >= MIN_STEPS:
            self._decide(now)

    # --- the rule (docs/CONTROLLER.md) --------------------------------------------------------------
    def _decide(self, now: float) -> None:
        itl = p99(self._itl)
        ttft = max(p99(self._ttft) or 0.0, self._oldest_wait) if (self._ttft or self._oldest_wait) else None
        itl_over = self.itl_slo_s is not None and itl is not None and itl > self.itl_slo_s
        itl_room = self.itl_slo_s is None or itl is None or itl < HEADROOM * self.itl_slo_s
        ttft_over = self.ttft_slo_s is not None and (
            (ttft is not None and ttft > self.ttft_slo_s) or refused_past_p99(self._shed, len(self._ttft)))
        decode = p99(self._decode_cycles)
        # The long gaps come from steps carrying prompt chunks: decode-only steps were well inside
        # the objective, so the budget is the lever whatever the running cap does.
        prefill_bound = itl_over and decode is not None and decode < HEADROOM * self.itl_slo_s
        backlog = self._waiting > 0 or self._full_steps > 0 or ttft_over
        cap = self.running_cap

        action = cap_action = "hold"
        steer = self._cooldown == 0  # ITL steers the budget (no recent cut failed)
        self._cooldown = max(0, self._cooldown - 1)
        cut, self._cut = self._cut, None
        if cut is not None and itl is not None and itl > EFFECTIVE * cut[1]:
            # the last cut did not shorten the gaps: the budget is not what sets them
            self.budget, action, steer, self._cooldown = cut[0], "restore", False, COOLDOWN
        if action == "hold":
            if itl_over and steer and self.budget > self.floor and (cap in (None, self.running_floor) or prefill_bound):
                self._cut = (self.budget, itl)
                self.budget, action = max(self.floor, int(self.budget * DECREASE)), "decrease"
            elif backlog and (itl_room or not steer) and self.budget < self.ceiling:
                self.budget, action = min(self.ceiling, self.budget + self.increase), "increase"

        if itl_over and action != "decrease" and not ttft_over and not prefill_bound:  # fewer run
            tighter = max(self.running_floor, min(cap or self.max_running, int(RUNNING_DECREASE * self._running)))
            if tighter < (cap or self.max_running):
                self.running_cap, cap_action = tighter, "tighten"
        elif cap is not None and (ttft_over or (self._waiting > 0 and (itl_room or prefill_bound))):  # TTFT first
            looser = cap + self.running_increase
            self.running_cap, cap_action = (None if looser >= self.max_running else looser), "relax"

        self.decisions += 1
        self.last = Decision(now, self._steps, itl, ttft, decode, self._running, self._waiting, self._shed,
                             self.budget, self.running_cap, action, cap_action)
        self._itl, self._ttft, self._decode_cycles = [], [], []
        self._steps = self._full_steps = self._running = self._shed = 0
        self._oldest_wait = 0.0
        self._t_last = now

    def stats(self) -> dict:
        ms = lambda s: None if s is None else round(s * 1000, 3)  # noqa: E731
        d = self.last
        return {
            "slo_ttft_ms": ms(self.ttft_slo_s), "slo_itl_ms": ms(self.itl_slo_s),
            "floor": self.floor, "ceiling": self.ceiling, "running_floor": self.running_floor,
            "decisions": self.decisions, "shed": self.shed,
            "last": None if d is None else {
                "itl_p99_ms": ms(d.itl_p99_s), "ttft_p99_ms": ms(d.ttft_p99_s),
                "decode_step_p99_ms": ms(d.decode_step_p99_s), "running": d.running,
                "waiting": d.waiting, "refused": d.refused, "steps": d.steps, "action": d.action,
                "cap_action": d.cap_action,
            },
        }


def build_controller(
    slo_ttft_ms: float | None, slo_itl_ms: float | None, max_batch_tokens: int | None, tuned_budget: int | None,
    max_running: int, now: float,
) -> Controller | None:
    """The engine's controller, or None without objectives. Ceiling, and start: an explicit
    --max-batch-tokens, else the auto-tuned budget (more buys no throughput), else DEFAULT_CEILING.
    Floor: one decode token for every request the batch may hold."""
    if slo_ttft_ms is None and slo_itl_ms is None:
        return None
    ceiling = max_batch_tokens or tuned_budget or DEFAULT_CEILING
    return Controller(
        ttft_slo_s=None if slo_ttft_ms is None else slo_ttft_ms / 1000,
        itl_slo_s=None if slo_itl_ms is None else slo_itl_ms / 1000,
        floor=min(ceiling, max_running), ceiling=ceiling, max_running=max_running, now=now,
    )
