"""Overlapped steps: step N+1 is planned and launched before step N's ids are back.

The scheduler alone (plans made ahead of updates), then the engine on the tiny random model:
nothing is lost, nothing comes after a request's end, and steps really are in flight together.
"""

from __future__ import annotations

import pytest
import trio

from streamer.allocator import BlockAllocator
from streamer.config import EngineConfig
from streamer.engine import open_engine
from streamer.scheduler import Scheduler, Sequence, Status
from streamer.types import FinishEvent, SamplingParams
from tests.test_engine import TINY, collect, wait_kv_free

BS = 4


def sched(num_blocks=64, budget=64):
    return Scheduler(BlockAllocator(num_blocks), BS, budget, 8)


def test_the_next_plan_decodes_the_token_in_flight():
    s = sched()
    a = Sequence("a", [1, 2, 3], 3)
    s.add(a)
    p1 = s.schedule()  # prefill, samples token 0
    p2 = s.schedule()  # planned before p1's id is known: decodes it at position 3
    assert [(c.start, c.length, c.sample) for c in p1.chunks] == [(0, 3, True)]
    assert [(c.start, c.length, c.sample) for c in p2.chunks] == [(3, 1, True)]
    assert a.pending == 2 and a.output_ids == [] and a.num_computed == 4
    assert [o.token_id for o in s.update(p1, [10])] == [10]
    p3 = s.schedule()
    assert [(c.start, c.length) for c in p3.chunks] == [(4, 1)]  # the third and last token
    assert s.schedule().chunks == ()  # all 3 sampled or in flight: never planned a fourth time
    assert [(o.token_id, o.finish_reason) for o in s.update(p2, [11]) + s.update(p3, [12])] == [(11, None), (12, "length")]
    assert a.output_ids == [10, 11, 12] and a.status is Status.FINISHED and s.allocator.num_free == 64


def test_a_request_ended_by_eos_gets_nothing_from_the_step_planned_after():
    s = sched()
    a = Sequence("a", [1, 2, 3], 10, frozenset({99}))
    s.add(a)
    p1 = s.schedule()
    p2 = s.schedule()
    out = s.update(p1, [99])
    assert [(o.token_id, o.finish_reason) for o in out] == [(99, "stop")]
    assert s.update(p2, [5]) == []  # the token of the step already in flight is dropped
    assert a.output_ids == [99] and s.allocator.num_free == 64 and not s.has_work()


def test_a_victim_preempted_with_its_sample_in_flight_keeps_that_token():
    s = sched(num_blocks=3, budget=64)
    a, b = Sequence("a", [1, 2, 3, 4], 8), Sequence("b", [5, 6, 7, 8], 8)
    s.add(a)
    s.add(b)
    p1 = s.schedule()  # both prefill 4 tokens (2 blocks), each samples
    assert {c.seq.request_id for c in p1.chunks} == {"a", "b"} and s.allocator.num_free == 1
    p2 = s.schedule()  # both need a second block for position 4: one of them is preempted (recompute)
    (victim,) = p2.preempted
    assert victim.status is Status.WAITING and victim.pending == 1 and victim.num_computed == 0
    s.update(p1, [21, 22])
    assert len(victim.output_ids) == 1 and victim.pending == 0  # the token is kept, not lost
    s.update(p2, [23])
    p3 = s.schedule()
    assert victim not in [c.seq for c in p3.chunks]  # no room until the other is done
    assert victim.num_tokens == 5  # recomputed from prompt + its kept token when admitted


def run_config(overlap=True, **kw):
    return EngineConfig(**{"model": TINY, "kv_blocks": 64, "max_batch_tokens": 64, "overlap": overlap, **kw})


async def test_steps_are_in_flight_together_and_collected_in_order():
    events = []
    async with open_engine(run_config()) as engine:
        runner = engine.runner
        real_launch, real_collect = runner.launch, runner.collect

        def launch(*args):
            handle = real_launch(*args)
            events.append(("launch", id(handle)))
            return handle

        def collect_(handle):
            events.append(("collect", id(handle)))
            return real_collect(handle)

        runner.launch, runner.collect = launch, collect_
        with trio.fail_after(30):
            tokens, done = await collect(engine.generate("hi", SamplingParams(max_tokens=6, ignore_eos=True)))
        await wait_kv_free(engine)
    assert [t.index for t in tokens] == list(range(6)) and done.completion_tokens == 6
    in_flight, most = 0, 0
    for kind, _ in events:
        in_flight += 1 if kind == "launch" else -1
        most = max(most, in_flight)
        assert 0 <= in_flight <= 2
    assert most == 2  # step N+1 was launched before step N was collected
    launched = [h for kind, h in events if kind == "launch"]
    assert [h for kind, h in events if kind == "collect"] == launched  # every step collected, in launch order
    assert len(launched) == 6  # one prefill + 5 decodes: no step planned past the last token


async def test_the_launch_follows_the_config_and_the_cpu_launches_in_a_worker_thread_by_default():
    with pytest.raises(ValueError, match="launch"):
        run_config(launch="gpu")
    for launch, inline in ((None, False), ("thread", False), ("inline", True)):
        async with open_engine(run_config(launch=launch)) as engine:
            assert engine.launch_inline is inline


async def test_inline_launch_polls_the_device_and_lets_other_tasks_run():
    """CUDA's loop shape: launch on the loop's thread, then poll until the step's ids are there.
    While a step is not ready the other tasks run, and they run at every step even when the ids
    are ready at the first look (the loop never holds the thread for a whole generation)."""
    async with open_engine(run_config(launch="inline")) as engine:
        assert engine.launch_inline
        runner = engine.runner
        looks: dict[int, int] = {}
        handles = []  # kept alive, so that no two steps' handles share an id()

        def ready(handle):  # each step is "on the device" for its first two looks
            handles.append(handle)
            looks[id(handle)] = looks.get(id(handle), 0) + 1
            return looks[id(handle)] > 2

        runner.ready = ready
        ticks = 0
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:

                async def ticker():
                    nonlocal ticks
                    while True:
                        ticks += 1
                        await trio.sleep(0)

                nursery.start_soon(ticker)
                tokens, done = await collect(engine.generate("hi", SamplingParams(max_tokens=20, ignore_eos=True)))
                nursery.cancel_scope.cancel()
        await wait_kv_free(engine)
    assert [t.index for t in tokens] == list(range(20)) and done.completion_tokens == 20
    assert len(looks) == 20 and set(looks.values()) == {3}  # every step collected, after it was ready
    assert ticks >= 3 * 20  # the ticker ran at least once a look


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
async def test_eos_found_in_step_n_gives_no_token_from_step_n_plus_1(overlap, monkeypatch):
    async with open_engine(run_config(overlap)) as engine:
        with trio.fail_after(30):
            free, _ = await collect(engine.generate("x", SamplingParams(max_tokens=20, ignore_eos=True)))
            ids = [t.token_id for t in free]
            k = next(i for i in range(3, 20) if ids[i] not in ids[:i])  # a token first seen at index k
            monkeypatch.setattr(type(engine.loaded), "eos_token_ids", property(lambda _: frozenset({ids[k]})))
            planned = []
            real_update = engine.scheduler.update

            def update(plan, sampled):
                planned.extend(len(c.seq.output_ids) for c in plan.chunks if c.seq.finish_reason == "stop")
                return real_update(plan, sampled)

            engine.scheduler.update = update
            tokens, done = await collect(engine.generate("x", SamplingParams(max_tokens=20)))
        await wait_kv_free(engine)
    assert [t.token_id for t in tokens] == ids[: k + 1]  # up to and with the EOS, nothing after
    assert done.finish_reason == "stop" and done.completion_tokens == k + 1
    assert planned == ([k + 1] if overlap else [])  # with overlap, the step after was planned with it


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
async def test_closing_the_engine_mid_generation_ends_it_at_once(overlap):
    """Leaving `open_engine` while a request decodes stops the step loop after the step at hand
    (its device call is shielded; the cancel lands right after) and ends the request."""
    events = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            async with open_engine(run_config(overlap)) as engine:
                gen = engine.generate("x", SamplingParams(max_tokens=900, ignore_eos=True))
                three = trio.Event()

                async def read():
                    async with gen:
                        async for ev in gen:
                            events.append(ev)
                            if len(events) == 3:
                                three.set()

                nursery.start_soon(read)
                await three.wait()
    done = events[-1]
    assert isinstance(done, FinishEvent) and done.finish_reason == "error" and done.error.code == "shutting_down"
    assert 3 <= done.completion_tokens < 900 and engine.live_requests == 0


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
async def test_padded_static_batches_give_the_same_tokens_and_do_the_padded_work(overlap):
    """The static baseline padded as the benchmark issue defines it (prompts to the batch's
    longest, finished rows decoding to the batch's end): the same tokens as unpadded static
    batches, more tokens computed, every block back."""
    import random

    rng = random.Random(3)
    prompts = [[rng.randrange(1, 300) for _ in range(rng.randrange(2, 40))] for _ in range(10)]
    lengths = [rng.randrange(1, 20) for _ in prompts]
    runs = {}
    for padded in (False, True):
        config = run_config(overlap, static_batch=4, static_padding=padded, max_batch_tokens=512, kv_blocks=256)
        async with open_engine(config) as engine:
            gens = [engine.submit(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in zip(prompts, lengths, strict=True)]
            out = []
            with trio.fail_after(60):
                for gen in gens:
                    out.append([ev.token_id for ev in (await collect(gen))[0]])
            await wait_kv_free(engine)
            steps = list(engine.metrics.steps)
            runs[padded] = (out, sum(s.tokens for s in steps), len(steps))
    (plain, plain_tokens, plain_steps), (padded, padded_tokens, padded_steps) = runs[False], runs[True]
    assert padded == plain and [len(o) for o in padded] == lengths
    assert padded_tokens > plain_tokens
    # (overlapped: a batch's last request ends after the next step was planned with its padding rows)
    assert plain_steps <= padded_steps <= plain_steps + (3 if overlap else 0)  # 3 batches


async def test_a_steps_tokens_reach_their_readers_before_the_next_launch():
    """On the loop's own thread, the next step's host work (scheduling, packing, an eager launch)
    holds the event loop. The tokens just collected are taken by their readers first, so a slow
    launch delays the next token, never the one already computed."""
    async with open_engine(run_config(launch="inline")) as engine:
        assert engine.launch_inline
        runner = engine.runner
        real_launch = runner.launch
        received, seen_at_launch = [], []

        def launch(*args, **kw):
            seen_at_launch.append(len(received))
            return real_launch(*args, **kw)

        runner.launch = launch
        with trio.fail_after(30):
            gen = engine.generate("hi", SamplingParams(max_tokens=20, ignore_eos=True))
            async with gen:
                async for ev in gen:
                    if not isinstance(ev, FinishEvent):
                        received.append(ev.index)
        await wait_kv_free(engine)
    assert received == list(range(20)) and len(seen_at_launch) == 20
    # With overlap, launch m comes after step m - 2 was collected: tokens 0 .. m - 2 are read by then.
    assert seen_at_launch[2:] == list(range(1, 19)), seen_at_launch
