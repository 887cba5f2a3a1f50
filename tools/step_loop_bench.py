"""The step loop's own cost: the engine with a runner that computes nothing.

Every request decodes at once (batch = --requests), the fake runner returns a token for each
sampling sequence immediately, so what is left per step is the host's work: scheduling, building
the step's inputs, `scheduler.update`, detokenizing, sending each token and the metrics. On a GPU
with overlapped steps (CUDA's default) that work runs while the device computes the next step, so
it sets the step rate whenever it takes longer than a device step. It prints wall time and the process's CPU time (both threads)
a token; on a busy machine the CPU figure is the steadier. `--profile` adds a cProfile table.

Like `streamer serve`, it freezes the start-up heap out of the cyclic collector before the run
(`--no-freeze`: not; each full collection then walks the ~370k objects of torch, transformers and
the model, about 0.2 s on the 2-core dev VM, once or twice a run).

`--ids` picks the tokens the fake runner returns (the model's tokenizer is the random models'
byte tokenizer): `A` (id 65, "A", every time), `text` (each request streams the UTF-8 bytes of a
multilingual text, so many tokens end mid-character) or `vocab` (ids drawn uniformly from
qwen2.5's 151,936, as a random-weights model emits them; nearly all decode to nothing).

`--overlap --inline` is the loop shape CUDA runs (steps overlapped, launched on the loop's own
thread); `--overlap` alone launches and waits in a worker thread; neither: serial steps, the CPU's.

    python tools/step_loop_bench.py --requests 256 --tokens 200 [--ids A|text|vocab] [--overlap [--inline]]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import sys
import time
from pathlib import Path

import torch
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from gpu.runner import Launched  # noqa: E402
from streamer.config import EngineConfig  # noqa: E402
from streamer.engine import open_engine  # noqa: E402
from streamer.types import SamplingParams  # noqa: E402

TEXT = "Crème brûlée, 今日は良い天気ですね。 Emoji: 😀👍🏽 and ✨. The quick brown fox jumps over the lazy dog. "


def fake_launcher(ids: str):
    """A runner's launch() that computes nothing: the step's sampled ids at once."""
    text = list(TEXT.encode())
    gen = torch.Generator().manual_seed(0)

    def launch(seqs, swap_out=(), swap_in=()):
        mask = [s.sample is not None for s in seqs]
        if ids == "A":
            out = torch.full((sum(mask),), 65, dtype=torch.long)
        elif ids == "vocab":
            out = torch.randint(151936, (sum(mask),), generator=gen)
        else:  # a request's first block tells it apart: each streams the text from its own offset
            n = len(text)
            out = torch.tensor([text[(s.block_table[0] * 13 + s.start_pos) % n] for s in seqs if s.sample])
        now = time.perf_counter()
        return Launched(out, None, mask, now, now)

    return launch


async def main(args) -> None:
    config = EngineConfig(model="random:tiny-qwen3", device="cpu", kv_blocks=args.requests * (args.tokens // 16 + 3),
                          max_running=args.requests, max_batch_tokens=max(8192, args.requests * 8),
                          max_waiting=args.requests + 1, overlap=args.overlap,
                          launch="inline" if args.inline else "thread")
    async with open_engine(config) as engine:
        engine.runner.launch = fake_launcher(args.ids)
        # As on CUDA, decode steps count as graph replays (the loop does not yield before them).
        engine.runner.replays = lambda n: 0 < n <= 512
        if not args.no_freeze:
            gc.collect()
            gc.freeze()
        steps0 = engine.statistics().steps

        async def one(i: int) -> None:
            async with engine.submit([100 + i % 50] * 8, SamplingParams(max_tokens=args.tokens, ignore_eos=True)) as gen:
                async for _ in gen:
                    pass

        prof = cProfile.Profile() if args.profile else None
        t0, cpu0 = time.perf_counter(), time.process_time()
        if prof:
            prof.enable()
        async with trio.open_nursery() as nursery:
            for i in range(args.requests):
                nursery.start_soon(one, i)
        if prof:
            prof.disable()
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        steps = engine.statistics().steps - steps0
        since = engine.metrics.snapshot()["since_start"]
    tokens = args.requests * args.tokens
    print(f"{args.requests} requests x {args.tokens} tokens ({args.ids}): {steps} steps in {wall:.2f} s = "
          f"{wall / steps * 1e3:.2f} ms a step, {wall / tokens * 1e6:.1f} us a token, {tokens / wall:,.0f} tok/s; "
          f"CPU (both threads) {cpu / tokens * 1e6:.1f} us a token")
    lag, itl = since["loop_lag"], since["itl"]
    print(f"ITL p50/p99/max {itl['p50_ms']}/{itl['p99_ms']}/{itl['max_ms']} ms; event loop lag (a 10 ms sleep's "
          f"overshoot) p50/p99/max {lag['p50_ms']}/{lag['p99_ms']}/{lag['max_ms']} ms over {lag['count']} samples")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--ids", choices=("A", "text", "vocab"), default="A", help="the tokens the fake runner returns")
    ap.add_argument("--no-freeze", action="store_true", help="leave the start-up heap to the cyclic collector")
    ap.add_argument("--overlap", action="store_true", help="overlapped steps, as on CUDA (the fake step is done at launch)")
    ap.add_argument("--inline", action="store_true", help="launch on the loop's thread, as on CUDA (else a worker thread)")
    ap.add_argument("--profile", action="store_true")
    trio.run(main, ap.parse_args())
