"""How steady is this host's single-thread speed? Times one fixed pure-Python loop over and over on
each of some CPUs (each pinned to its CPU, all at once) and prints, per CPU, the fastest, median
and slowest sample, the share of samples slower than `--slow` x the fastest, and the longest run
of such samples.

    python tools/host_probe.py --cpus 1,6,11,15 --seconds 60

Why: at the rates where the latency controller is compared with a fixed budget, the server's step
loop is one busy Python thread, so its capacity is the CPU's speed. On the lent H100 hosts (KVM
guests) an idle vCPU ran this loop in ~70 ms most of the time and ~115-145 ms in spells of 1-20
s, on each vCPU independently, with no steal time shown (docs/BENCHMARKS.md, eleventh session).
Run it before a sweep to see which kind of host you have. Linux only (CPU affinity).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time


def probe(cpu: int, seconds: float, interval: float, loop: int, repeats: int) -> list[tuple[float, float]]:
    """(time since start, ms) samples on `cpu`: each the best of `repeats` runs of the loop."""
    os.sched_setaffinity(0, {cpu})
    start = time.monotonic()
    samples = []
    while (now := time.monotonic()) - start < seconds:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            s = 0
            for i in range(loop):
                s += i
            best = min(best, time.perf_counter() - t)
        samples.append((now - start, best * 1e3))
        time.sleep(interval)
    return samples


def summary(samples: list[tuple[float, float]], slow: float) -> dict:
    """Fastest / median / slowest ms, the share of samples over `slow` x the fastest, and the
    longest run of consecutive slow samples (as seconds from its first sample to the next one)."""
    ms = [m for _, m in samples]
    fastest = min(ms)
    is_slow = [m > slow * fastest for m in ms]
    longest, start = 0.0, None  # a slow run lasts from its first sample to the next fast one
    for (t, _), slow_here in zip(samples, is_slow, strict=True):
        if slow_here and start is None:
            start = t
        elif not slow_here and start is not None:
            longest, start = max(longest, t - start), None
    if start is not None:  # still slow at the end
        longest = max(longest, samples[-1][0] - start)
    return {"samples": len(ms), "fastest_ms": fastest, "median_ms": statistics.median(ms),
            "slowest_ms": max(ms), "slow_share": sum(is_slow) / len(ms), "longest_slow_s": longest}


def parse_cpus(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--cpus", help="CPU list, e.g. 1,6 or 2-5 (default: up to 4 of the allowed ones)")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to probe")
    ap.add_argument("--interval", type=float, default=0.5, help="pause between samples")
    ap.add_argument("--loop", type=int, default=1_000_000, help="iterations of the timed loop")
    ap.add_argument("--repeats", type=int, default=3, help="a sample is the best of this many loops")
    ap.add_argument("--slow", type=float, default=1.3, help="a sample is slow above this x the CPU's fastest")
    args = ap.parse_args(argv)
    allowed = sorted(os.sched_getaffinity(0))
    try:
        cpus = parse_cpus(args.cpus) if args.cpus else allowed[:4]
    except ValueError:
        ap.error(f"--cpus: not a CPU list: {args.cpus!r}")
    if bad := sorted(set(cpus) - set(allowed)):
        ap.error(f"--cpus: not available to this process: {bad} (allowed: {allowed})")
    print(f"probing CPUs {cpus} for {args.seconds:g} s ...", file=sys.stderr, flush=True)
    with mp.get_context("spawn").Pool(len(cpus)) as pool:
        pending = pool.starmap_async(probe, [(c, args.seconds, args.interval, args.loop, args.repeats) for c in cpus])
        t0 = time.monotonic()
        while not pending.ready():
            pending.wait(10)
            if not pending.ready():
                print(f"  {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        results = pending.get()
    print(f"| CPU | samples | fastest ms | median ms | slowest ms | slow (> {args.slow:g}x fastest) | longest slow run s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for cpu, samples in zip(cpus, results, strict=True):
        s = summary(samples, args.slow)
        print(f"| {cpu} | {s['samples']} | {s['fastest_ms']:.0f} | {s['median_ms']:.0f} | {s['slowest_ms']:.0f} "
              f"| {s['slow_share']:.0%} | {s['longest_slow_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
