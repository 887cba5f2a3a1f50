"""The latency controller alone, on a fake clock with synthetic observations: the budget starts at
its ceiling and is cut only while cuts shorten the gaps; otherwise the running cap holds ITL, and
both grow back with ITL headroom."""

from __future__ import annotations

from streamer.controller import (
    COOLDOWN,
    DEFAULT_CEILING,
    Controller,
    Decision,
    build_controller,
    p99,
    refused_past_p99,
)

MS = 0.001


def make(ttft_ms=200.0, itl_ms=25.0, floor=64, ceiling=4096, start=None, max_running=256) -> Controller:
    return Controller(ttft_slo_s=ttft_ms and ttft_ms * MS, itl_slo_s=itl_ms and itl_ms * MS, floor=floor,
                      ceiling=ceiling, start=start, max_running=max_running, now=0.0, period_s=0.5)


class Feed:
    """Synthetic traffic: each period, 8 steps of 1/16 s (exact in binary) with `tokens` each."""

    def __init__(self, c: Controller) -> None:
        self.c, self.t = c, 0.0

    def period(self, itl_ms=10.0, ttft_ms=None, waiting=0, oldest_ms=0.0, tokens=None, running=64, prefill=None):
        """`prefill`: the prompt tokens of each step (None: not reported, as the unit tests of the
        rest of the rule leave it); a step without any ends a decode-only loop cycle of 1/16 s."""
        for _ in range(8):
            self.t += 1 / 16
            for _ in range(8):
                self.c.observe_token(itl_ms * MS)
            if ttft_ms is not None:
                self.c.observe_ttft(ttft_ms * MS)
            self.c.observe_step(self.t, self.c.budget if tokens is None else tokens, running, waiting, oldest_ms * MS,
                                prefill)
        return self.c.last


def host_bound_itl_ms(running: int) -> float:
    """A fake host-bound card: the gap grows with the requests running, not with the budget."""
    return 10 + 30 * running / 256


def test_p99_is_nearest_rank():
    assert p99([]) is None
    assert p99([3.0, 1.0, 2.0]) == 3.0
    assert p99([float(i) for i in range(1000)]) == 990.0


def test_no_decision_before_a_period_and_enough_steps():
    c = make()
    c.observe_token(1.0)  # far over the ITL objective
    c.observe_step(0.4, 512, 8, 0, 0.0)  # not a period yet
    c.observe_step(0.6, 512, 8, 0, 0.0)  # a period, but only two steps
    assert c.budget == 4096 and c.decisions == 0


def test_build_controller_starts_at_the_ceiling():
    assert build_controller(None, None, None, None, 64, 0.0) is None
    c = build_controller(200, 25, None, None, 64, 0.0)
    assert (c.floor, c.ceiling, c.budget, c.running_cap, c.running_floor) == (64, DEFAULT_CEILING, DEFAULT_CEILING,
                                                                               None, 8)
    c = build_controller(200, None, None, 2048, 256, 0.0)  # the auto-tuned budget is the ceiling and the start
    assert (c.ceiling, c.budget, c.max_running) == (2048, 2048, 256)
    assert c.itl_slo_s is None and c.ttft_slo_s == 0.2
    c = build_controller(None, 25, 128, 2048, 256, 0.0)  # an explicit budget wins, and bounds the floor
    assert (c.floor, c.ceiling, c.budget) == (128, 128, 128)
    assert build_controller(None, 25, None, None, 4, 0.0).running_floor == 4  # never above max_running


def test_budget_halves_while_cuts_shorten_the_gaps():
    """A fake card whose ITL is proportional to the budget: each cut works, so cuts go on until
    ITL meets its objective; the running cap is never touched."""
    c = make(ceiling=4096)
    f = Feed(c)
    seen = [f.period(itl_ms=90 * c.budget / 4096, waiting=5, running=256) for _ in range(3)]
    assert [(d.action, d.budget) for d in seen] == [("decrease", 2048), ("decrease", 1024), ("hold", 1024)]
    assert [d.cap_action for d in seen] == ["hold"] * 3 and c.running_cap is None  # 22.5 ms: no headroom, holds


def test_an_ineffective_cut_is_undone_and_the_running_cap_takes_over():
    """Host-bound ITL: one budget cut, undone the next period, and the running cap falls from the
    running count until ITL meets its objective; the budget stays at its ceiling."""
    c = make(ceiling=4096, max_running=256)
    f = Feed(c)
    d = f.period(itl_ms=host_bound_itl_ms(256), ttft_ms=150, waiting=5, running=256)
    assert (d.action, c.budget, d.cap_action) == ("decrease", 2048, "hold")
    d = f.period(itl_ms=host_bound_itl_ms(256), ttft_ms=150, waiting=5, running=256)  # 40 ms still
    assert (d.action, c.budget, d.cap_action, c.running_cap) == ("restore", 4096, "tighten", 217)
    caps = []
    for _ in range(6):  # as if the running count fell to the cap within a period
        running = c.running_cap
        caps.append(f.period(itl_ms=host_bound_itl_ms(running), ttft_ms=150, waiting=5, running=running).running_cap)
    assert caps == [184, 156, 132, 112, 112, 112]  # 112 running: 23.1 ms, under 25 but without headroom
    assert c.budget == 4096


def test_while_the_cap_is_engaged_itl_does_not_cut_the_budget():
    """After the cool-down the budget is not probed again while the cap is engaged: the falling
    running count would make any budget cut look effective."""
    c = make(ceiling=4096, max_running=256)
    f = Feed(c)
    f.period(itl_ms=40, waiting=5, running=256)
    f.period(itl_ms=40, waiting=5, running=256)
    assert (c.budget, c.running_cap) == (4096, 217)
    for _ in range(COOLDOWN + 2):
        d = f.period(itl_ms=22, waiting=5, running=c.running_cap)  # no headroom: both hold
        assert (d.action, d.cap_action) == ("hold", "hold")
    d = f.period(itl_ms=30, waiting=5, running=217)  # over again, cool-down long over
    assert (d.action, c.budget, d.cap_action, c.running_cap) == ("hold", 4096, "tighten", 184)


def test_the_running_cap_relaxes_to_none_with_headroom_and_waiting_requests():
    c = make(ceiling=4096, max_running=256)
    f = Feed(c)
    f.period(itl_ms=40, waiting=5, running=256)
    f.period(itl_ms=40, waiting=5, running=256)
    assert c.running_cap == 217
    d = f.period(itl_ms=10, waiting=0, running=100)  # headroom, but nobody waits: the cap does not bind
    assert d.cap_action == "hold" and c.running_cap == 217
    caps = [f.period(itl_ms=10, waiting=5, running=217).running_cap for _ in range(4)]
    assert caps == [233, 249, None, None]  # +256/16 a period, lifted at max_running
    assert c.last.cap_action == "hold"


def test_ttft_over_with_itl_headroom_grows_the_budget_and_the_cap():
    c = make(start=1024, ceiling=4096, max_running=256)
    c.running_cap = 100  # as if ITL had brought them down earlier
    f = Feed(c)
    d = f.period(itl_ms=10, ttft_ms=500, waiting=0, tokens=10, running=100)  # TTFT alone is the demand
    assert (d.action, c.budget, d.cap_action, c.running_cap) == ("increase", 1024 + 128, "relax", 116)


def test_ttft_over_relaxes_the_cap_even_without_itl_headroom():
    """TTFT over, ITL between the headroom and its objective: the budget holds, the cap relaxes."""
    c = make(start=2048, ceiling=4096)
    c.running_cap = 100
    f = Feed(c)
    d = f.period(itl_ms=22, ttft_ms=3000, waiting=500, running=100)
    assert (d.action, c.budget, d.cap_action, c.running_cap) == ("hold", 2048, "relax", 116)


def test_overload_never_tightens_the_cap_and_lifts_it():
    """Both objectives over, the budget shown not to be the lever: the cap does not fall (that
    would starve the queue); an engaged cap climbs back to none."""
    c = make(ceiling=4096, max_running=256)
    f = Feed(c)
    d = f.period(itl_ms=40, ttft_ms=3000, waiting=50, running=256)
    assert (d.action, c.budget, d.cap_action) == ("decrease", 2048, "hold")
    d = f.period(itl_ms=40, ttft_ms=3000, waiting=50, running=256)  # the cut did not work
    assert (d.action, c.budget, d.cap_action, c.running_cap) == ("restore", 4096, "hold", None)
    c.running_cap = 200  # engaged earlier, while TTFT was fine
    caps = [f.period(itl_ms=40, ttft_ms=3000, waiting=50, running=200).running_cap for _ in range(5)]
    assert caps == [216, 232, 248, None, None]


def test_budget_holds_without_backlog_or_without_headroom():
    c = make(start=1024, ceiling=4096)
    f = Feed(c)
    d = f.period(itl_ms=10, waiting=0, tokens=100)  # steps not full, nobody waiting, TTFT fine
    assert d.action == "hold" and c.budget == 1024
    d = f.period(itl_ms=22, waiting=4)  # under 25 ms, but above the 80 % headroom
    assert d.action == "hold" and c.budget == 1024
    d = f.period(itl_ms=10, waiting=0, tokens=c.budget)  # nobody waits, but steps fill the budget
    assert d.action == "increase" and c.budget == 1024 + 128


def test_bounds_hold_when_nothing_brings_itl_under():
    """ITL over whatever either knob does: the cap stops at its floor, the budget at one probe's
    cut; the budget probe comes back only once the cap has nothing left to give."""
    c = make(floor=64, ceiling=1024, max_running=64)
    f = Feed(c)
    budgets, caps = [], []
    for _ in range(40):
        f.period(itl_ms=60, waiting=5, running=c.running_cap or 64)
        budgets.append(c.budget)
        caps.append(c.running_cap)
    assert caps[:11] == [None, 54, 45, 38, 32, 27, 22, 18, 15, 12, 10]
    assert min(c for c in caps if c is not None) == 8 and caps[-1] == 8
    assert min(budgets) == 512 and budgets[:2] == [512, 1024]
    # the first probe (period 0), then, the cap at its floor from period 11, one after each
    # cool-down that the previous failed probe started: a probe and its undo take 2 periods
    assert [i for i, b in enumerate(budgets) if b == 512] == [k * (2 + COOLDOWN) for k in range(4)]


def test_budget_stays_within_floor_and_ceiling():
    c = make(floor=64, ceiling=1024)
    f = Feed(c)
    for _ in range(20):
        f.period(itl_ms=0.05 * c.budget, waiting=2)  # ITL follows the budget: 3.2 ms at the floor
        assert 64 <= c.budget <= 1024
    c = make(floor=64, ceiling=1024, start=64)
    f = Feed(c)
    for _ in range(40):
        f.period(itl_ms=1, waiting=2)
        assert 64 <= c.budget <= 1024
    assert c.budget == 1024


def test_aimd_settles_around_the_budget_that_holds_the_itl_objective():
    """A fake compute-bound card whose step time (the ITL) is 5 ms + 10 us per token: 25 ms at
    2000 tokens. The cuts all work, so the cap is never engaged."""
    c = make(floor=64, ceiling=8192, itl_ms=25)
    f = Feed(c)
    seen = []
    for _ in range(200):
        f.period(itl_ms=5 + 0.01 * c.budget, waiting=10)
        seen.append(c.budget)
    assert seen[:3] == [4096, 2048, 1024]
    tail = seen[-100:]
    assert max(tail) <= 2000 + c.increase  # never more than one increase past the objective
    assert min(tail) >= 1000 * 0.5  # a halving from just past the edge, no further
    assert c.running_cap is None


def test_ttft_counts_the_oldest_waiting_request_before_any_first_token():
    c = make(start=1024, ceiling=4096)
    f = Feed(c)
    d = f.period(itl_ms=10, ttft_ms=None, waiting=10, oldest_ms=900)
    assert d.ttft_p99_s == 0.9 and d.action == "increase"


def test_itl_only_and_ttft_only_objectives():
    c = make(ttft_ms=None, itl_ms=25, start=1024)
    f = Feed(c)
    d = f.period(itl_ms=22, ttft_ms=10_000, waiting=0, tokens=10)  # no TTFT objective: no demand from it
    assert (d.action, d.cap_action) == ("hold", "hold")
    c = make(ttft_ms=200, itl_ms=None, start=512)
    f = Feed(c)
    for _ in range(5):
        d = f.period(itl_ms=500, waiting=5, running=256)  # no ITL objective: the cap never engages
    assert d.action == "increase" and c.budget == 512 + 5 * 128 and c.running_cap is None


def test_stats_show_the_last_decision():
    c = make()
    assert c.stats()["last"] is None
    f = Feed(c)
    f.period(itl_ms=40, waiting=5, running=200)
    s = c.stats()
    assert (s["slo_itl_ms"], s["floor"], s["ceiling"], s["running_floor"], s["decisions"]) == (25, 64, 4096, 8, 1)
    assert s["last"] == {"itl_p99_ms": 40.0, "ttft_p99_ms": None, "decode_step_p99_ms": None, "running": 200,
                         "waiting": 5, "refused": 0, "steps": 8, "action": "decrease", "cap_action": "hold"}
    assert s["shed"] == 0 and c.shed_after_s == 0.1


def prefill_bound(c: Controller, t: float, itl_ms: float, running: int, waiting: int) -> Decision:
    """One period in which decode-only steps end every 2 ms and every fourth step carries a prompt
    chunk that holds the gaps at `itl_ms`: the budget, not the running count, sets ITL."""
    for i in range(16):
        t += 0.002 if i % 4 else itl_ms * MS
        for _ in range(4):
            c.observe_token(2 * MS if i % 4 else itl_ms * MS)
        c.observe_step(t, c.budget, running, waiting, 0.0, 0 if i % 4 else 512)
    c.observe_step(t + 0.5, c.budget, running, waiting, 0.0, 512)  # past the period (a prompt step): decides
    return c.last


def test_prefill_bound_gaps_cut_the_budget_even_while_the_cap_is_engaged():
    """Decode-only steps well inside the objective while ITL P99 is over it: the long gaps are the
    steps carrying prompt chunks. The budget is cut, the cap is not tightened (fewer running would
    not shorten those steps) and, with requests waiting, it relaxes."""
    c = make(ceiling=4096, max_running=256)
    c.running_cap = 64  # engaged, as an earlier host-bound period would leave it
    d = prefill_bound(c, 0.0, itl_ms=40, running=64, waiting=5)
    assert d.decode_step_p99_s is not None and d.decode_step_p99_s < 0.8 * 25 * MS
    assert (d.action, c.budget) == ("decrease", 2048)
    assert (d.cap_action, c.running_cap) == ("relax", 80)


def test_slow_decode_only_steps_still_tighten_the_cap():
    """Host-bound: the decode-only steps themselves take as long as the objective, so the running
    count is the lever, as without the step breakdown."""
    c = make(ceiling=4096, max_running=256)
    f = Feed(c)
    c.running_cap = 200
    d = f.period(itl_ms=40, ttft_ms=150, waiting=5, running=200, prefill=0)  # 1/16 s decode-only cycles
    assert d.decode_step_p99_s == 1 / 16 and (d.action, d.cap_action, c.running_cap) == ("hold", "tighten", 170)


def test_p99_is_the_nearest_rank_of_the_sorted_samples():
    import random

    rng = random.Random(3)
    assert p99([]) is None and p99([0.5]) == 0.5
    for n in (2, 99, 100, 101, 1000, 25_000):
        xs = [rng.expovariate(50) for _ in range(n)]
        assert p99(xs) == sorted(xs)[min(n - 1, int(0.99 * n))]


def test_more_than_one_percent_refused_is_a_ttft_p99_over_its_objective():
    assert not refused_past_p99(0, 100)
    assert refused_past_p99(1, 0) and refused_past_p99(1, 99)  # 1 in 100: the P99 is the refused one
    assert not refused_past_p99(1, 199) and refused_past_p99(2, 198)  # at 200, 1% is 2


def test_refusals_stop_the_cap_tightening_for_itl_and_relax_it():
    """Past capacity the served requests' TTFTs stay under the objective because the late ones are
    refused: those refusals are the queue's pressure, so ITL over tightens the cap no further and an
    engaged cap climbs back, as with TTFT over (the budget is restored first, as there)."""
    c = make(ceiling=4096, max_running=256)
    c.running_cap = 160  # engaged for ITL earlier
    f = Feed(c)
    c.observe_shed(3)  # with the 8 served in the period below under the objective: 3 of 11 refused
    d = f.period(itl_ms=40, ttft_ms=120, waiting=20, running=160)
    assert d.refused == 3 and (d.cap_action, c.running_cap) == ("relax", 176)
    assert c.stats()["shed"] == 3 and c.stats()["last"]["refused"] == 3
    d = f.period(itl_ms=40, ttft_ms=120, waiting=20, running=176)  # nobody refused: ITL steers again
    assert d.refused == 0 and d.cap_action == "tighten" and c.running_cap == int(0.85 * 176)


def test_a_refusal_under_one_percent_leaves_the_cap_to_itl():
    c = make(ceiling=4096, max_running=256)
    c.running_cap = 160
    f = Feed(c)
    for _ in range(192):  # 192 + 8 served in the period below: 1 refused of 201 is under 1%
        c.observe_ttft(0.1)
    c.observe_shed(1)
    d = f.period(itl_ms=40, ttft_ms=120, waiting=20, running=160)
    assert d.refused == 1 and d.cap_action == "tighten" and c.running_cap == 136
