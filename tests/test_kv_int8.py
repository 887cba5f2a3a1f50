"""int8 KV cache on the CPU: the quantize/dequantize format, attention over an int8 arena against a
float arena, arena sizing, and the engine end to end with kv_dtype="int8"."""

from __future__ import annotations

import random

import pytest
import torch
import trio

from gpu.arena import INT8, ArenaShape, KVArena, blocks_that_fit, kv_bytes_per_token
from gpu.attention import TorchAttention, build_metadata, gather_history, write_kv
from streamer.config import EngineConfig
from streamer.engine import open_engine
from streamer.types import FinishEvent, SamplingParams, TokenEvent


def _seed() -> int:
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    return seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_is_at_most_half_a_step(dtype):
    seed = _seed()
    x = (torch.randn(64, 3, 128) * torch.rand(64, 3, 1) * 20).to(dtype)  # rows of very different ranges
    codes, scale = INT8.quantize(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    xf = x.float()
    # scale = absmax / 127; the largest element of every row lands on +-127 exactly
    torch.testing.assert_close(scale, xf.abs().amax(-1) / 127, rtol=2e-7, atol=0)
    assert (codes.abs().amax(-1) == 127).all() and codes.min() >= -127, f"seed={seed}"
    err = (INT8.dequantize(codes, scale, torch.float32) - xf).abs()
    assert (err <= scale.unsqueeze(-1) * 0.5 * (1 + 1e-5)).all(), f"seed={seed}"  # round to nearest
    assert (err > scale.unsqueeze(-1) * 0.4).any(), f"seed={seed}"  # the bound is tight: not truncation


def test_round_trip_is_exact_on_the_grid_and_zero_rows_stay_zero():
    _seed()
    scale = torch.rand(10, 1) + 0.5
    grid = torch.randint(-127, 128, (10, 64)).float()
    grid[:, 0] = 127  # pin each row's absmax
    codes, s = INT8.quantize(grid * scale)
    assert torch.equal(codes.float(), grid)
    codes, s = INT8.quantize(torch.zeros(3, 64))
    assert not codes.any() and not s.any()
    assert not INT8.dequantize(codes, s, torch.float32).isnan().any()
    half = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5]])  # ties round to even, like CUDA's rintf
    assert INT8.quantize(half)[0].tolist() == [[127, 0, 2, 2, 0, -2]]


def test_int8_arena_layout_scales_and_sizing():
    shape = ArenaShape(num_layers=3, num_blocks=5, num_kv_heads=2, block_size=16, head_dim=64)
    arena = KVArena(shape, torch.float32, "cpu", torch.int8)
    assert arena.kv.dtype == torch.int8 and arena.scales.shape == (3, 2, 5, 2, 16)
    assert arena.nbytes == shape.bytes_per_block(torch.int8) * 5
    # D + 4 bytes per (token, head, K or V) against 2 * D: the concurrency gain
    assert kv_bytes_per_token(24, 2, 64, torch.int8) == 24 * 2 * 2 * 68
    assert kv_bytes_per_token(24, 2, 64, torch.bfloat16) == 24 * 2 * 2 * 128
    fit = {dt: blocks_that_fit(10 * 2**30, num_layers=24, num_kv_heads=2, block_size=16, head_dim=64, dtype=dt)
           for dt in (torch.bfloat16, torch.int8)}
    assert fit[torch.int8] == 10 * 2**30 // (16 * 6528) and fit[torch.int8] > 1.8 * fit[torch.bfloat16]
    with pytest.raises(ValueError, match="int8"):
        KVArena(shape, torch.float32, "cpu", torch.float16)
    # writes land at the slot's codes and at the same slot's scale
    k = torch.randn(2, 2, 64)
    write_kv(arena, 1, k, -k, torch.tensor([0, 37]))  # block 0 slot 0, block 2 slot 5
    k_scales, v_scales = arena.layer_scales(1)
    codes, scale = INT8.quantize(k)
    assert torch.equal(arena.layer(1)[0][2, :, 5], codes[1]) and torch.equal(k_scales[2, :, 5], scale[1])
    assert torch.equal(arena.layer(1)[1][0, :, 0], -codes[0]) and torch.equal(v_scales[0, :, 0], scale[0])
    assert (arena.scales != 0).sum() == 2 * 2 * 2 and not arena.scales[0].any()


def _random_steps(arena: KVArena, seed: int):
    """Prefill every request's history, then one mixed step; returns the mixed step's output."""
    gen = torch.Generator().manual_seed(seed)
    hkv, d, bs = arena.shape.num_kv_heads, arena.shape.head_dim, arena.block_size
    hq = hkv * 4
    backend = TorchAttention(arena, d**-0.5)
    q_lens, seq_lens = [1, 7, 40, 1], [50, 7, 90, 300]
    tables, at = [], 0
    for s in seq_lens:
        n = -(-s // bs)
        tables.append(list(range(at, at + n)))
        at += n
    hist = [(s - q, t) for q, s, t in zip(q_lens, seq_lens, tables, strict=True) if s > q]
    steps = [build_metadata([h for h, _ in hist], [h for h, _ in hist], [t for _, t in hist], bs, "cpu"),
             build_metadata(q_lens, seq_lens, tables, bs, "cpu")]
    for meta in steps:
        t = meta.num_tokens
        q, k, v = (torch.randn(t, h, d, generator=gen) for h in (hq, hkv, hkv))
        out = backend.forward(0, q, k, v, meta)
    return out, steps[-1], tables


def errors_against_float_kv(kv_dtype: torch.dtype, seed: int) -> tuple[list[float], KVArena, list[list[int]]]:
    """The same random steps through a float32 arena and a `kv_dtype` one: each request's relative
    error of the last step's output, the quantized arena, its block tables."""
    shape = ArenaShape(1, 40, 2, 16, 64)
    ref, meta, tables = _random_steps(KVArena(shape, torch.float32, "cpu"), seed)
    arena = KVArena(shape, torch.float32, "cpu", kv_dtype)
    got, _, _ = _random_steps(arena, seed)
    errors, start = [], 0
    for q_len in meta.q_lens_host:
        a, b = ref[start : start + q_len], got[start : start + q_len]
        errors.append(((a - b).norm() / a.norm()).item())
        start += q_len
    return errors, arena, tables


def test_attention_over_int8_kv_stays_close_to_float_kv():
    """Fitted: over 30 seeds the worst per-request relative error was 1.0e-2 (quantization noise
    ~ absmax/127/sqrt(12) per element)."""
    seed = _seed()
    errors, int8_arena, tables = errors_against_float_kv(torch.int8, seed)
    assert all(1e-4 < e < 2.5e-2 for e in errors), f"rel errors {errors} seed={seed}"  # > 0: it did quantize
    # gather dequantizes exactly what write_kv quantized
    k_hist, _ = gather_history(int8_arena, 0, tables[3], 300)
    codes, scales = int8_arena.layer(0)[0], int8_arena.layer_scales(0)[0]
    blk, slot = tables[3][299 // 16], 299 % 16
    assert torch.equal(k_hist[:, 299], codes[blk, :, slot].float() * scales[blk, :, slot].unsqueeze(-1))


def test_kv_dtype_config_and_flag():
    from streamer.__main__ import build_parser, config_from_args

    parse = build_parser().parse_args
    assert config_from_args(parse(["serve"])).kv_dtype == "auto"
    assert config_from_args(parse(["serve", "--kv-dtype", "int8"])).kv_dtype == "int8"
    with pytest.raises(SystemExit):
        parse(["serve", "--kv-dtype", "fp8"])
    with pytest.raises(ValueError, match="kv_dtype must be one of auto, int8"):
        EngineConfig(kv_dtype="float8")


async def _greedy(config: EngineConfig, prompts: list[list[int]]) -> tuple[list[list[int]], object]:
    """Greedy outputs of every prompt (all submitted before the loop runs) and the engine's final
    statistics, checked to have every block free again."""
    results: list[list[int]] = [[] for _ in prompts]

    async def one(i, gen):
        async with gen:
            async for ev in gen:
                if isinstance(ev, TokenEvent):
                    results[i].append(ev.token_id)
                else:
                    assert isinstance(ev, FinishEvent) and ev.finish_reason == "length", ev

    with trio.fail_after(120):
        async with open_engine(config) as engine:
            storage = {"int8": torch.int8, "int4": torch.uint8}.get(config.kv_dtype, torch.float32)
            assert engine.runner.arena.kv.dtype == storage
            gens = [engine.submit(p, SamplingParams(max_tokens=24)) for p in prompts]
            async with trio.open_nursery() as nursery:
                for i, gen in enumerate(gens):
                    nursery.start_soon(one, i, gen)
            stats = engine.statistics()
            assert stats.kv.free_blocks == stats.kv.total_blocks
            if engine.runner.arena.quantized:
                assert engine.runner.arena.scales.any()  # it ran through the quantized write
    assert all(len(r) == 24 for r in results)
    return results, stats


async def test_engine_sizes_the_int8_arena_by_its_bytes_per_token():
    """The same --kv-memory holds D + 4 bytes per int8 row against 4 * D for float32 (tiny-qwen3: D=16)."""
    blocks = {}
    for kv_dtype in ("auto", "int8"):
        async with open_engine(EngineConfig(model="random:tiny-qwen3", kv_memory=0.001, kv_dtype=kv_dtype)) as eng:
            blocks[kv_dtype] = eng.statistics().kv.total_blocks
    nbytes = 0.001 * 4 * 2**30  # a fraction of the CPU's 4 GiB base
    assert blocks == {"auto": int(nbytes // (16 * 2 * 2 * 2 * 16 * 4)), "int8": int(nbytes // (16 * 2 * 2 * 2 * 20))}


async def test_engine_greedy_with_int8_kv_frees_every_block_and_survives_preemption():
    """The tiny model end to end on an int8 arena: every request finishes, all blocks come back, and
    with an arena too small for the batch (preemption, recompute) the greedy outputs equal those of
    an unconstrained int8 run: recomputed KV quantizes to the same codes."""
    rng = random.Random(7)
    prompts = [[rng.randrange(320) for _ in range(n)] for n in (1, 5, 16, 17, 33, 48, 64, 90, 120, 3)]
    free, _ = await _greedy(EngineConfig(model="random:tiny-qwen3", kv_dtype="int8", max_batch_tokens=64), prompts)
    tight, stats = await _greedy(
        EngineConfig(model="random:tiny-qwen3", kv_blocks=14, kv_dtype="int8", max_batch_tokens=64), prompts)
    assert stats.preemptions > 0 and stats.kv.total_blocks == 14
    assert tight == free
