"""Benchmark CudaAttention (decode and prefill) against torch SDPA (flash) on dense, unpaged tensors.

Run on a GPU: `python3 tools/bench_attention.py [--quick] [--out FILE.md]`. Times are CUDA-event
medians over CUDA-graph replays of several calls, after warm-up, on random (non-zero) data; small
KV working sets are replicated so that consecutive calls do not hit L2.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import gpu.cuda_attention
from gpu.arena import ArenaShape, KVArena, kv_bytes_per_token
from gpu.attention import build_metadata
from gpu.cuda_attention import CudaAttention

MODELS = {"qwen2.5-0.5b": (14, 2, 64), "llama-3-8b": (32, 8, 128)}  # (Hq, Hkv, D)
DTYPE = torch.bfloat16
BLOCK = 16
KV_DTYPE = None  # None: the arena stores DTYPE; torch.int8 / torch.int4: --kv-dtype int8 / int4
MIN_WORKING_SET = 256 << 20  # replicate inputs below this so replays stream from HBM, not L2
MAX_KV_BYTES = 20e9  # arena + dense peer copy must fit with room to spare on an 80 GB card


def bench_ms(calls, reps: int = 15) -> float:
    """Median ms per call: calls is a list of thunks, replayed round-robin inside one CUDA graph."""
    for c in calls[:3]:
        c()
    torch.cuda.synchronize()
    t = time.perf_counter()
    calls[0]()
    torch.cuda.synchronize()
    per = max(time.perf_counter() - t, 1e-6)
    n = max(len(calls), min(64, math.ceil(2e-3 / per)))  # calls per replay: >= ~2 ms of work
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            calls[i % len(calls)]()
    graph.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / n)
    return statistics.median(times)


def ceilings() -> tuple[float, float]:
    """(device-to-device copy GB/s counting read + write, bf16 8192^3 matmul TFLOP/s)."""
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    copy_ms = bench_ms([lambda: y.copy_(x)])
    a = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    b = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    mm_ms = bench_ms([lambda: a @ b])
    return 2 * x.numel() / copy_ms / 1e6, 2 * 8192**3 / mm_ms / 1e9


def paged_calls(hq, hkv, d, q_lens, seq_lens, copies):
    """(thunks running CudaAttention on `copies` disjoint block sets of one arena, kv splits used)."""
    per = sum(-(-s // BLOCK) for s in seq_lens)
    arena = KVArena(ArenaShape(1, per * copies, hkv, BLOCK, d), DTYPE, "cuda", KV_DTYPE)
    if KV_DTYPE == torch.int8:  # codes and per-token scales, never zeros
        arena.kv.random_(-127, 128)
        arena.scales.uniform_(0.005, 0.02)
    elif KV_DTYPE == torch.int4:  # bytes of two codes, group scales
        arena.kv.random_(0, 256)
        arena.scales.uniform_(0.1, 0.4)
    else:
        arena.kv.normal_()
    perm = torch.randperm(per * copies).tolist()  # scattered blocks, as after a long run
    backend = CudaAttention(arena, d**-0.5)
    backend.warmup()
    calls, at = [], 0
    for _ in range(copies):
        tables = []
        for s in seq_lens:
            n = -(-s // BLOCK)
            tables.append(perm[at : at + n])
            at += n
        meta = build_metadata(q_lens, seq_lens, tables, BLOCK, "cuda")
        t = sum(q_lens)
        q = torch.randn(t, hq, d, device="cuda", dtype=DTYPE)
        k = torch.randn(t, hkv, d, device="cuda", dtype=DTYPE)
        v = torch.randn(t, hkv, d, device="cuda", dtype=DTYPE)
        out = torch.empty_like(q)
        calls.append(lambda q=q, k=k, v=v, meta=meta, out=out: backend.forward(0, q, k, v, meta, out=out))
    return calls, backend.launch_plan(meta, hq)[3]


def sdpa_calls(shape_q, shape_kv, causal, copies):
    calls = []
    for _ in range(copies):
        q = torch.randn(shape_q, device="cuda", dtype=DTYPE)
        k = torch.randn(shape_kv, device="cuda", dtype=DTYPE)
        v = torch.randn(shape_kv, device="cuda", dtype=DTYPE)
        gqa = q.shape[1] != k.shape[1]
        if gqa and causal:  # flash may refuse enable_gqa on some builds: fall back to repeated heads
            try:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            except RuntimeError:
                print("SDPA flash refused enable_gqa: repeating kv heads", flush=True)
                k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], 1) for x in (k, v))
                gqa = False

        def call(q=q, k=k, v=v, gqa=gqa):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        calls.append(call)
    return calls


def decode_rows(copy_gbs, batches, contexts):
    rows = []
    for model, (hq, hkv, d) in MODELS.items():
        for b in batches:
            for ctx in contexts:
                kv_bytes = b * ctx * hkv * d * 2 * 2  # bf16, the peer's
                if kv_bytes > MAX_KV_BYTES:
                    rows.append((model, b, ctx, None, None, None, None, None))
                    continue
                arena_bytes = b * ctx * kv_bytes_per_token(1, hkv, d, KV_DTYPE or DTYPE)  # scales included
                moved = arena_bytes + 2 * b * hq * d * 2  # KV read + q read + o written
                copies = min(256, max(1, math.ceil(MIN_WORKING_SET / arena_bytes)))
                calls, splits = paged_calls(hq, hkv, d, [1] * b, [ctx] * b, copies)
                ours = bench_ms(calls)
                del calls
                # peer: the G q heads of a kv head as G queries over dense (B, Hkv, ctx, D), no mask
                copies = min(256, max(1, math.ceil(MIN_WORKING_SET / kv_bytes)))
                peer = bench_ms(sdpa_calls((b, hkv, hq // hkv, d), (b, hkv, ctx, d), False, copies))
                torch.cuda.empty_cache()
                rows.append((model, b, ctx, ours, moved / ours / 1e6, copy_gbs, peer, splits))
                print(
                    f"decode {model} B={b} ctx={ctx}: {ours * 1e3:.1f} us vs sdpa {peer * 1e3:.1f} us",
                    flush=True,
                )
    return rows


def prefill_rows(chunks, tokens=16384):
    rows = []
    for model, (hq, hkv, d) in MODELS.items():
        for L in chunks:
            n = max(1, tokens // L)
            flops = 4 * d * hq * n * L * (L + 1) / 2  # causal (q, k) pairs
            calls, _ = paged_calls(hq, hkv, d, [L] * n, [L] * n, 1)
            ours = bench_ms(calls)
            del calls
            peer = bench_ms(sdpa_calls((n, hq, L, d), (n, hkv, L, d), True, 1))
            torch.cuda.empty_cache()
            rows.append((model, n, L, ours, flops / ours / 1e9, peer, flops / peer / 1e9))
            print(f"prefill {model} {n}x{L}: {ours * 1e3:.1f} us vs sdpa {peer * 1e3:.1f} us", flush=True)
    return rows


def render(dev, copy_gbs, mm_tflops, dec, pre) -> str:
    lines = [
        f"card: {dev}; dtype bf16; arena block size {BLOCK}; copy {copy_gbs:.0f} GB/s (read+write), "
        f"bf16 matmul {mm_tflops:.0f} TFLOP/s",
        "",
        "Decode (q_len 1 per request):",
        "",
        "| model | batch | context | ours us | ours GB/s | % of copy | splits | SDPA flash us | ours vs SDPA |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model, b, ctx, ours, gbs, cp, peer, splits in dec:
        if ours is None:
            lines.append(f"| {model} | {b} | {ctx} | skipped (KV > {MAX_KV_BYTES / 1e9:.0f} GB) | | | | | |")
            continue
        lines.append(
            f"| {model} | {b} | {ctx} | {ours * 1e3:.1f} | {gbs:.0f} | {100 * gbs / cp:.0f}% | {splits} | "
            f"{peer * 1e3:.1f} | {peer / ours:.2f}x |"
        )
    lines += [
        "",
        "Prefill (fresh chunks, causal; n requests x chunk = 16k tokens):",
        "",
        "| model | n x chunk | ours us | ours TFLOP/s | % of matmul | SDPA flash us | SDPA TFLOP/s | ours / SDPA |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model, n, L, ours, tf, peer, ptf in pre:
        lines.append(
            f"| {model} | {n} x {L} | {ours * 1e3:.0f} | {tf:.0f} | {100 * tf / mm_tflops:.0f}% | "
            f"{peer * 1e3:.0f} | {ptf:.0f} | {tf / ptf:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--out", help="also write the markdown table here")
    ap.add_argument("--only", choices=["decode", "prefill"], help="one half of the table")
    ap.add_argument("--m64-min-blocks", type=int, help="override the prefill kernel's launch bound")
    ap.add_argument("--m16-stages", type=int, help="override the decode kernel's pipeline depth")
    ap.add_argument("--block-size", type=int, default=16, help="arena block size (tokens)")
    ap.add_argument("--batches", help="decode batch sizes, comma-separated (default 1,16,64,256)")
    ap.add_argument("--contexts", help="decode contexts, comma-separated (default 512,2048,8192,32768)")
    ap.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--kv-dtype", choices=["auto", "int8", "int4"], default="auto",
                    help="our arena's storage: the compute dtype, int8 codes with per-token scales, or int4 "
                         "codes with a scale per 32 values")
    args = ap.parse_args()
    globals()["BLOCK"] = args.block_size
    globals()["KV_DTYPE"] = {"int8": torch.int8, "int4": torch.int4}.get(args.kv_dtype)
    if args.m64_min_blocks:
        gpu.cuda_attention._M64_MIN_BLOCKS = args.m64_min_blocks
    if args.m16_stages:
        gpu.cuda_attention._M16_STAGES = {64: args.m16_stages, 128: args.m16_stages}
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    warm = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    for _ in range(200):  # ~0.3 s of matmuls so clocks settle before the ceilings are measured
        warm @ warm
    del warm
    copy_gbs, mm_tflops = ceilings()
    print(f"{dev}: copy {copy_gbs:.0f} GB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s", flush=True)

    batches, contexts, chunks = [1, 16, 64, 256], [512, 2048, 8192, 32768], [512, 2048, 8192]
    if args.quick:
        batches, contexts, chunks = [1, 64], [2048, 32768], [2048]
    if args.batches:
        batches = [int(x) for x in args.batches.split(",")]
    if args.contexts:
        contexts = [int(x) for x in args.contexts.split(",")]
    if args.models:
        for name in set(MODELS) - set(args.models.split(",")):
            del MODELS[name]
    dec = [] if args.only == "prefill" else decode_rows(copy_gbs, batches, contexts)
    pre = [] if args.only == "decode" else prefill_rows(chunks)
    for key, kernels in gpu.cuda_attention._MODULES.items():
        print(f"module {key}: resident blocks/SM", {v: r for v, (_k, r) in kernels.items()})
    table = render(dev, copy_gbs, mm_tflops, dec, pre)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
