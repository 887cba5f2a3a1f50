"""Preemption by swap, on the CPU: the host pool's copies round-trip block contents exactly; the
scheduler swaps a victim out and back without recomputing it, falls back to recompute when the pool
is full, and frees host slots on cancel; under memory pressure the engine gives the greedy tokens
of an unconstrained run with swaps counted, and leaves every device block and host slot free."""

from __future__ import annotations

import random

import pytest
import torch
import trio
from prometheus_client import generate_latest

from gpu.arena import ArenaShape, KVArena
from gpu.swap import SwapPool, runs
from streamer.allocator import BlockAllocator, HostSlots
from streamer.config import EngineConfig
from streamer.engine import open_engine
from streamer.scheduler import Scheduler, Sequence, Status
from streamer.types import SamplingParams
from tests.conftest import read_tokens

BS = 4


# --- the pool ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, kv_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.int8)])
def test_swap_out_then_in_moves_whole_blocks_exactly(dtype, kv_dtype):
    arena = KVArena(ArenaShape(3, 10, 2, BS, 8), dtype, "cpu", kv_dtype)
    g = torch.Generator().manual_seed(0)
    if arena.quantized:
        arena.kv.copy_(torch.randint(-127, 128, arena.kv.shape, generator=g, dtype=torch.int8))
        arena.scales.copy_(torch.rand(arena.scales.shape, generator=g))
    else:
        arena.kv.copy_(torch.randn(arena.kv.shape, generator=g))
    before = [t.clone() for t in (arena.kv, arena.scales) if t is not None]
    pool = SwapPool(arena, 8)
    out_blocks, slots, in_blocks = [3, 1, 4, 9], [5, 6, 0, 1], [7, 2, 0, 8]  # runs of slots: 5-6, 0-1
    pool.swap_out(out_blocks, slots)
    arena.kv.zero_()
    if arena.scales is not None:
        arena.scales.zero_()
    pool.swap_in(slots, in_blocks)
    for now, was in zip([t for t in (arena.kv, arena.scales) if t is not None], before, strict=True):
        assert torch.equal(now[:, :, in_blocks], was[:, :, out_blocks])  # bit for bit, every layer, K and V
        untouched = [b for b in range(arena.num_blocks) if b not in in_blocks]
        assert not now[:, :, untouched].any()


def test_runs_group_consecutive_slots():
    assert runs([5, 6, 0, 1, 2, 9]) == [(0, 5, 2), (2, 0, 3), (5, 9, 1)]
    assert runs([]) == []


def test_host_slots_lowest_first_and_all_or_nothing():
    h = HostSlots(4)
    assert h.allocate(3) == [0, 1, 2] and h.allocate(2) is None and h.num_free == 1
    h.free([1, 0])
    assert h.allocate(2) == [0, 1]


# --- configuration ---------------------------------------------------------------------------


def test_flags_and_the_pool_size_they_give():
    from streamer.__main__ import build_parser, config_from_args
    from streamer.engine import build_engine

    parse = lambda *a: config_from_args(build_parser().parse_args(["serve", *a]))  # noqa: E731
    assert (parse().preemption, parse().swap_space) == (None, 4.0)
    assert (parse("--preemption", "swap", "--swap-space", "0.5").preemption, parse("--swap-space", "0.5").swap_space) \
        == ("swap", 0.5)
    assert parse("--preemption", "recompute").preemption == "recompute"
    tiny = dict(model="random:tiny-qwen3", kv_blocks=16, max_batch_tokens=64)
    assert build_engine(EngineConfig(**tiny)).runner.swap is None  # the CPU default: recompute
    engine = build_engine(EngineConfig(**tiny, preemption="swap"))  # 4 GiB: capped at the arena's 16 blocks
    assert engine.runner.swap.num_slots == engine.host_slots.num_slots == 16
    assert engine.runner.swap.nbytes == 16 * engine.runner.arena.shape.bytes_per_block(torch.float32)


def test_swap_is_the_default_on_cuda_and_recompute_elsewhere():
    from gpu.models import load_model
    from streamer.build import swap_slots

    loaded = load_model("random:tiny-qwen3", torch.device("cpu"), torch.float32)
    slots = lambda device, **kw: swap_slots(EngineConfig(model="random:tiny-qwen3", **kw), loaded,  # noqa: E731
                                            torch.device(device), torch.float32, 16)
    assert slots("cuda") == 16 and slots("cpu") == 0
    assert slots("cuda", preemption="recompute") == 0 and slots("cpu", preemption="swap") == 16


# --- the scheduler -----------------------------------------------------------------------------


def make(num_blocks=3, slots=8):
    s = Scheduler(BlockAllocator(num_blocks), BS, 64, 8, host_slots=HostSlots(slots))
    a, b = Sequence("a", [1, 2, 3, 4], 8), Sequence("b", [5, 6, 7, 8], 8)
    s.add(a)
    s.add(b)
    return s, a, b


def step(s):
    plan = s.schedule()
    s.update(plan, [7 if c.sample else None for c in plan.chunks])
    return plan


def test_a_victim_is_swapped_out_and_resumes_where_it_stopped():
    s, a, b = make()
    step(s)  # a and b: one full block each, one free
    b_block = b.block_table[0]
    plan = step(s)  # a takes the free block; b needs one too: b, the younger, is swapped out
    assert plan.preempted == (b,) and b.status is Status.WAITING
    assert plan.swap_out == ((b_block, 0),) and b.swap_slots == [0] and b.num_computed == 4
    assert s.host_slots.num_free == 7 and s.allocator.num_free == 1  # b's device block is free
    s.finish(a, "cancelled")
    plan = step(s)
    # b comes back into a fresh block and computes only its generated token: nothing recomputed
    assert [(c.seq.request_id, c.start, c.length) for c in plan.chunks] == [("b", 4, 1)]
    assert plan.swap_in == ((0, b.block_table[0]),) and not b.swap_slots
    assert s.recomputed_tokens == 0 and s.host_slots.num_free == 8
    assert (s.num_swaps_out, s.num_swaps_in, s.swapped_out_blocks, s.swapped_in_blocks) == (1, 1, 1, 1)


def test_a_full_pool_falls_back_to_recompute():
    s, a, b = make(slots=0)
    step(s)
    plan = step(s)
    assert plan.preempted == (b,) and plan.swap_out == () and b.num_computed == 0
    s.finish(a, "cancelled")
    plan = step(s)
    assert [(c.start, c.length) for c in plan.chunks] == [(0, 5)] and s.recomputed_tokens == 4


def test_cancelling_a_swapped_out_request_frees_its_host_slots():
    s, a, b = make()
    step(s)
    step(s)
    assert b.swap_slots and s.host_slots.num_free == 7
    s.finish(b, "cancelled")
    assert s.host_slots.num_free == 8 and not s.waiting
    s.finish(a, "cancelled")
    assert s.allocator.num_free == 3


def test_a_swapped_request_that_does_not_fit_yet_keeps_its_swap():
    s, a, b = make()
    step(s)
    step(s)  # b swapped out; a holds 2 blocks, 1 free
    s.add(c := Sequence("c", [9] * 4, 4))
    plan = step(s)  # b needs 2 blocks (4 computed + its token), 1 is free
    assert b.status is Status.WAITING and b.swap_slots == [0] and b.num_computed == 4
    assert all(ch.seq is not b for ch in plan.chunks) and c.status is Status.WAITING  # nobody overtakes b


# --- the engine under pressure -----------------------------------------------------------------

N, NEW = 40, 32


def prompts():
    rng = random.Random(5)
    return [[rng.randrange(320) for _ in range(rng.randrange(20, 80))] for _ in range(N)]


async def run(config, cancel_after_swaps=0):
    """Greedy tokens of every request, the engine's stats and the /metrics text. With
    `cancel_after_swaps`, every third request is cancelled once that many swaps happened."""
    out = [[] for _ in range(N)]

    async with open_engine(config) as engine:
        params = SamplingParams(max_tokens=NEW, ignore_eos=True)
        gens = [engine.submit(p, params) for p in prompts()]  # all before the step loop runs

        async def canceller():
            while engine.statistics().swaps_out < cancel_after_swaps:
                await trio.sleep(0)
            for gen in gens[::3]:
                await gen.cancel()

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i, gen in enumerate(gens):
                    nursery.start_soon(read_tokens, gen, out[i])
                if cancel_after_swaps:
                    nursery.start_soon(canceller)
        st = engine.statistics()
        assert st.kv.free_blocks == st.kv.total_blocks and st.swap_slots_free == st.swap_slots
        assert engine.snapshot()["swap"]["swapped_out_blocks"] == st.swapped_out_blocks
        per_block = engine.runner.arena.shape.bytes_per_block(engine.runner.arena.kv_dtype)
        text = generate_latest(engine.metrics.registry).decode()
    return out, st, text, per_block


@pytest.fixture(scope="module")
def want():
    """The unconstrained run's tokens (once per module), and the bytes of one KV block."""
    out, st, _, per_block = trio.run(run, EngineConfig(model="random:tiny-qwen3", kv_blocks=2048, max_running=N,
                                                       max_batch_tokens=4096))
    assert st.preemptions == 0
    return out, per_block


def tight(per_block, slots, **kw):
    return EngineConfig(model="random:tiny-qwen3", kv_blocks=32, max_running=N, max_batch_tokens=256,
                        preemption="swap", swap_space=slots * per_block / 2**30, **kw)


@pytest.mark.parametrize("policy", ["fcfs", "priority,first-token,length,fair"])
@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
async def test_swapping_under_pressure_gives_identical_tokens_and_recomputes_nothing(want, policy, overlap):
    """With overlap, victims are swapped out while their last sample is still in flight: they get
    that token, and resume after it."""
    want, per_block = want
    got, st, text, _ = await run(tight(per_block, 32, policy=policy, overlap=overlap))
    assert st.swap_slots == 32
    assert got == want
    assert st.preemptions and st.swaps_out == st.preemptions == st.swaps_in  # every victim swapped, and back
    assert st.swapped_out_blocks == st.swapped_in_blocks > 0
    assert st.recomputed_tokens == 0
    assert f"streamer_swapped_out_blocks_total {float(st.swapped_out_blocks)}" in text
    assert f"streamer_swapped_in_blocks_total {float(st.swapped_in_blocks)}" in text
    assert "streamer_recomputed_tokens_total 0.0" in text


async def test_a_pool_too_small_falls_back_to_recompute_with_identical_tokens(want):
    want, per_block = want
    got, st, _, _ = await run(tight(per_block, 4))
    assert st.swap_slots == 4
    assert got == want
    assert 0 < st.swaps_out < st.preemptions and st.recomputed_tokens > 0


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
async def test_cancelling_under_pressure_frees_every_block_and_slot(want, overlap):
    want, per_block = want
    got, st, _, _ = await run(tight(per_block, 32, overlap=overlap), cancel_after_swaps=3)
    assert st.swaps_out >= 3
    assert all(got[i] == want[i] for i in range(N) if i % 3)  # (the frees are asserted in run)
