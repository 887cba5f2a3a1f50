"""Does `runner.launch` hold the host while the device is busy? (GPU only)

Overlapped steps only help if launching step N+1 returns while step N still runs. This queues
~70 ms of matmuls, then times one `runner.launch` of each kind of step on the host: a decode
step (graph replay), the same with its ids fed from the previous step's samples on the device,
an eager step of 4 x 1,000 prompt tokens, and one prompt chunk plus 138 fed decodes (eager).
Three rounds: the first also pays each kernel's first use (CUDA loads modules lazily).

    python3 tools/launch_probe.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from gpu.runner import SeqInput  # noqa: E402
from gpu.sampler import SampleSpec  # noqa: E402
from streamer.config import EngineConfig  # noqa: E402
from streamer.engine import build_engine  # noqa: E402


def main() -> None:
    engine = build_engine(EngineConfig(model="random:qwen2.5-0.5b", kv_blocks=20000, max_running=256,
                                       max_batch_tokens=8192, auto_tune=False))
    runner, alloc = engine.runner, engine.allocator.allocate
    pre = [SeqInput(list(range(100, 1100)), 0, alloc(64), SampleSpec()) for _ in range(4)]
    dec = [SeqInput([5], 800, alloc(51), SampleSpec()) for _ in range(138)]
    fed = [SeqInput([0], 801, s.block_table, SampleSpec(), i) for i, s in enumerate(dec)]
    mixed = pre[:1] + [SeqInput([0], 802, s.block_table, SampleSpec(), i) for i, s in enumerate(dec)]
    for _ in range(2):
        runner.collect(runner.launch(pre))
        runner.collect(runner.launch(dec))
    busy = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for rnd in range(3):
        for name, seqs in (("decode", dec), ("decode fed", fed), ("prefill", pre), ("mixed fed", mixed)):
            runner.collect(runner.launch(dec))  # the last samples: 138 rows, for the fed ones
            torch.cuda.synchronize()
            for _ in range(10):
                busy @ busy
            t = time.perf_counter()
            handle = runner.launch(seqs)
            dt = time.perf_counter() - t
            runner.collect(handle)
            print(f"round {rnd} {name}: launch {dt * 1e3:.2f} ms host with the device busy")


if __name__ == "__main__":
    main()
