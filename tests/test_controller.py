"""The latency controller alone, on a fake clock with synthetic observations: the budget's
additive increase / multiplicative decrease, its bounds, and the admission cap's brake."""

from __future__ import annotations

from streamer.controller import COOLDOWN, DEFAULT_CEILING, Controller, build_controller, p99

MS = 0.001


def make(ttft_ms=200.0, itl_ms=25.0, floor=64, ceiling=4096, start=512, max_admit=64) -> Controller:
    return Controller(ttft_slo_s=ttft_ms and ttft_ms * MS, itl_slo_s=itl_ms and itl_ms * MS, floor=floor,
                      ceiling=ceiling, start=start, max_admit=max_admit, now=0.0, period_s=0.5)


class Feed:
    """Synthetic traffic: each period, 8 steps of 1/16 s (exact in binary) with `tokens` each."""

    def __init__(self, c: Controller) -> None:
        self.c, self.t = c, 0.0

    def period(self, itl_ms=10.0, ttft_ms=None, waiting=0, oldest_ms=0.0, tokens=None):
        for _ in range(8):
            self.t += 1 / 16
            for _ in range(8):
                self.c.observe_token(itl_ms * MS)
            if ttft_ms is not None:
                self.c.observe_ttft(ttft_ms * MS)
            self.c.observe_step(self.t, self.c.budget if tokens is None else tokens, waiting, oldest_ms * MS)
        return self.c.last


def test_p99_is_nearest_rank():
    assert p99([]) is None
    assert p99([3.0, 1.0, 2.0]) == 3.0
    assert p99([float(i) for i in range(1000)]) == 990.0


def test_no_decision_before_a_period_and_enough_steps():
    c = make()
    c.observe_token(1.0)  # far over the ITL objective
    c.observe_step(0.4, 512, 0, 0.0)  # not a period yet
    c.observe_step(0.6, 512, 0, 0.0)  # a period, but only two steps
    assert c.budget == 512 and c.decisions == 0


def test_budget_halves_when_itl_is_over_its_objective():
    """A fake card whose ITL is proportional to the budget: each cut works, so cuts go on."""
    c = make(start=1024)
    f = Feed(c)
    d = f.period(itl_ms=80 * c.budget / 1024, waiting=5)
    assert d.action == "decrease" and c.budget == 512
    f.period(itl_ms=80 * c.budget / 1024, waiting=5)  # 40 ms: better, still over
    assert c.budget == 256


def test_a_cut_that_does_not_shorten_the_gaps_is_undone_and_itl_stops_steering():
    """Host-bound ITL (the same whatever the budget): one cut, then the budget goes back, grows for
    the backlog during the cool-down, and the admission cap is never tightened for that ITL."""
    c = make(start=1024, ceiling=4096, floor=64)
    f = Feed(c)
    d = f.period(itl_ms=40, ttft_ms=150, waiting=5)
    assert d.action == "decrease" and c.budget == 512
    d = f.period(itl_ms=40, ttft_ms=150, waiting=5)
    assert d.action == "restore" and c.budget == 1024
    for _ in range(COOLDOWN):
        d = f.period(itl_ms=40, ttft_ms=150, waiting=5)
        assert d.action == "increase" and d.cap_action == "hold"
    assert c.budget == 1024 + COOLDOWN * c.increase and c.admit_cap is None
    d = f.period(itl_ms=40, ttft_ms=150, waiting=5)  # cool-down over: one more probe
    assert d.action == "decrease"
    budgets = [f.period(itl_ms=40, ttft_ms=150, waiting=5) and c.budget for _ in range(100)]
    assert min(budgets) > c.floor and c.admit_cap is None  # never driven to the floor


def test_budget_grows_additively_under_the_objective_with_backlog():
    c = make(start=512, ceiling=4096)
    f = Feed(c)
    d = f.period(itl_ms=10, waiting=3)
    assert d.action == "increase" and c.budget == 512 + 4096 // 32
    f.period(itl_ms=10, waiting=0, tokens=c.budget)  # no queue, but steps fill the budget: still backlog
    assert c.budget == 512 + 2 * 128


def test_budget_holds_without_backlog_or_without_headroom():
    c = make(start=512)
    f = Feed(c)
    d = f.period(itl_ms=10, waiting=0, tokens=100)  # steps not full, nobody waiting
    assert d.action == "hold" and c.budget == 512
    d = f.period(itl_ms=22, waiting=4)  # under 25 ms, but above the 80 % headroom
    assert d.action == "hold" and c.budget == 512


def test_budget_stays_within_floor_and_ceiling():
    c = make(floor=64, ceiling=1024, start=512)
    f = Feed(c)
    for _ in range(20):
        f.period(itl_ms=0.5 * c.budget, waiting=2)  # ITL follows the budget: 32 ms over at the floor
        assert 64 <= c.budget <= 1024
    assert c.budget == 64
    for _ in range(40):
        f.period(itl_ms=1, waiting=2)
        assert 64 <= c.budget <= 1024
    assert c.budget == 1024


def test_aimd_settles_around_the_budget_that_holds_the_itl_objective():
    """A fake card whose step time (the ITL) is 5 ms + 10 us per token: 25 ms at 2000 tokens."""
    c = make(floor=64, ceiling=8192, start=512, itl_ms=25)
    f = Feed(c)
    seen = []
    for _ in range(200):
        f.period(itl_ms=5 + 0.01 * c.budget, waiting=10)
        seen.append(c.budget)
    tail = seen[-100:]
    assert max(tail) <= 2000 + c.increase  # never more than one increase past the objective
    assert min(tail) >= 1000 * 0.5  # a halving from just past the edge, no further


def test_admission_cap_tightens_when_ttft_is_over_because_the_queue_grows():
    c = make(start=4096, ceiling=4096)  # the budget has nothing more to give
    f = Feed(c)
    d = f.period(itl_ms=10, ttft_ms=500, waiting=10)
    assert d.cap_action == "tighten" and c.admit_cap == 32
    f.period(itl_ms=10, ttft_ms=600, waiting=20)
    assert c.admit_cap == 16
    for n in range(30, 200, 10):
        f.period(itl_ms=10, ttft_ms=900, waiting=n)
    assert c.admit_cap == 1  # never 0: the engine always makes progress


def test_ttft_counts_the_oldest_waiting_request_before_any_first_token():
    c = make(start=4096, ceiling=4096)
    f = Feed(c)
    d = f.period(itl_ms=10, ttft_ms=None, waiting=10, oldest_ms=900)
    assert d.ttft_p99_s == 0.9 and d.cap_action == "tighten"


def test_ttft_over_with_itl_headroom_raises_the_budget_instead():
    c = make(start=512, ceiling=4096)
    f = Feed(c)
    d = f.period(itl_ms=5, ttft_ms=500, waiting=10)
    assert d.action == "increase" and d.cap_action == "hold" and c.admit_cap is None


def test_ttft_over_but_queue_shrinking_does_not_tighten():
    c = make(start=4096, ceiling=4096)
    f = Feed(c)
    f.period(itl_ms=10, ttft_ms=500, waiting=30)
    assert c.admit_cap == 32
    d = f.period(itl_ms=10, ttft_ms=500, waiting=20)
    assert d.cap_action == "hold" and c.admit_cap == 32


def test_admission_cap_tightens_when_itl_is_over_at_the_floor():
    c = make(floor=64, start=64)
    f = Feed(c)
    d = f.period(itl_ms=60, waiting=0)
    assert d.action == "decrease" and c.budget == 64 and d.cap_action == "tighten" and c.admit_cap == 32


def test_admission_cap_relaxes_and_lifts_once_objectives_are_met():
    c = make(start=4096, ceiling=4096, max_admit=64)
    f = Feed(c)
    for n in (10, 20, 30, 40):
        f.period(itl_ms=10, ttft_ms=500, waiting=n)
    assert c.admit_cap == 4
    caps = [f.period(itl_ms=10, ttft_ms=50, waiting=0).admit_cap for _ in range(5)]
    assert caps == [8, 16, 32, None, None]


def test_itl_only_and_ttft_only_objectives():
    c = make(ttft_ms=None, itl_ms=25)
    f = Feed(c)
    f.period(itl_ms=10, ttft_ms=10_000, waiting=50)  # no TTFT objective: no brake
    assert c.admit_cap is None
    c = make(ttft_ms=200, itl_ms=None, start=512)
    f = Feed(c)
    d = f.period(itl_ms=500, waiting=5)  # no ITL objective: backlog alone raises the budget
    assert d.action == "increase"


def test_build_controller_bounds():
    assert build_controller(None, None, None, None, 64, 0.0) is None
    c = build_controller(200, 25, None, None, 64, 0.0)
    assert (c.floor, c.ceiling, c.budget) == (64, DEFAULT_CEILING, 512)
    c = build_controller(200, None, None, 2048, 64, 0.0)  # the auto-tuned budget is the ceiling
    assert c.ceiling == 2048 and c.itl_slo_s is None and c.ttft_slo_s == 0.2
    c = build_controller(None, 25, 128, 2048, 256, 0.0)  # an explicit budget wins, and bounds the floor
    assert (c.floor, c.ceiling, c.budget) == (128, 128, 128)
