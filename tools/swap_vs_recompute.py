"""Preemption resume cost, measured: swapping a request's KV blocks to pinned host memory and back,
against recomputing them with a prefill step. Settles EngineConfig.preemption (docs/BENCHMARKS.md).

Swap is timed at its best: one gather kernel over the request's blocks in every layer, one
device-to-host copy into pinned memory (and back: one host-to-device copy, one scatter).
Recompute is one eager prefill step of the same tokens through the runner.

    python3 tools/swap_vs_recompute.py --models qwen2.5-0.5b,llama-3-8b
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import bench_offline  # noqa: E402
from bench_offline import free_gpu  # noqa: E402

from gpu.runner import SeqInput  # noqa: E402
from gpu.sampler import SampleSpec  # noqa: E402
from streamer.config import EngineConfig  # noqa: E402
from streamer.engine import build_engine  # noqa: E402


def cuda_ms(fn, n: int = 7) -> float:
    return bench_offline.cuda_ms(fn, n)


def measure(name: str, lengths: list[int]) -> list[tuple]:
    engine = build_engine(EngineConfig(model=f"random:{name}", kv_blocks=4096, max_batch_tokens=8192,
                                       auto_tune=False))
    runner, bs = engine.runner, engine.block_size
    kv = runner.arena.kv  # (L, 2, blocks, Hkv, bs, D)
    rows = []
    for n in lengths:
        blocks = engine.allocator.allocate(-(-n // bs))
        ids = torch.tensor(blocks, device="cuda")
        host = torch.empty((*kv.shape[:2], len(blocks), *kv.shape[3:]), dtype=kv.dtype, pin_memory=True)
        out_ms = cuda_ms(lambda h=host, i=ids: h.copy_(kv.index_select(2, i), non_blocking=True))
        in_ms = cuda_ms(lambda h=host, i=ids: kv.index_copy_(2, i, h.to("cuda", non_blocking=True)))
        seq = [SeqInput(list(range(100, 100 + n)), 0, blocks, SampleSpec())]
        re_ms = cuda_ms(lambda s=seq: runner.step(s))
        mb = host.numel() * host.element_size() / 2**20
        rows.append((name, n, mb, out_ms, in_ms, re_ms))
        engine.allocator.free(blocks)
    engine = runner = kv = None  # noqa: F841 (frees the arena before the next model)
    free_gpu()
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="qwen2.5-0.5b,llama-3-8b")
    ap.add_argument("--lengths", default="256,1024,4096")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = [r for m in args.models.split(",") for r in measure(m, lengths)]
    print(f"\n{torch.cuda.get_device_name()}: resume cost of a preempted request")
    print("| model | tokens | KV MiB | swap out ms | swap in ms | recompute (prefill) ms | swap in / recompute |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, mb, out_ms, in_ms, re_ms in rows:
        print(f"| {name} | {n} | {mb:.1f} | {out_ms:.2f} | {in_ms:.2f} | {re_ms:.2f} | {in_ms / re_ms:.2f}x |")
