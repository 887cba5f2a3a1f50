"""int8 KV end to end on the GPU: the CUDA kernel over an int8 arena against the torch reference
backend over an int8 arena (same codes), through the model and through the engine with CUDA graphs.
Kernel-level checks of int8 (every shape, splits, graph capture) live in tests/test_attention_gpu.py.
tests/test_kv_int4_gpu.py runs the same end-to-end checks over int4."""

from __future__ import annotations

import random

import pytest
import torch
import trio

from gpu.attention import build_metadata
from streamer.config import EngineConfig
from streamer.engine import build_engine, open_engine
from streamer.types import FinishEvent, SamplingParams, TokenEvent

pytestmark = pytest.mark.gpu
MODEL = "random:qwen2.5-0.5b"  # D=64, 14 q heads over 2 kv heads


def _prefill_logprobs(attention: str, ids: list[int], kv_dtype: str) -> torch.Tensor:
    engine = build_engine(EngineConfig(model=MODEL, kv_blocks=64, attention=attention, kv_dtype=kv_dtype,
                                       cuda_graphs=False))
    assert engine.runner.arena.quantized
    blocks = engine.allocator.allocate(-(-len(ids) // 16))
    runner = engine.runner
    meta = build_metadata([len(ids)], [len(ids)], [blocks], 16, "cuda")
    rows = torch.arange(len(ids), device="cuda")
    logits = runner.model.forward(torch.tensor(ids, device="cuda"), rows, meta, runner.backend, rows)
    return torch.log_softmax(logits.float(), -1)


def compare_logprobs(kv_dtype: str) -> tuple[float, float]:
    """(mean, max) |dlogprob| over the torch backend's top 5, kernel against torch backend, both over
    a `kv_dtype` arena, 300 teacher-forced random tokens."""
    rng = random.Random()
    ids = [rng.randrange(100, 32000) for _ in range(300)]
    ours, ref = _prefill_logprobs("cuda", ids, kv_dtype), _prefill_logprobs("torch", ids, kv_dtype)
    top = ref.topk(5, dim=-1).indices
    delta = (ours.gather(1, top) - ref.gather(1, top)).abs()
    print(f"\n{kv_dtype} KV, kernel vs torch: max |dlogprob| over top-5 = {delta.max():.4f}, mean = {delta.mean():.5f}")
    return delta.mean().item(), delta.max().item()


def test_int8_kernel_logprobs_match_the_int8_torch_backend():
    """300 teacher-forced tokens: the kernel and torch see the same int8 codes, so only attention
    arithmetic differs (bf16 mma vs torch SDPA): the same bound as the bf16 kernel against HF."""
    mean, worst = compare_logprobs("int8")
    assert mean < 0.05 and worst < 0.5


async def serve_against_auto(kv_dtype: str, row_bytes: int) -> None:
    """24 random prompts, 32 greedy tokens each, with --kv-memory 1.5 GiB, once with the model's
    KV and once with `kv_dtype` (`row_bytes` a (token, kv head) row of K or V): decode steps go
    through the captured graphs; every request finishes and every block comes back."""
    blocks, outputs = {}, {}
    rng = random.Random()
    prompts = [[rng.randrange(100, 32000) for _ in range(rng.randrange(8, 400))] for _ in range(24)]
    for kv in ("auto", kv_dtype):
        outs: list[list[int]] = outputs.setdefault(kv, [[] for _ in prompts])
        async with open_engine(EngineConfig(model=MODEL, kv_memory=1.5, kv_dtype=kv, max_running=16)) as eng:
            assert eng.runner.graphs is not None and eng.runner.graphs.graphs
            blocks[kv] = eng.statistics().kv.total_blocks

            async def one(i, gen, outs=outs):
                async with gen:
                    async for ev in gen:
                        if isinstance(ev, TokenEvent):
                            outs[i].append(ev.token_id)
                        else:
                            assert isinstance(ev, FinishEvent) and ev.finish_reason == "length", ev

            with trio.fail_after(300):
                gens = [eng.submit(p, SamplingParams(max_tokens=32, ignore_eos=True)) for p in prompts]
                async with trio.open_nursery() as nursery:
                    for i, gen in enumerate(gens):
                        nursery.start_soon(one, i, gen)
            stats = eng.statistics()
            assert stats.kv.free_blocks == stats.kv.total_blocks
        assert all(len(o) == 32 for o in outs)
    same = sum(a == b for a, b in zip(outputs["auto"], outputs[kv_dtype], strict=True))
    print(f"\n{kv_dtype} vs bf16 KV: {same}/{len(prompts)} greedy continuations identical; blocks {blocks}")
    per_token = {"auto": 24 * 2 * 2 * 64 * 2, kv_dtype: 24 * 2 * 2 * row_bytes}
    assert blocks == {k: int(1.5 * 2**30 // (16 * per_token[k])) for k in blocks}


async def test_engine_with_int8_kv_and_cuda_graphs_serves_and_frees_every_block():
    """Same --kv-memory: the int8 arena has (2 * 64) / (64 + 4) = 1.88x the blocks."""
    await serve_against_auto("int8", 64 + 4)
