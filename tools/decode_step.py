"""Time one batch-256 decode step (~800-token contexts) against its bandwidth floor: the device's
time (CUDA events around its device work) and the time from launch to ids (the host's packing too).

    python tools/decode_step.py --model qwen2.5-0.5b
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from bench_offline import ceilings, decode_step  # noqa: E402

if __name__ == "__main__":
    import torch

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--kv-memory", type=float, default=0.85)
    args = ap.parse_args()
    bw, _ = ceilings(torch.device("cuda"))
    device, wall, floor = decode_step(args.model, args, bw)
    print(f"{args.model}: decode step batch 256 ctx 800: device {device * 1e3:.2f} ms ({device / floor:.2f}x the "
          f"bandwidth floor, {floor * 1e3:.2f} ms), launch to ids with the host's packing {wall * 1e3:.2f} ms; "
          f"copy {bw / 1e12:.2f} TB/s")
