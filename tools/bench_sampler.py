"""Sampling cost for one step: gpu.sampler.sample (the whole batch in a fixed number of ops)
against a per-row loop (one draw per request, as the sampler did before), on the same logits.

    python tools/bench_sampler.py --rows 256 --vocab 151936

Prints a table of median times per call (CUDA events on a GPU, wall clock on the CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from bench_offline import cuda_ms  # noqa: E402

from gpu.sampler import SampleSpec, sample  # noqa: E402


def per_row(logits: torch.Tensor, specs: list[SampleSpec]) -> torch.Tensor:
    """One request at a time: argmax for all, then temperature / top-k / top-p / multinomial per
    sampled row (the reference the batched sampler replaced)."""
    out = logits.argmax(dim=-1)
    for row, spec in enumerate(specs):
        if spec.greedy:
            continue
        x = logits[row] / spec.temperature
        if spec.top_k > 0:
            kth = torch.topk(x, min(spec.top_k, x.numel())).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if spec.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            drop = sorted_probs.cumsum(0) - sorted_probs >= spec.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        gen = None
        if spec.seed is not None:
            gen = torch.Generator(device=probs.device)
            gen.manual_seed((spec.seed * 1_000_003 + spec.index) % 2**63)
        out[row] = torch.multinomial(probs, 1, generator=gen)[0]
    return out


def wall_ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(args.rows, args.vocab, device=device, generator=g) * 3
    cases = {
        "greedy": SampleSpec(),
        "T0.7 top_p 0.9": SampleSpec(temperature=0.7, top_p=0.9),
        "T0.7 top_p 0.9 seeded": SampleSpec(temperature=0.7, top_p=0.9, seed=1),
        "T1.0 top_k 50": SampleSpec(temperature=1.0, top_k=50),
    }
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{card}: {args.rows} rows x vocab {args.vocab}, median of {args.runs} ({'CUDA events' if device.type == 'cuda' else 'wall clock'})")
    print("| case | batched (gpu.sampler) | per-row loop | speed-up |")
    print("|---|---:|---:|---:|")
    for name, spec in cases.items():
        specs = [spec] * args.rows
        times = []
        for fn in (sample, per_row):
            call = lambda fn=fn, specs=specs: fn(logits, specs)  # noqa: E731
            times.append(cuda_ms(call, args.runs) if device.type == "cuda" else wall_ms(call, args.runs))
        print(f"| {name} | {times[0]:.2f} ms | {times[1]:.2f} ms | {times[1] / times[0]:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
