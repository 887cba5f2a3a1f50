"""Where a step's time goes, on the GPU: device kernels by category and the host's share.

1. A batch-256 decode step at ~800-token contexts: host packing, graph replay and sampling timed
   apart with CUDA events, and the eager forward under the torch profiler, its kernel time summed
   by category (GEMM, attention, norm, rope, elementwise, sampling ...).
2. The host's time to launch a mixed step (one prompt chunk plus decodes), as CUDA graph pieces
   (gpu/piecewise.py) against eager, in one engine at the same shapes: median (min) of 15
   `ModelRunner.launch` calls, each mode twice in turn, then a cProfile of the pieces path. Without
   CUDA both modes are the eager path.
3. The engine on the shared workload (first --requests requests): wall time, the device's time
   in its steps and idle between them (CUDA events), and a cProfile of the trio thread
   (scheduling, detokenizing, sending).

    python3 tools/profile_step.py --model qwen2.5-0.5b [--parts decode,launch,engine]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import bench_offline  # noqa: E402
from bench_offline import free_gpu, run_engine  # noqa: E402
from workload import load_spec, requests  # noqa: E402

CATEGORIES = (  # first match wins; matched against the lower-cased kernel name
    ("attention", ("paged_attention", "flash", "attn")),
    ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul")),
    ("norm", ("rsqrt", "norm", "reduce")),
    ("sampling", ("argmax", "topk", "sort", "softmax", "multinomial")),
    ("copy", ("copy", "memcpy", "memset", "cat", "index")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "silu", "mul", "add")),
)


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")


def cuda_ms(fn, n: int = 20) -> float:
    return bench_offline.cuda_ms(fn, n, warmup=False)


def kernel_table(fn, label: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by_cat, count, names = defaultdict(float), defaultdict(int), defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            by_cat[category(ev.name)] += us
            count[category(ev.name)] += 1
            names[ev.name[:70]] += us
    total = sum(by_cat.values())
    print(f"\n{label}: {total / 1e3:.2f} ms of kernel time in {sum(count.values())} kernels")
    print("| category | ms | kernels | share |\n|---|---:|---:|---:|")
    for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"| {cat} | {us / 1e3:.3f} | {count[cat]} | {us / total:.0%} |")
    print("top kernels:")
    for name, us in sorted(names.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {us / 1e3:7.3f} ms  {name}")


def decode_profile(name: str, args) -> None:
    from gpu.runner import SeqInput
    from gpu.sampler import SampleSpec, sample
    from streamer.config import EngineConfig
    from streamer.engine import build_engine

    ctx, batch = 800, 256
    engine = build_engine(EngineConfig(model=f"random:{name}", kv_memory=args.kv_memory, max_running=batch))
    runner, g = engine.runner, engine.runner.graphs
    per = -(-(ctx + 1) // engine.block_size)
    tables = [engine.allocator.allocate(per) for _ in range(batch)]
    ids, pos = [1000 + i for i in range(batch)], [ctx] * batch
    seqs = [SeqInput([ids[i]], ctx, tables[i], SampleSpec()) for i in range(batch)]
    for _ in range(3):
        runner.step(seqs)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        g._fill(batch, ids, pos, tables)
    fill = (time.perf_counter() - t) / 20 * 1e3
    torch.cuda.synchronize()
    graph, out = g.graphs[batch]
    replay = cuda_ms(graph.replay)
    samp = cuda_ms(lambda: sample(out, [SampleSpec()] * batch, runner.ops.argmax))
    times = []
    for _ in range(20):
        t = time.perf_counter()
        runner.step(seqs)
        times.append((time.perf_counter() - t) * 1e3)
    print(f"\n{name} decode b{batch} ctx{ctx}: runner.step {statistics.median(times):.2f} ms = host fill {fill:.2f} ms"
          f" + graph replay {replay:.2f} ms + argmax {samp:.2f} ms (+ sync)")
    kernel_table(graph.replay, f"{name} decode b{batch}, graph replay")
    inputs = g._inputs(batch)
    meta = g._meta(batch)
    kernel_table(lambda: runner.model.forward(inputs[0], inputs[1], meta, runner.backend, None, runner.ops),
                 f"{name} decode b{batch}, eager forward")
    # A prefill step: 8 requests x 1024 prompt tokens, eager.
    pre = [SeqInput(list(range(100, 1124)), 0, engine.allocator.allocate(64), SampleSpec()) for _ in range(8)]
    kernel_table(lambda: runner.step(pre), f"{name} prefill 8x1024, eager")
    pre_ms = cuda_ms(lambda: runner.step(pre), 5)
    print(f"prefill 8x1024 step: {pre_ms:.2f} ms")
    engine = runner = g = None  # noqa: F841 (frees the arena before the next part)
    free_gpu()


def engine_profile(name: str, args) -> None:
    import trio

    items = requests(load_spec(), args.requests)
    prof = cProfile.Profile()
    args.max_running, args.max_batch_tokens, args.repeat = 256, 8192, 1
    prof.enable()
    wall, tokens = trio.run(run_engine, name, items, args, "engine")  # prints the device's step breakdown
    prof.disable()
    print(f"\n{name} engine, {len(items)} requests: {tokens} tokens in {wall:.2f} s ({tokens / wall:,.0f} tok/s, "
          f"cProfile on)")
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print("trio thread, by own time:\n" + "\n".join(s.getvalue().splitlines()[6:40]))
    free_gpu()


MIXED_SHAPES = ((200, 100), (1000, 200), (3000, 250))  # (prompt chunk tokens, decodes)


def launch_profile(name: str, args) -> None:
    from gpu.runner import SeqInput
    from gpu.sampler import SampleSpec
    from streamer.config import EngineConfig
    from streamer.engine import build_engine

    engine = build_engine(EngineConfig(model=f"random:{name}", kv_memory=min(args.kv_memory, 0.3), max_running=256))
    runner, alloc = engine.runner, engine.allocator
    pieces = runner.pieces
    cuda = runner.device.type == "cuda"

    def seqs(chunk: int, decodes: int) -> list[SeqInput]:
        s = [SeqInput([1 + i % 250 for i in range(chunk)], 0, alloc.allocate(-(-chunk // 16)), SampleSpec())]
        return s + [SeqInput([5], 300, alloc.allocate(19), SampleSpec()) for _ in range(decodes)]

    def timed(ss: list[SeqInput]) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        launched = runner.launch(ss)  # the host's work before the device has the step
        t1 = time.perf_counter()
        runner.collect(launched)
        for x in ss:
            alloc.free(x.block_table)
        return (t1 - t0) * 1e3

    print(f"\n{name} mixed-step launch, host ms, median (min) of 15")
    print("| step | pieces | eager | pieces | eager |\n|---|---:|---:|---:|---:|")
    for chunk, dec in MIXED_SHAPES:
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
        timed(seqs(*MIXED_SHAPES[0]))
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
    print("launching the pieces, by own time:\n" + "\n".join(s.getvalue().splitlines()[6:25]))
    engine = runner = None  # noqa: F841 (frees the arena before the next part)
    free_gpu()


PARTS = {"decode": decode_profile, "launch": launch_profile, "engine": engine_profile}

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b", help="a random:NAME shape (default: %(default)s)")
    ap.add_argument("--kv-memory", type=float, default=0.85)
    ap.add_argument("--requests", type=int, default=256, help="workload requests the engine part runs")
    ap.add_argument("--parts", default="decode,launch,engine", help="which parts, comma-separated (default: all)")
    args = ap.parse_args()
    for part in args.parts.split(","):
        PARTS[part](args.model, args)
