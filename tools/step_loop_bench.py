"""The step loop's own cost: the engine with a runner that computes nothing.

Every request decodes at once (batch = --requests), the null runner returns a token for each
sampling sequence immediately, so what is left per step is the host's work: scheduling, building
the step's inputs, `scheduler.update`, sending each token and the metrics, plus detokenizing
unless `--core` (requests as the engine core process holds them: ids out, text made in the front
ends). On a GPU with overlapped steps (CUDA's default) that work runs while the device computes
the next step, so it sets the step rate whenever it takes longer than a device step. It prints
wall time and the process's CPU time (both threads) a token; on a busy machine the CPU figure is
the steadier. `--profile` adds a cProfile table.

Logging is configured as `streamer serve` configures it off a TTY (a JSON line per finished
request), with the lines sent to /dev/null. Like `streamer serve`, it freezes the start-up heap out of the cyclic collector before the run
(`--no-freeze`: not; each full collection then walks the ~370k objects of torch, transformers and
the model, about 0.2 s on the 2-core dev VM, once or twice a run).

`--core` holds the requests as the engine core process does (streamer/core.py): each request's
outbox is its front end's `Link`, one writer task takes the link's messages after each wake-up
and encodes them into the frame the core would send (`--frontends` links, requests spread over
them round-robin); nothing is written to a socket, and no request task runs in this process.

`--ids` picks the tokens the null runner returns (the model's tokenizer is the random models'
byte tokenizer): `A` (id 65, "A", every time), `text` (each request streams the UTF-8 bytes of a
multilingual text, so many tokens end mid-character) or `vocab` (ids drawn uniformly from
qwen2.5's 151,936, as a random-weights model emits them; nearly all decode to nothing).

`--overlap --inline` is the loop shape CUDA runs (steps overlapped, launched on the loop's own
thread); `--overlap` alone launches and waits in a worker thread; neither: serial steps, the CPU's.

    python tools/step_loop_bench.py --requests 256 --tokens 200 [--ids A|text|vocab] [--overlap [--inline]] [--core]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import sys
import time
from pathlib import Path

import torch
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from gpu.runner import Launched, ModelRunner  # noqa: E402
from streamer import ipc  # noqa: E402
from streamer.build import load_runner  # noqa: E402
from streamer.config import EngineConfig  # noqa: E402
from streamer.core import Link, RemoteOutbox  # noqa: E402
from streamer.engine import Engine, run_engine  # noqa: E402
from streamer.logging import configure_logging  # noqa: E402
from streamer.types import SamplingParams  # noqa: E402

TEXT = "Crème brûlée, 今日は良い天気ですね。 Emoji: 😀👍🏽 and ✨. The quick brown fox jumps over the lazy dog. "


class NullRunner:
    """A model runner that computes nothing: a step's sampled ids are there at its launch. Decode
    steps count as graph replays, as on CUDA (the loop does not yield before them)."""

    ready = staticmethod(ModelRunner.ready)
    collect = staticmethod(ModelRunner.collect)
    timing = staticmethod(ModelRunner.timing)
    logprobs = staticmethod(ModelRunner.logprobs)

    def __init__(self, runner: ModelRunner, ids: str) -> None:
        self.device, self.backend, self.swap = runner.device, runner.backend, None
        self.ids = ids
        self.text = list(TEXT.encode())
        self.gen = torch.Generator().manual_seed(0)

    def replays(self, num_seqs: int) -> bool:
        return 0 < num_seqs <= 512

    def launch(self, seqs, swap_out=(), swap_in=(), masks=None) -> Launched:
        mask = [s.sample is not None for s in seqs]
        if self.ids == "A":
            out = torch.full((sum(mask),), 65, dtype=torch.long)
        elif self.ids == "vocab":
            out = torch.randint(151936, (sum(mask),), generator=self.gen)
        else:  # a request's first block tells it apart: each streams the text from its own offset
            n = len(self.text)
            out = torch.tensor([self.text[(s.block_table[0] * 13 + s.start_pos) % n] for s in seqs if s.sample])
        now = time.perf_counter()
        return Launched(out, None, mask, now, now)


async def main(args) -> None:
    config = EngineConfig(model="random:tiny-qwen3", device="cpu", kv_blocks=args.requests * (args.tokens // 16 + 3),
                          max_running=args.requests, max_batch_tokens=max(8192, args.requests * 8),
                          max_waiting=args.requests + 1, overlap=args.overlap,
                          launch="inline" if args.inline else "thread")
    loaded, runner, num_blocks, max_running = await trio.to_thread.run_sync(load_runner, config)
    engine = Engine(config, loaded, NullRunner(runner, args.ids), num_blocks, max_running=max_running)
    async with run_engine(engine):
        if not args.no_freeze:
            gc.collect()
            gc.freeze()
        steps0 = engine.statistics().steps

        def params() -> SamplingParams:
            return SamplingParams(max_tokens=args.tokens, ignore_eos=True)

        async def one(i: int) -> None:
            async with engine.submit([100 + i % 50] * 8, params()) as gen:
                async for _ in gen:
                    pass

        async def writer(link: Link) -> None:
            """The core's writer for one front end, without the socket: one frame per wake-up."""
            while link.keys:
                await link.wait()
                ipc.encode(link.take())

        prof = cProfile.Profile() if args.profile else None
        t0, cpu0 = time.perf_counter(), time.process_time()
        if prof:
            prof.enable()
        async with trio.open_nursery() as nursery:
            if args.core:  # as the core process accepts a front end's submits: no detokenizer, ids out
                links = [Link(n, None) for n in range(args.frontends)]
                for i in range(args.requests):
                    link = links[i % len(links)]
                    link.keys[i] = f"f{link.number}/{i}"
                    engine.accept(link.keys[i], [100 + i % 50] * 8, params(), RemoteOutbox(link, i), None, str(i))
                for link in links:
                    nursery.start_soon(writer, link)
            else:
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
          f"CPU (both threads) {cpu / tokens * 1e6:.1f} us a token", file=OUT)
    lag, itl = since["loop_lag"], since["itl"]
    print(f"ITL p50/p99/max {itl['p50_ms']}/{itl['p99_ms']}/{itl['max_ms']} ms; event loop lag (a 10 ms sleep's "
          f"overshoot) p50/p99/max {lag['p50_ms']}/{lag['p99_ms']}/{lag['max_ms']} ms over {lag['count']} samples",
          file=OUT)
    if prof:
        pstats.Stats(prof, stream=OUT).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--ids", choices=("A", "text", "vocab"), default="A", help="the tokens the fake runner returns")
    ap.add_argument("--no-freeze", action="store_true", help="leave the start-up heap to the cyclic collector")
    ap.add_argument("--overlap", action="store_true", help="overlapped steps, as on CUDA (the fake step is done at launch)")
    ap.add_argument("--inline", action="store_true", help="launch on the loop's thread, as on CUDA (else a worker thread)")
    ap.add_argument("--core", action="store_true", help="requests as the core process holds them (no detokenizing)")
    ap.add_argument("--frontends", type=int, default=2, help="with --core: front-end links the requests spread over")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    OUT, sys.stdout = sys.stdout, open(os.devnull, "w")  # the log lines go nowhere; the figures to OUT
    configure_logging("info", json=True)
    trio.run(main, args)
