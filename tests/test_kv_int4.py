"""int4 KV cache on the CPU: the packed format (nibbles, group scales) against a plain torch
reference, attention over an int4 arena against a float arena, arena sizing, and the engine end to
end with kv_dtype="int4": against its own reference path, under preemption by recompute and by
swap, and with prefix caching."""

from __future__ import annotations

import random

import pytest
import torch

from gpu.arena import INT4, ArenaShape, KVArena, blocks_that_fit, kv_bytes_per_token, pack_int4, unpack_int4
from gpu.attention import build_metadata, gather_history, write_kv
from gpu.models import load_model
from gpu.runner import ModelRunner, SeqInput
from gpu.sampler import SampleSpec
from gpu.swap import SwapPool
from streamer.config import EngineConfig
from tests.test_kv_int8 import _greedy, _seed, errors_against_float_kv

TINY = "random:tiny-qwen3"  # D=16: one group a row


def test_two_codes_a_byte_low_nibble_first():
    codes = torch.tensor([[1, -1, 7, -7, 0, -8, 3, 2]], dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0xF1, 0x97, 0x80, 0x23]]
    assert torch.equal(unpack_int4(packed), codes)
    every = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.stack(torch.meshgrid(every, every, indexing="ij"), -1).reshape(-1, 2)  # all 256 bytes
    assert sorted(pack_int4(pairs).flatten().tolist()) == list(range(256))
    assert torch.equal(unpack_int4(pack_int4(pairs)), pairs)


def _reference_scale(x: torch.Tensor, group: int) -> torch.Tensor:
    """Float16 scales by division in float64: per group, absmax / 7 rounded to float16."""
    return (x.double().unflatten(-1, (-1, group)).abs().amax(-1) / 7).half()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_quantize_matches_a_float64_reference_and_errors_are_half_a_step(dtype, d):
    seed = _seed()
    groups = d // 32
    x = (torch.randn(50, 3, d) * torch.rand(50, 3, 1) * 20).to(dtype)
    x[::7, :, 5] = 1e4  # an outlier channel in some rows: only its own group's scale grows
    codes, scale = INT4.quantize(x)
    assert codes.shape == (50, 3, d // 2) and codes.dtype == torch.uint8
    assert scale.shape == (50, 3, groups) and scale.dtype == torch.float16
    want_scale = _reference_scale(x, 32)
    # absmax * (1/7) in float32, then float16, against absmax / 7 in float64, then float16: at most
    # one float16 step apart (where float32's rounding moves a value across a float16 tie)
    assert ((scale.double() - want_scale.double()).abs() <= want_scale.double() * 2**-10).all(), f"seed={seed}"
    got = unpack_int4(codes)
    # x * (1/scale) in float32 against x / scale in float64, over the scales it chose: they may
    # round apart only where the quotient is within float32's error of a tie (n.5), by one step
    g, s = x.double().unflatten(-1, (-1, 32)), scale.double().unsqueeze(-1)
    q = torch.where(s > 0, g / s, 0.0).flatten(-2)
    want_codes = q.round().clamp(-7, 7).to(torch.int8)
    near_tie = (q.abs() - q.abs().floor() - 0.5).abs() < 1e-5
    assert not ((got != want_codes) & ~near_tie).any() and (got - want_codes).abs().max() <= 1, f"seed={seed}"
    assert got.abs().unflatten(-1, (groups, 32)).amax(-1).eq(7).all(), f"seed={seed}"  # absmax -> +-7
    s = scale.float().repeat_interleave(32, -1)
    err = (INT4.dequantize(codes, scale, torch.float32) - x.float()).abs()
    assert (err <= s * 0.5 * (1 + 1e-3)).all(), f"seed={seed}"  # round to nearest
    assert (err > s * 0.4).any(), f"seed={seed}"  # the bound is tight: not truncation
    assert (scale[::7, :, 0] > 50 * scale[::7, :, 1:].amax(-1)).all(), f"seed={seed}"


def test_zero_groups_ties_and_saturation():
    x = torch.zeros(2, 64)
    x[1, 40] = 3.0  # group 1 of row 1 non-zero, the rest zero
    codes, scale = INT4.quantize(x)
    assert not scale[0].any() and scale[1, 0] == 0 and scale[1, 1] == torch.tensor(3 / 7).half()
    assert not INT4.dequantize(codes, scale, torch.float32).isnan().any()
    assert unpack_int4(codes)[1].nonzero().flatten().tolist() == [40]
    # scale 1 exactly (absmax 7): ties round to even, like CUDA's rintf
    row = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -2.5, 6.5, -7.0] + [0.0] * 24])
    assert unpack_int4(INT4.quantize(row)[0])[0, :8].tolist() == [7, 0, 2, 2, 0, -2, 6, -7]
    # past the float16 range the scale saturates at 65504 and the codes clamp: no inf, no NaN
    big = torch.full((1, 32), 1e9)
    codes, scale = INT4.quantize(big)
    assert scale.item() == 65504 and unpack_int4(codes).eq(7).all()
    assert INT4.dequantize(codes, scale, torch.float32).isfinite().all()


def test_int4_arena_layout_scales_and_sizing():
    shape = ArenaShape(num_layers=3, num_blocks=5, num_kv_heads=2, block_size=16, head_dim=64)
    arena = KVArena(shape, torch.bfloat16, "cpu", torch.int4)
    assert arena.kv.dtype == torch.uint8 and arena.kv.shape == (3, 2, 5, 2, 16, 32)
    assert arena.scales.dtype == torch.float16 and arena.scales.shape == (3, 2, 5, 2, 16, 2)
    assert arena.nbytes == shape.bytes_per_block(torch.int4) * 5
    # D/2 bytes of codes + D/32 float16 scales per (token, head, K or V), against 2 * D for bf16
    assert kv_bytes_per_token(24, 2, 64, torch.int4) == 24 * 2 * 2 * 36
    for layers, hkv, d in ((30, 3, 64), (24, 2, 64), (32, 8, 128)):  # smollm2, qwen2.5-0.5b, llama-3-8b
        ratio = kv_bytes_per_token(layers, hkv, d, torch.bfloat16) / kv_bytes_per_token(layers, hkv, d, torch.int4)
        assert ratio == 128 / 36 > 3.5
    fit = {dt: blocks_that_fit(10 * 2**30, num_layers=24, num_kv_heads=2, block_size=16, head_dim=64, dtype=dt)
           for dt in (torch.bfloat16, torch.int4)}
    assert fit[torch.int4] == 10 * 2**30 // (16 * 3456) and fit[torch.int4] > 3.5 * fit[torch.bfloat16]
    with pytest.raises(ValueError, match="int4"):
        KVArena(shape, torch.float32, "cpu", torch.uint8)
    # writes land at the slot's codes and at the same slot's scales
    k = torch.randn(2, 2, 64).bfloat16()
    write_kv(arena, 1, k, -k, torch.tensor([0, 37]))  # block 0 slot 0, block 2 slot 5
    k_scales, v_scales = arena.layer_scales(1)
    codes, scale = INT4.quantize(k)
    assert torch.equal(arena.layer(1)[0][2, :, 5], codes[1]) and torch.equal(k_scales[2, :, 5], scale[1])
    assert torch.equal(unpack_int4(arena.layer(1)[1][0, :, 0]), -unpack_int4(codes[0]))
    assert torch.equal(v_scales[0, :, 0], scale[0])
    assert (arena.scales != 0).sum() == 2 * 2 * 2 * 2 and not arena.scales[0].any()


def test_attention_over_int4_kv_stays_close_to_float_kv():
    """Fitted: over 240 seeds the per-request relative error was 0.097-0.19 (noise ~ absmax/7/sqrt(12)
    per element, 18x int8's)."""
    seed = _seed()
    errors, int4_arena, tables = errors_against_float_kv(torch.int4, seed)
    assert all(0.03 < e < 0.3 for e in errors), f"rel errors {errors} seed={seed}"  # > 0: it did quantize
    # gather dequantizes exactly what write_kv quantized
    k_hist, v_hist = gather_history(int4_arena, 0, tables[3], 300)
    blk, slot = tables[3][299 // 16], 299 % 16
    for hist, cache, scales in zip((k_hist, v_hist), int4_arena.layer(0), int4_arena.layer_scales(0), strict=True):
        codes = unpack_int4(cache[blk, :, slot]).float()  # (Hkv, D)
        assert torch.equal(hist[:, 299], codes * scales[blk, :, slot].float().repeat_interleave(32, -1))


def test_swap_pool_moves_codes_and_scales_exactly():
    arena = KVArena(ArenaShape(3, 10, 2, 4, 64), torch.bfloat16, "cpu", torch.int4)
    g = torch.Generator().manual_seed(0)
    arena.kv.copy_(torch.randint(0, 256, arena.kv.shape, generator=g, dtype=torch.uint8))
    arena.scales.copy_(torch.rand(arena.scales.shape, generator=g))
    before = (arena.kv.clone(), arena.scales.clone())
    pool = SwapPool(arena, 8)
    assert pool.kv.dtype == torch.uint8 and pool.scales.shape == (8, 3, 2, 2, 4, 2)
    pool.swap_out([3, 1, 4, 9], [5, 6, 0, 1])
    arena.kv.zero_()
    arena.scales.zero_()
    pool.swap_in([5, 6, 0, 1], [7, 2, 0, 8])
    for now, was in zip((arena.kv, arena.scales), before, strict=True):
        assert torch.equal(now[:, :, [7, 2, 0, 8]], was[:, :, [3, 1, 4, 9]])  # bit for bit
        assert not now[:, :, [1, 3, 4, 5, 6, 9]].any()


def test_static_decode_buffers_write_the_same_codes_as_the_eager_path():
    """The decode path CUDA graphs replay, over static buffers (not captured on the CPU): same
    logits as the eager forward, and the step writes codes and scales only at its requests' slots
    and the scratch slot the padding rows use."""
    model = load_model("random:tiny-llama", "cpu", torch.float32).model
    eager = ModelRunner(model, 64, 16, "torch", kv_dtype=torch.int4)
    static = ModelRunner(model, 64, 16, "torch", graph_batch=8, capture=False, kv_dtype=torch.int4)
    rng = random.Random(3)
    lens = [1, 5, 16, 17, 40]  # bucket 8: 3 padding rows
    tables = [list(range(4 * i, 4 * i + 4)) for i in range(len(lens))]
    prompts = [[rng.randrange(320) for _ in range(n)] for n in lens]
    for runner in (eager, static):
        runner.step([SeqInput(p, 0, t, None) for p, t in zip(prompts, tables, strict=True)])
    nxt = [rng.randrange(320) for _ in lens]
    scales_before = static.arena.scales.clone()
    got = static.graphs.logits(static.graphs.pack(nxt, lens, tables))
    meta = build_metadata([1] * len(lens), [n + 1 for n in lens], tables, 16, "cpu")
    want = model.forward(torch.tensor(nxt), torch.tensor(lens), meta, eager.backend, torch.arange(len(lens)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(static.arena.kv[:, :, :-1], eager.arena.kv[:, :, :-1])  # all but the scratch block
    changed = (static.arena.scales != scales_before).any(dim=(0, 1, 3, 5))  # (blocks, slots in block)
    written = {(t[n // 16], n % 16) for n, t in zip(lens, tables, strict=True)}
    assert {tuple(x) for x in changed.nonzero().tolist()} == written | {(static.arena.num_blocks - 1, 0)}


def test_kv_dtype_flag_takes_int4():
    from streamer.__main__ import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args(["serve", "--kv-dtype", "int4"])).kv_dtype == "int4"
    assert EngineConfig(kv_dtype="int4").kv_dtype == "int4"


# --- the engine end to end ----------------------------------------------------------------------

PROMPT_LENS = (1, 5, 16, 17, 33, 48, 64, 90, 120, 3)


def _prompts(seed: int = 11) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(320) for _ in range(n)] for n in PROMPT_LENS]


def _runner_greedy(prompts: list[list[int]], n: int) -> list[list[int]]:
    """The reference path without the engine: one request at a time through a ModelRunner on an
    int4 arena, a whole-prompt prefill then one decode step a token."""
    model = load_model(TINY, "cpu", torch.float32).model  # seed 0, as EngineConfig's
    outs = []
    for p in prompts:
        blocks = list(range(-(-(len(p) + n) // 16)))
        runner = ModelRunner(model, len(blocks), 16, "torch", kv_dtype=torch.int4)
        out = runner.step([SeqInput(p, 0, blocks, SampleSpec())])
        while len(out) < n:
            out += runner.step([SeqInput([out[-1]], len(p) + len(out) - 1, blocks, SampleSpec())])
        outs.append(out)
    return outs


async def test_engine_sizes_the_int4_arena_by_its_bytes_per_token():
    """The same --kv-memory holds D/2 + 2 bytes per int4 row (one float16 scale: D=16 is one group)
    against 4 * D for float32."""
    from streamer.engine import open_engine

    blocks = {}
    for kv_dtype in ("auto", "int4"):
        async with open_engine(EngineConfig(model=TINY, kv_memory=0.001, kv_dtype=kv_dtype)) as eng:
            blocks[kv_dtype] = eng.statistics().kv.total_blocks
            assert eng.runner.arena.kv.dtype == (torch.uint8 if kv_dtype == "int4" else torch.float32)
    nbytes = 0.001 * 4 * 2**30  # a fraction of the CPU's 4 GiB base
    assert blocks == {"auto": int(nbytes // (16 * 2 * 2 * 2 * 16 * 4)), "int4": int(nbytes // (16 * 2 * 2 * 2 * 10))}


async def test_engine_greedy_with_int4_kv_equals_its_reference_path():
    """Batched, chunked (64-token budget) and interleaved in the engine, the int4 tokens are those
    of each request alone through the runner: a row's codes depend on that row only."""
    prompts = _prompts()
    got, stats = await _greedy(EngineConfig(model=TINY, kv_dtype="int4", max_batch_tokens=64), prompts)
    assert got == _runner_greedy(prompts, 24)
    assert stats.preemptions == 0


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
async def test_int4_under_preemption_gives_the_same_tokens_and_frees_every_block(preemption):
    """An arena too small for the batch: victims are recomputed (their KV quantizes to the same
    codes again) or swapped to the host pool and back (codes and scales copied bit for bit); the
    tokens equal an unconstrained run's, and every block and host slot comes back."""
    prompts = _prompts()
    free, _ = await _greedy(EngineConfig(model=TINY, kv_dtype="int4", max_batch_tokens=64), prompts)
    per_block = ArenaShape(2, 1, 2, 16, 16).bytes_per_block(torch.int4)
    swap = dict(preemption="swap", swap_space=64 * per_block / 2**30) if preemption == "swap" else {}
    tight, stats = await _greedy(EngineConfig(model=TINY, kv_blocks=14, kv_dtype="int4", max_batch_tokens=64,
                                              **swap), prompts)
    assert stats.preemptions > 0 and stats.kv.total_blocks == 14
    if preemption == "swap":
        assert stats.swaps_out > 0 and stats.swap_slots_free == stats.swap_slots
    assert tight == free


async def test_int4_prefix_cache_hits_give_the_same_tokens():
    """Prompts sharing a 40-token prefix: with prefix caching the later ones reuse its int4 blocks
    (codes and scales as written by the first) and answer exactly as without the cache."""
    rng = random.Random(5)
    prefix = [rng.randrange(320) for _ in range(40)]
    prompts = [prefix + [rng.randrange(320) for _ in range(n)] for n in (3, 9, 17, 1)]
    outs, hits = {}, {}
    for cached in (False, True):
        outs[cached], stats = await _greedy(
            EngineConfig(model=TINY, kv_dtype="int4", prefix_caching=cached, max_running=1), prompts)
        hits[cached] = stats.prefix_hit_tokens
    assert outs[True] == outs[False]
    assert hits[False] == 0 and hits[True] >= 3 * 32  # two full 16-token blocks of the prefix each
