"""Time the decode step's projection GEMMs at small batch: `F.linear` (what the model runs) against
split-K through `torch.bmm` with float32 partials (what a consumer kernel could sum), per layer.

Each shape runs over as many distinct weight matrices as the model has layers, replayed in turn in
one CUDA graph, so the weights stream from HBM as in a real step (one reused would sit in L2).
The split-K column also prints its relative error against `F.linear` (bf16 rounding of the result).

    python3 tools/bench_gemm.py [--models qwen2.5-0.5b,llama-3.2-1b] [--rows 64,256] [--splits 2,4,8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from bench_attention import bench_ms  # noqa: E402  (CUDA-graph replay of many calls, ms a call)

# hidden, intermediate, q+k+v width, layers (the shapes of tools/bench_offline.py's models)
MODELS = {"qwen2.5-0.5b": (896, 4864, 1152, 24), "llama-3.2-1b": (2048, 8192, 3072, 16),
          "llama-3-8b": (4096, 14336, 6144, 32)}


def split_k(x: torch.Tensor, w: torch.Tensor, splits: int) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T as `splits` float32 partials (splits, M, N), from strided views."""
    m, k = x.shape
    kc = k // splits
    return torch.bmm(x.view(m, splits, kc).transpose(0, 1), w.view(w.shape[0], splits, kc).permute(1, 2, 0),
                     out_dtype=torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen2.5-0.5b,llama-3.2-1b")
    ap.add_argument("--rows", default="64,256", help="batch rows (decode requests)")
    ap.add_argument("--splits", default="2,4,8")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}; microseconds per layer\n")
    print("| model | GEMM | M | N | K | F.linear | " + " | ".join(f"split {s} (rel err)" for s in args.splits.split(","))
          + " |")
    print("|---|---|---:|---:|---:|---:|" + "---:|" * len(args.splits.split(",")))
    for name in args.models.split(","):
        hidden, inter, qkv, layers = MODELS[name]
        for gemm, (n, k) in {"qkv": (qkv, hidden), "o": (hidden, hidden), "gate_up": (2 * inter, hidden),
                             "down": (hidden, inter)}.items():
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
            for m in (int(r) for r in args.rows.split(",")):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = F.linear(x, ws[0]).float()
                cells = [f"{1000 * bench_ms([lambda x=x, w=w: F.linear(x, w) for w in ws]):.1f}"]
                for s in (int(v) for v in args.splits.split(",")):
                    if k % s or (k // s) % 8:
                        cells.append("-")
                        continue
                    err = ((split_k(x, ws[0], s).sum(0) - ref).norm() / ref.norm()).item()
                    us = 1000 * bench_ms([lambda x=x, w=w, s=s: split_k(x, w, s) for w in ws])
                    cells.append(f"{us:.1f} ({err:.0e})")
                print(f"| {name} | {gemm} | {m} | {n} | {k} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
