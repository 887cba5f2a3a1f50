"""The latency controller: holds `--slo-ttft-ms` / `--slo-itl-ms` by setting the step token budget
and the admission cap. Plain synchronous Python, owned and called only by the step loop; every
observation carries its own time, so tests drive it with a fake clock.

What it sees: each inter-token gap (ITL), each time to first token (TTFT), and after each step the
step's tokens, the number of waiting requests and how long the oldest of them has waited for its
first token. What it sets: `budget` (the scheduler's `max_batch_tokens`) and `admit_cap` (the
scheduler's `max_admit_per_step`; None means no cap).

The rule. Once a period (`period_s`, and at least `MIN_STEPS` steps) has passed, it takes the P99
(nearest rank) of the ITLs and of the TTFTs observed in that period, the TTFT raised to the oldest
waiting request's age (a stalled queue counts before anyone gets a first token), then:

1. Budget, additive increase / multiplicative decrease between `floor` and `ceiling`:
   - ITL P99 over its objective: `budget = max(floor, budget * DECREASE)`. A running request waits
     one step between tokens, and the step time grows with the step's tokens, so a smaller budget
     is the direct way to shorten the gap (prefill chunks shrink; decodes always go first).
   - else, with backlog (requests waiting, or a step that used its whole budget) and ITL P99 under
     `HEADROOM` x its objective (or no ITL objective): `budget = min(ceiling, budget + increase)`.
     A bigger step prefills more prompt tokens, so waiting requests reach their first token sooner
     and throughput rises; the headroom stops it from climbing straight back into a violation.
   - else it holds: no backlog means a bigger budget would buy nothing.
2. Admission cap, the brake once the budget has nothing left to give:
   - tighten (`cap = max(1, (cap or max_admit) // 2)`) when TTFT P99 is over its objective while the
     queue grows and the budget cannot grow (ITL has no headroom, or the budget is at the ceiling):
     the engine is past what it can serve within the objectives. Admitting faster would only
     enlarge the running batch (every admitted request adds a decode token to each step, and KV
     blocks that later force preemptions, whose recomputation wastes work) and push ITL over for
     everyone, while the queue still would not shrink. Also tighten when ITL P99 is over its
     objective with the budget already at the floor: only a smaller batch can shorten steps then.
     A capped engine keeps its admitted requests within ITL; the queue, bounded by
     `--max-waiting`, fills and refuses the excess at once ("overloaded"). The cap does not by
     itself bring TTFT back under its objective in overload: nothing but refusing work can.
   - relax (`cap *= 2`, lifted to None at `max_admit`) in a period with both objectives met.

3. A cut must work. The period after a decrease compares ITL P99 with the value that caused it:
   unless it fell below `EFFECTIVE` x that value, the gaps are not set by the step budget (on a
   GPU they can be set by the host's per-token streaming work, which grows with the number of
   live streams, not with the budget), so the budget goes back to where it was and ITL stops
   steering it for `COOLDOWN` periods. Meanwhile backlog may grow the budget (for TTFT and
   throughput), and the admission cap tightens only in overload at the ceiling, never for an ITL
   the budget was just shown not to move. Without this check, host-bound ITL drove the budget to
   its floor and the cap to 1, and TTFT grew to seconds (measured: docs/BENCHMARKS.md).

The budget moves from floor to ceiling in about 1 / INCREASE_FRACTION periods and halves in one.
"""

from __future__ import annotations

from dataclasses import dataclass

DECREASE = 0.5  # multiplicative decrease of the budget when ITL is over its objective
INCREASE_FRACTION = 1 / 32  # additive increase: this fraction of the ceiling per period
HEADROOM = 0.8  # the budget grows only while ITL P99 is under this fraction of its objective
MIN_STEPS = 4  # a decision needs at least this many steps of evidence
EFFECTIVE = 0.9  # a budget cut counts as working if ITL P99 falls below this fraction of its cause
COOLDOWN = 10  # periods ITL does not steer the budget after a cut that did not work
DEFAULT_CEILING = 8192  # ceiling when neither --max-batch-tokens nor auto-tuning gives one
DEFAULT_START = 512


def p99(values: list[float]) -> float | None:
    """Nearest-rank 99th percentile (the maximum below 100 samples)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@dataclass(frozen=True)
class Decision:
    """One period's evidence and what the controller did with it (shown in /stats)."""

    t: float
    steps: int
    itl_p99_s: float | None
    ttft_p99_s: float | None
    waiting: int
    budget: int
    admit_cap: int | None
    action: str  # "decrease", "increase", "restore" (a cut that did not work) or "hold" (the budget)
    cap_action: str  # "tighten", "relax" or "hold"


class Controller:
    def __init__(
        self, *, ttft_slo_s: float | None, itl_slo_s: float | None, floor: int, ceiling: int, start: int,
        max_admit: int, now: float, period_s: float = 0.5,
    ) -> None:
        assert ttft_slo_s is not None or itl_slo_s is not None, "a controller needs an objective"
        assert 1 <= floor <= start <= ceiling and max_admit >= 1
        self.ttft_slo_s, self.itl_slo_s = ttft_slo_s, itl_slo_s
        self.floor, self.ceiling, self.max_admit, self.period_s = floor, ceiling, max_admit, period_s
        self.increase = max(1, int(ceiling * INCREASE_FRACTION))
        self.budget = start
        self.admit_cap: int | None = None
        self.decisions = 0
        self.last: Decision | None = None
        self._itl: list[float] = []
        self._ttft: list[float] = []
        self._steps = self._full_steps = 0
        self._oldest_wait = 0.0
        self._waiting = self._waiting_before = 0
        self._t_last = now
        self._cut: tuple[int, float] | None = None  # (budget before, ITL P99 that caused it) of last period's cut
        self._cooldown = 0  # periods left in which ITL does not steer the budget

    # --- observations (the step loop calls these) ----------------------------------------------
    def observe_token(self, gap_s: float) -> None:
        """The gap between two consecutive tokens of one request."""
        self._itl.append(gap_s)

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.append(seconds)

    def observe_step(self, now: float, tokens: int, waiting: int, oldest_wait_s: float) -> None:
        """After each step: its tokens, requests still waiting, the oldest one's age; may decide."""
        self._steps += 1
        self._full_steps += tokens >= self.budget
        self._waiting = waiting
        self._oldest_wait = max(self._oldest_wait, oldest_wait_s)
        if now - self._t_last >= self.period_s and self._steps >= MIN_STEPS:
            self._decide(now)

    # --- the rule (see the module docstring) ------------------------------------------------------
    def _decide(self, now: float) -> None:
        itl = p99(self._itl)
        ttft = max(p99(self._ttft) or 0.0, self._oldest_wait) if (self._ttft or self._oldest_wait) else None
        itl_over = self.itl_slo_s is not None and itl is not None and itl > self.itl_slo_s
        itl_room = self.itl_slo_s is None or itl is None or itl < HEADROOM * self.itl_slo_s
        ttft_over = self.ttft_slo_s is not None and ttft is not None and ttft > self.ttft_slo_s
        growing = self._waiting > self._waiting_before
        backlog = self._waiting > 0 or self._full_steps > 0

        action = "hold"
        steer = self._cooldown == 0  # ITL steers the budget (no recent cut failed)
        self._cooldown = max(0, self._cooldown - 1)
        cut, self._cut = self._cut, None
        if cut is not None and itl is not None and itl > EFFECTIVE * cut[1]:
            # the last cut did not shorten the gaps: the budget is not what sets them
            self.budget, action, steer, self._cooldown = cut[0], "restore", False, COOLDOWN
        at_floor = self.budget == self.floor
        if action == "hold":
            if itl_over and steer:
                if self.budget > self.floor:
                    self._cut = (self.budget, itl)
                self.budget, action = max(self.floor, int(self.budget * DECREASE)), "decrease"
            elif backlog and (itl_room or not steer) and self.budget < self.ceiling:
                self.budget, action = min(self.ceiling, self.budget + self.increase), "increase"

        cap_action = "hold"
        at_ceiling = self.budget == self.ceiling
        overloaded = ttft_over and growing and (at_ceiling or (steer and not itl_room))
        if overloaded or (itl_over and at_floor and steer and not ttft_over):
            self.admit_cap, cap_action = max(1, (self.admit_cap or self.max_admit) // 2), "tighten"
        elif self.admit_cap is not None and not ttft_over and not itl_over:
            cap = self.admit_cap * 2
            self.admit_cap, cap_action = (None if cap >= self.max_admit else cap), "relax"

        self.decisions += 1
        self.last = Decision(now, self._steps, itl, ttft, self._waiting, self.budget, self.admit_cap, action, cap_action)
        self._itl, self._ttft = [], []
        self._steps = self._full_steps = 0
        self._oldest_wait = 0.0
        self._waiting_before = self._waiting
        self._t_last = now

    def stats(self) -> dict:
        ms = lambda s: None if s is None else round(s * 1000, 3)  # noqa: E731
        d = self.last
        return {
            "slo_ttft_ms": ms(self.ttft_slo_s), "slo_itl_ms": ms(self.itl_slo_s),
            "floor": self.floor, "ceiling": self.ceiling, "decisions": self.decisions,
            "last": None if d is None else {
                "itl_p99_ms": ms(d.itl_p99_s), "ttft_p99_ms": ms(d.ttft_p99_s), "waiting": d.waiting,
                "steps": d.steps, "action": d.action, "cap_action": d.cap_action,
            },
        }


def build_controller(
    slo_ttft_ms: float | None, slo_itl_ms: float | None, max_batch_tokens: int | None, tuned_budget: int | None,
    max_running: int, now: float,
) -> Controller | None:
    """The engine's controller, or None without objectives. Ceiling: an explicit --max-batch-tokens,
    else the auto-tuned budget (more buys no throughput), else DEFAULT_CEILING. Floor: one decode
    token for every request the batch may hold."""
    if slo_ttft_ms is None and slo_itl_ms is None:
        return None
    ceiling = max_batch_tokens or tuned_budget or DEFAULT_CEILING
    floor = min(ceiling, max_running)
    return Controller(
        ttft_slo_s=None if slo_ttft_ms is None else slo_ttft_ms / 1000,
        itl_slo_s=None if slo_itl_ms is None else slo_itl_ms / 1000,
        floor=floor, ceiling=ceiling, start=max(floor, min(DEFAULT_START, ceiling)), max_admit=max_running, now=now,
    )
