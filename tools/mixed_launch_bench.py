"""Host time of launching a mixed step (one prompt chunk plus decodes): as CUDA graph pieces
(gpu/piecewise.py) against eager, in one engine, at the same shapes. Prints a table of the median
(and min) over 15 launches after 3 unmeasured ones, each mode twice in turn, then a cProfile of
the pieces path. The launch is `ModelRunner.launch` alone: the host's work before the device has
the step; the wait for its ids is not counted.

    python3 tools/mixed_launch_bench.py [--model random:qwen2.5-0.5b]

On a machine without CUDA both modes are the eager path (no graphs are captured there).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from gpu.runner import SeqInput  # noqa: E402
from gpu.sampler import SampleSpec  # noqa: E402
from streamer.config import EngineConfig  # noqa: E402
from streamer.engine import build_engine  # noqa: E402

SHAPES = ((200, 100), (1000, 200), (3000, 250))  # (prompt chunk tokens, decodes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:qwen2.5-0.5b")
    ap.add_argument("--kv-memory", type=float, default=0.3)
    args = ap.parse_args()
    engine = build_engine(EngineConfig(model=args.model, kv_memory=args.kv_memory, max_running=256))
    runner, alloc = engine.runner, engine.allocator
    pieces = runner.pieces
    cuda = runner.device.type == "cuda"

    def seqs(chunk: int, decodes: int) -> list[SeqInput]:
        s = [SeqInput([1 + i % 250 for i in range(chunk)], 0, alloc.allocate(-(-chunk // 16)), SampleSpec())]
        s += [SeqInput([5], 300, alloc.allocate(19), SampleSpec()) for _ in range(decodes)]
        return s

    def timed(ss: list[SeqInput]) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        launched = runner.launch(ss)
        t1 = time.perf_counter()
        runner.collect(launched)
        for x in ss:
            alloc.free(x.block_table)
        return (t1 - t0) * 1e3

    print(f"{args.model} on {torch.cuda.get_device_name() if cuda else 'CPU'}; launch host ms, median (min) of 15")
    print("| step | pieces | eager | pieces | eager |\n|---|---:|---:|---:|---:|")
    for chunk, dec in SHAPES:
        if chunk + 1 > engine.loaded.model.spec.max_position:
            continue  # (small test models)
        cells = []
        for mode in ("pieces", "eager", "pieces", "eager"):
            runner.pieces = pieces if mode == "pieces" else None
            for _ in range(3):
                timed(seqs(chunk, dec))
            ts = [timed(seqs(chunk, dec)) for _ in range(15)]
            cells.append(f"{statistics.median(ts):.2f} ({min(ts):.2f})")
        print(f"| {chunk}-token chunk + {dec} decodes | " + " | ".join(cells) + " |")
    runner.pieces = pieces
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        timed(seqs(*SHAPES[0]))
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
