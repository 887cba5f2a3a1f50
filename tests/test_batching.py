"""Who sets the step budget, on the tiny model: auto-tuning at warm-up, an explicit budget, the
latency controller wired into the step loop, and the command-line flags."""

from __future__ import annotations

import pytest
import trio

from streamer.build import TUNE_CANDIDATES
from streamer.config import DEFAULT_BATCH_TOKENS, EngineConfig
from streamer.engine import open_engine
from streamer.types import FinishEvent, SamplingParams

TINY = "random:tiny-qwen3"


async def run_all(engine, n: int, max_tokens: int) -> list[FinishEvent]:
    """n generations submitted together; their FinishEvents in order."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    gens = [engine.generate(f"prompt {i}", params) for i in range(n)]
    done = []
    for gen in gens:
        async with gen:
            done.append([ev async for ev in gen][-1])
    return done


async def test_auto_tune_picks_a_candidate_and_leaves_every_block_free():
    async with open_engine(EngineConfig(model=TINY, kv_blocks=64, auto_tune=True)) as engine:
        tuned = engine.tuned
        assert tuned is not None and tuned.budget in TUNE_CANDIDATES
        assert set(tuned.tok_s) == {256, 512, 1024}  # the larger candidates do not fit 64 blocks of 16
        assert all(v > 0 for v in tuned.tok_s.values())
        assert engine.scheduler.max_batch_tokens == tuned.budget and engine.budget_source == "auto-tune"
        kv = engine.kv_statistics()
        assert kv.free_blocks == kv.total_blocks == 64
        b = engine.batching()
        assert b["source"] == "auto-tune" and b["auto_tune"]["budget"] == tuned.budget
        with trio.fail_after(30):
            done = await run_all(engine, 3, 5)
        assert [d.finish_reason for d in done] == ["length"] * 3


async def test_explicit_budget_wins_and_the_cpu_does_not_tune_by_default():
    async with open_engine(EngineConfig(model=TINY, kv_blocks=64, auto_tune=True, max_batch_tokens=96)) as engine:
        assert engine.tuned is None and engine.scheduler.max_batch_tokens == 96 and engine.budget_source == "config"
    async with open_engine(EngineConfig(model=TINY, kv_blocks=64)) as engine:
        assert engine.tuned is None and engine.budget_source == "default"
        assert engine.scheduler.max_batch_tokens == DEFAULT_BATCH_TOKENS and engine.controller is None
        assert engine.batching()["controller"] is None


async def test_controller_steers_the_scheduler_from_the_step_loop():
    # A TTFT objective long enough that no request here is refused for waiting (at 200 ms, a busy
    # CI box refused the fourth one, queued behind a running cap of 1): this test is the wiring.
    config = EngineConfig(model=TINY, kv_blocks=64, max_running=8, slo_ttft_ms=60_000, slo_itl_ms=25)
    async with open_engine(config) as engine:
        c = engine.controller
        assert c is not None and engine.budget_source == "controller"
        assert (c.floor, c.ceiling, c.budget) == (8, 8192, 8192) and engine.scheduler.max_batch_tokens == c.budget
        c.period_s = 0.0  # decide every few steps: this test is about the wiring, not the timing
        c.budget, c.running_cap = 40, 1  # as if it had decided so; applied before the next schedule()
        with trio.fail_after(60):
            done = await run_all(engine, 4, 12)  # all four in the inbox before the first step
        assert [d.finish_reason for d in done] == ["length"] * 4
        first = engine.metrics.steps[0]
        assert (first.running, first.waiting) == (1, 3)  # the cap of 1 held the first step
        assert c.decisions > 0 and c.last.steps >= 4
        assert c.floor <= c.budget <= c.ceiling
        assert engine.batching()["running_cap"] == c.running_cap
        stats = engine.batching()["controller"]
        assert stats["slo_ttft_ms"] == 60_000 and stats["slo_itl_ms"] == 25 and stats["last"]["action"] in (
            "decrease", "increase", "restore", "hold")
        assert 1 <= stats["last"]["running"] <= 4
        kv = engine.kv_statistics()
        assert kv.free_blocks == kv.total_blocks


async def test_a_request_not_started_within_half_its_ttft_objective_is_refused():
    """The controller's admission rule: with the one slot taken, a second request waits; once it
    has waited half the TTFT objective it is refused as overloaded (its client hears at once),
    while the running one streams on, and nothing is left behind."""
    config = EngineConfig(model=TINY, kv_blocks=64, max_running=8, slo_ttft_ms=200)
    async with open_engine(config) as engine:
        c = engine.controller
        assert c.shed_after_s == 0.1
        c.period_s, c.running_cap = 3600.0, 1  # no decision in this test: the cap of 1 stays
        params = SamplingParams(max_tokens=900, ignore_eos=True)
        with trio.fail_after(60):
            async with engine.generate("the long one", params) as first:
                await first.__anext__()  # running
                t0 = trio.current_time()
                async with engine.generate("the late one", params) as late:
                    events = [ev async for ev in late]
                waited = trio.current_time() - t0
                assert len(events) == 1 and events[0].finish_reason == "error"
                assert events[0].error.code == "overloaded" and events[0].completion_tokens == 0
                assert 0.1 <= waited < 1.0
                assert c.shed == 1 and engine.batching()["controller"]["shed"] == 1
                assert await first.__anext__()  # the running one was not touched
            while (kv := engine.kv_statistics()).free_blocks != kv.total_blocks:  # the cancel lands
                await trio.sleep(0.01)
        assert not engine.scheduler.waiting and not engine.scheduler.running


async def test_without_a_ttft_objective_nothing_is_refused_for_waiting():
    config = EngineConfig(model=TINY, kv_blocks=64, max_running=8, slo_itl_ms=25)
    async with open_engine(config) as engine:
        c = engine.controller
        assert c.shed_after_s is None
        c.period_s, c.running_cap = 3600.0, 1
        with trio.fail_after(60):
            done = await run_all(engine, 3, 40)  # each waits for the one before it
        assert [d.finish_reason for d in done] == ["length"] * 3 and c.shed == 0


def test_flags():
    from streamer.__main__ import build_parser, config_from_args

    parse = lambda *a: config_from_args(build_parser().parse_args(["serve", *a]))  # noqa: E731
    c = parse()
    assert c.max_batch_tokens is None and c.auto_tune is None and c.slo_ttft_ms is None and c.slo_itl_ms is None
    c = parse("--slo-ttft-ms", "200", "--slo-itl-ms", "25", "--no-auto-tune", "--max-batch-tokens", "1024")
    assert (c.slo_ttft_ms, c.slo_itl_ms, c.auto_tune, c.max_batch_tokens) == (200.0, 25.0, False, 1024)
    assert parse("--auto-tune").auto_tune is True
    with pytest.raises(ValueError):
        EngineConfig(slo_itl_ms=0)
