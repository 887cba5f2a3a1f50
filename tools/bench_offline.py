"""Offline throughput on the shared workload, every system in ONE process on the same card.

(a) streamer, continuous batching (`serial`: the same with overlapped steps off, so each step
waits for the host to plan it; `threaded`: overlapped, with the launch and the wait in a worker
thread as on the CPU instead of on the loop's thread; `eager-mixed`: steps with prefill launched
eagerly instead of as CUDA graph pieces); (b) streamer, static batches of 64 (`static-padded`: padded as a
static batch is, each prompt to the batch's longest and each finished row decoding on to the
batch's end); (c) Hugging Face
continuous batching (`init_continuous_batching`, per-request max_new_tokens, EOS off);
(d) Hugging Face `generate` in left-padded batches of 64. Prints output tok/s, wall time, peak
GPU memory, ratios to (c), each model's physical floor (from its shapes, the workload and the
copy bandwidth / matmul rate measured in the same run), and a batch-256 decode step against its
bandwidth floor.

    python tools/bench_offline.py --models qwen2.5-0.5b,llama-3.2-1b,llama-3-8b
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import structlog
import torch
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from workload import Item, load_spec, requests  # noqa: E402

from gpu.model import ModelSpec  # noqa: E402
from gpu.models import load_hf_model, random_config  # noqa: E402
from streamer.config import EngineConfig  # noqa: E402
from streamer.engine import open_engine  # noqa: E402
from streamer.types import SamplingParams, TokenEvent  # noqa: E402

SYSTEMS = ("engine", "serial", "threaded", "eager-mixed", "static", "static-padded", "hf-cb", "hf-generate")
OURS = ("engine", "serial", "threaded", "eager-mixed", "static", "static-padded")


def progress(label: str, done: int, total: int, t0: float) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    rate = done / max(time.perf_counter() - t0, 1e-9)
    print(f"\r  {label:<12} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} tok  {rate:8.0f} tok/s",
          end="", file=sys.stderr, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_ms(fn, n: int, warmup: bool = True) -> float:
    """Median device time of `fn` over `n` runs, in ms, timed with CUDA events (after one untimed
    run unless `warmup` is False)."""
    if warmup:
        fn()
    times = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


# --- ceilings and floors ---------------------------------------------------------------------
def ceilings(device) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s), measured now."""
    if device.type != "cuda":
        return float("nan"), float("nan")
    x = torch.randn(1 << 28, device=device, dtype=torch.bfloat16)  # 512 MiB
    y = torch.empty_like(x)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)

    bw = 2 * x.numel() * 2 / (cuda_ms(lambda: y.copy_(x), 10) / 1000)
    flops = 2 * 8192**3 / (cuda_ms(lambda: a @ b, 10) / 1000)
    return bw, flops  # the tensors die here; free_gpu() returns their memory


def weight_bytes(s: ModelSpec, itemsize=2) -> int:
    d = s.head_dim
    per_layer = s.hidden_size * (s.num_heads * d + 2 * s.num_kv_heads * d) + s.num_heads * d * s.hidden_size
    per_layer += 3 * s.hidden_size * s.intermediate_size
    # a decode step reads every layer and the LM head; only a few embedding rows
    return (s.num_layers * per_layer + s.vocab_size * s.hidden_size) * itemsize


def kv_bytes_per_token(s: ModelSpec, itemsize=2) -> int:
    return s.num_layers * 2 * s.num_kv_heads * s.head_dim * itemsize


def floor_seconds(s: ModelSpec, items: list[Item], bw: float, flops: float) -> float:
    """Every decode step reads the weights once (all requests decode together, so there are
    max(output) steps); every generated token reads its context's KV once; prefill at peak FLOPs."""
    steps = max(i.output_len for i in items)
    kv_reads = sum(i.output_len * len(i.prompt) + i.output_len * (i.output_len - 1) // 2 for i in items)
    prompt = sum(len(i.prompt) for i in items)
    dense = weight_bytes(s) / 2 - s.vocab_size * s.hidden_size  # params touched per prefill token
    attn = sum(4 * s.num_layers * s.num_heads * s.head_dim * len(i.prompt) ** 2 / 2 for i in items)
    return (steps * weight_bytes(s) + kv_reads * kv_bytes_per_token(s)) / bw + (2 * dense * prompt + attn) / flops


# --- systems ---------------------------------------------------------------------------------
async def run_engine(name: str, items: list[Item], args, system: str) -> tuple[float, int]:
    static = system.startswith("static")
    knobs = {} if args.defaults else {"kv_memory": args.kv_memory, "max_running": args.max_running,
                                      "max_batch_tokens": args.max_batch_tokens}
    config = EngineConfig(model=f"random:{name}", **knobs, static_batch=64 if static else None,
                          static_padding=system == "static-padded",
                          max_waiting=max(1024, len(items) + 1), overlap=False if system == "serial" else None,
                          mixed_graphs=system != "eager-mixed",
                          launch="thread" if system == "threaded" else None)  # threaded: as on the CPU
    async with open_engine(config) as engine:
        b = engine.batching()
        print(f"{system}: step budget {b['max_batch_tokens']} ({b['source']}), running cap {engine.scheduler.max_running}, "
              f"{engine.allocator.num_blocks} KV blocks; auto-tune {b['auto_tune']}", file=sys.stderr)
        gc.collect()
        gc.freeze()  # as `streamer serve` does once ready: full collections skip the start-up heap
        walls, produced = [], 0
        vocab = engine.loaded.model.spec.vocab_size
        for rep_ in range(args.repeat):  # passes over the whole workload in the same engine
            engine.metrics.steps = deque(maxlen=None)  # keep every step for the breakdown below
            # Each pass changes every prompt's first token, so nothing hits the prefix cache of the last
            varied = [Item([(i.prompt[0] + rep_) % vocab, *i.prompt[1:]], i.output_len) for i in items]
            wall, produced = await one_pass(engine, varied, f"{system} {rep_ + 1}/{args.repeat}")
            walls.append(wall)
            print_steps(system, list(engine.metrics.steps), wall)
    gc.unfreeze()
    if len(walls) > 1:
        print(f"  {system}: {produced / max(walls):,.0f} to {produced / min(walls):,.0f} tok/s over {len(walls)} passes; "
              f"the median is reported", file=sys.stderr)
    return statistics.median(walls), produced


async def one_pass(engine, items: list[Item], label: str) -> tuple[float, int]:
    total = sum(i.output_len for i in items)
    done = [0]

    async def one(item: Item):
        params = SamplingParams(max_tokens=item.output_len, ignore_eos=True)
        async with engine.submit(item.prompt, params) as gen:
            async for ev in gen:
                done[0] += isinstance(ev, TokenEvent)

    async def show(t0):
        while True:
            progress(label, done[0], total, t0)
            await trio.sleep(0.5)

    t0 = time.perf_counter()
    async with trio.open_nursery() as outer:
        outer.start_soon(show, t0)
        async with trio.open_nursery() as nursery:
            for item in items:
                nursery.start_soon(one, item)
        outer.cancel_scope.cancel()
    sync()
    wall = time.perf_counter() - t0
    progress(label, done[0], total, t0)
    print(file=sys.stderr)
    return wall, done[0]


def print_steps(label: str, steps: list, wall: float) -> None:
    """Where the engine's wall time went, from its own step records: the device's time in
    decode-only steps (CUDA graph replays where the batch fits) and in steps with prefill tokens
    (eager), and the time the device sat idle between steps, waiting for the host (CUDA events)."""
    groups = {"decode-only": [s for s in steps if s.prefill_tokens == 0],
              "with prefill": [s for s in steps if s.prefill_tokens > 0]}
    print(f"  {label} steps: {len(steps)} in {wall:.2f} s; device idle between steps {sum(s.idle_gap for s in steps):.2f} s",
          file=sys.stderr)
    for name, group in groups.items():
        if group:
            secs = sorted(s.seconds for s in group)
            tokens = sum(s.prefill_tokens + s.decode_tokens for s in group)
            print(f"  {label} {name:>12}: {len(group):5d} steps, {sum(secs):6.2f} s, median {secs[len(secs) // 2] * 1e3:6.2f} ms, "
                  f"{tokens / len(group):7.1f} tokens a step, {sum(s.decode_tokens for s in group) / len(group):6.1f} decodes",
                  file=sys.stderr)


def run_hf_cb(model, items: list[Item]) -> tuple[float, int]:
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(max_new_tokens=max(i.output_len for i in items), do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gen_cfg)
    manager.start()
    total = sum(i.output_len for i in items)
    t0 = time.perf_counter()
    try:
        for k, item in enumerate(items):
            try:
                manager.add_request(input_ids=item.prompt, request_id=f"r{k}", max_new_tokens=item.output_len,
                                    eos_token_id=-1)
            except TypeError:  # older transformers: no per-request eos argument
                manager.add_request(input_ids=item.prompt, request_id=f"r{k}", max_new_tokens=item.output_len)
        finished, produced = 0, 0
        while finished < len(items):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("Hugging Face continuous batching stopped early")
                continue
            if result.is_finished():
                finished += 1
                produced += len(result.generated_tokens)
                progress("hf-cb", produced, total, t0)
        sync()
        wall = time.perf_counter() - t0
    finally:
        manager.stop(block=True)
    print(file=sys.stderr)
    return wall, produced


def run_hf_generate(model, items: list[Item], batch: int = 64) -> tuple[float, int]:
    total = sum(i.output_len for i in items)
    useful = 0
    t0 = time.perf_counter()
    for start in range(0, len(items), batch):
        group = items[start : start + batch]
        width = max(len(i.prompt) for i in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, item in enumerate(group):  # left padding
            ids[r, width - len(item.prompt) :] = torch.tensor(item.prompt)
            mask[r, width - len(item.prompt) :] = 1
        longest = max(i.output_len for i in group)
        with torch.no_grad():
            model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=longest,
                           min_new_tokens=longest, do_sample=False, pad_token_id=0, eos_token_id=None)
        useful += sum(i.output_len for i in group)  # tokens past a request's own length are waste
        progress("hf-generate", useful, total, t0)
    sync()
    print(file=sys.stderr)
    return time.perf_counter() - t0, useful


def decode_step(name: str, args, bw: float) -> tuple[float, float, float]:
    """One batch-256 decode step at ~800-token contexts: the median of its device time (CUDA
    events, what overlapped steps cost), of its time launch to ids with the host's packing, and
    its bandwidth floor."""
    from gpu.runner import SeqInput
    from gpu.sampler import SampleSpec
    from streamer.engine import build_engine

    ctx, batch = 800, 256
    engine = build_engine(EngineConfig(model=f"random:{name}", kv_memory=args.kv_memory, max_running=batch))
    per = -(-(ctx + 1) // engine.block_size)
    seqs = [SeqInput([1000 + i], ctx, engine.allocator.allocate(per), SampleSpec()) for i in range(batch)]
    for _ in range(3):
        engine.runner.step(seqs)
    times, device = [], []
    runner = engine.runner
    for _ in range(20):
        sync()
        t = time.perf_counter()
        launched = runner.launch(seqs)
        runner.collect(launched)  # ends in the step's one device-to-host copy
        times.append(time.perf_counter() - t)
        device.append(runner.timing(launched, None)[0])
    spec = engine.loaded.model.spec
    floor = (weight_bytes(spec) + batch * (ctx + 1) * kv_bytes_per_token(spec)) / bw
    del engine, runner
    free_gpu()
    return statistics.median(device), statistics.median(times), floor


def free_gpu() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen2.5-0.5b,llama-3.2-1b,llama-3-8b")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    ap.add_argument("--num-requests", type=int, default=None, help="default: the workload's")
    ap.add_argument("--peer-requests", type=int, default=None, help="run (c),(d) on the first N requests only")
    ap.add_argument("--kv-memory", type=float, default=0.85)
    ap.add_argument("--max-running", type=int, default=256)
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--defaults", action="store_true",
                    help="our systems with `streamer serve`'s defaults for the three flags above (KV arena, running "
                         "cap, auto-tuned step budget)")
    ap.add_argument("--no-decode-step", action="store_true")
    ap.add_argument("--repeat", type=int, default=1,
                    help="passes over the workload for each of our systems, in one engine; the median is reported")
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # no per-request lines
    systems = args.systems.split(",")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bw, flops = ceilings(device)
    items = requests(load_spec(), args.num_requests)
    peer_items = items[: args.peer_requests] if args.peer_requests else items
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"card: {card}; copy bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s; "
          f"{len(items)} requests, {sum(i.output_len for i in items)} output tokens", file=sys.stderr)
    rows, steps = [], []
    for name in args.models.split(","):
        spec = ModelSpec.from_hf_config(random_config(name))
        if spec.vocab_size <= 32000:  # tiny test models: fold ids into their vocabulary
            items = [Item([t % spec.vocab_size for t in i.prompt], i.output_len) for i in items]
            peer_items = items[: len(peer_items)]
        floor = floor_seconds(spec, items, bw, flops)
        results = {}
        for system in systems:
            free_gpu()
            print(f"{name} / {system}", file=sys.stderr)
            if system in OURS:
                wall, toks = trio.run(run_engine, name, items, args, system)
            else:
                model = load_hf_model(f"random:{name}", device, dtype)
                fn = run_hf_cb if system == "hf-cb" else run_hf_generate
                wall, toks = fn(model, peer_items)
                del model
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            results[system] = (wall, toks, peak)
        for system, (wall, toks, peak) in results.items():
            rate = toks / wall
            ref = results.get("hf-cb")
            ratio = rate / (ref[1] / ref[0]) if ref else float("nan")
            pct = 100 * floor / wall if system in OURS and len(items) else float("nan")
            rows.append((name, system, toks, wall, rate, peak, ratio, pct))
            print(f"RESULT {name} {system}: {toks} tokens in {wall:.2f} s = {rate:,.0f} tok/s, peak {peak:.1f} GiB, "
                  f"{ratio:.2f}x HF CB, {pct:.0f}% of floor", flush=True)
        if not args.no_decode_step and device.type == "cuda":
            free_gpu()
            steps.append((name, *decode_step(name, args, bw)))
            print(f"RESULT {name} decode step b256 ctx800: device {steps[-1][1] * 1e3:.2f} ms, launch to ids "
                  f"{steps[-1][2] * 1e3:.2f} ms, floor {steps[-1][3] * 1e3:.2f} ms", flush=True)
        print(f"{name}: floor {floor:.2f} s ({sum(i.output_len for i in items) / floor:,.0f} tok/s)", file=sys.stderr)

    print(f"\n{card}, bf16 = {dtype == torch.bfloat16}, copy {bw / 1e12:.2f} TB/s, matmul {flops / 1e12:.0f} TFLOP/s")
    print("| model | system | output tokens | wall s | output tok/s | peak GiB | x HF CB | % of floor |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, system, toks, wall, rate, peak, ratio, pct in rows:
        print(f"| {name} | {system} | {toks} | {wall:.2f} | {rate:,.0f} | {peak:.1f} | {ratio:.2f} | {pct:.0f}% |")
    if steps:
        print("\n| model | decode step b256 ctx800, device | launch to ids | bandwidth floor | device / floor |")
        print("|---|---:|---:|---:|---:|")
        for name, d, t, f in steps:
            print(f"| {name} | {d * 1e3:.2f} ms | {t * 1e3:.2f} ms | {f * 1e3:.2f} ms | {d / f:.2f}x |")


if __name__ == "__main__":
    main()
