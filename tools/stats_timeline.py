"""A server's /stats over time, as a table: what the latency controller did and what it saw.

`tools/load_sweep.sh` writes the server's /stats once a second to OUT_DIR/stats.jsonl. This prints
one row per sample (every Nth with --every): uptime, running and waiting requests, the step budget
and running cap in force, the controller's last decision (budget action / cap action), requests
shed so far, throughput, the last 10 s window's P99 TTFT, ITL as queued, ITL as sent and event
loop lag, and what the last decision saw over its own period (half a second): the P99s of ITL, of
the decode-only loop cycles and of TTFT, and the requests refused. Then the whole run's
percentiles (`since_start`).

    python3 tools/stats_timeline.py OUT_DIR/stats.jsonl [--every 2] [--from 40 --to 80]
"""

from __future__ import annotations

import argparse
import json
import sys

HEAD = ("| uptime s | running | waiting | budget | running cap | decision | shed | tok/s "
        "| TTFT p99 | ITL p99 | ITL sent p99 | loop lag p99 | decided on: ITL / decode / TTFT p99 | refused |")


def _p99(window: dict, name: str) -> str:
    value = window.get(name, {}).get("p99_ms")
    return "" if value is None else f"{value:.1f}"


def row(sample: dict) -> str:
    """One /stats sample as a table row (ms for the P99s, the last 10 s window)."""
    batching = sample.get("batching", {})
    ctl = batching.get("controller") or {}
    last = ctl.get("last") or {}
    decision = f"{last['action']}/{last.get('cap_action', '')}" if last else ""
    cap = batching.get("running_cap")
    w = sample.get("window", {})
    return (f"| {sample['uptime_s']:.1f} | {sample['running']} | {sample['waiting']} | {batching.get('max_batch_tokens', '')} "
            f"| {'' if cap is None else cap} | {decision} | {ctl.get('shed', '')} | {sample.get('throughput_tok_s', 0):,.0f} "
            f"| {_p99(w, 'ttft')} | {_p99(w, 'itl')} | {_p99(w, 'itl_sent')} | {_p99(w, 'loop_lag')} "
            f"| {_period(last)} | {last.get('refused', '')} |")


def _period(last: dict) -> str:
    """The P99s the last decision was made on, over its own period (ms): ITL, the decode-only loop
    cycles, TTFT."""
    if not last:
        return ""
    return " / ".join("" if last.get(k) is None else f"{last[k]:.1f}"
                      for k in ("itl_p99_ms", "decode_step_p99_ms", "ttft_p99_ms"))


def timeline(lines, every: int = 1, start: float = 0.0, end: float = float("inf")) -> str:
    """The table for /stats samples given as JSON lines; blank lines are skipped."""
    samples = [json.loads(line) for line in lines if line.strip()]
    out = [HEAD, "|" + "---:|" * (HEAD.count("|") - 1)]
    picked = [s for s in samples if start <= s["uptime_s"] <= end][::every]
    out += [row(s) for s in picked]
    if samples:
        total = samples[-1].get("since_start", {})
        out.append("")
        out.append("whole run (since start), ms: " + "; ".join(
            f"{name} p99 {total[name]['p99_ms']}" for name in ("ttft", "itl", "itl_sent", "loop_lag")
            if total.get(name, {}).get("p99_ms") is not None))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", help="a stats.jsonl (one /stats JSON a line); - for standard input")
    ap.add_argument("--every", type=int, default=1, help="print every Nth sample")
    ap.add_argument("--from", dest="start", type=float, default=0.0, help="first uptime (s) to print")
    ap.add_argument("--to", dest="end", type=float, default=float("inf"), help="last uptime (s) to print")
    args = ap.parse_args()
    with (sys.stdin if args.path == "-" else open(args.path)) as f:
        print(timeline(f, args.every, args.start, args.end))


if __name__ == "__main__":
    main()
