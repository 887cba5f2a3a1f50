"""The server against its own engine, in one run: what a user's server delivers, one websocket per
request, next to what the engine does offline on the same card and workload.

For each server configuration: start `python -m streamer serve` with its flags, load it at a
saturating Poisson rate with tools/loadgen.py (a websocket per request, over --processes client
processes), read back delivered tok/s and client/server P99s, and the server's CPU time per
streamed token (every process of the server: supervisor, core, front ends), then stop it.
`--offline` first runs tools/bench_offline.py (our engine alone) for the ratio column.

    python tools/serve_bench.py --model random:qwen2.5-0.5b --offline --rates 2000,90 --num-requests 256 \\
        --processes 4 --config "one process=--frontends 0" --config "default="
    python tools/serve_bench.py --model random:tiny-qwen3 --rates 20 --num-requests 60 --cap-prompt 64 \\
        --cap-output 32 --config "one process=--frontends 0" --config "default=" --server-flags "--kv-memory 0.05"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far (/proc)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def get(url: str, path: str, timeout: float = 5) -> dict:
    return json.loads(urllib.request.urlopen(url + path, timeout=timeout).read())


def start_server(model: str, port: int, flags: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "streamer", "serve", "--model", model, "--port", str(port), *shlex.split(flags)]
    print(f"$ {shlex.join(cmd)}", file=sys.stderr)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_ready(log: Path, proc: subprocess.Popen, timeout: float = 900) -> None:
    """Until the server logs its ready line: every front end is serving (a /healthz answer would
    come from the first front end up)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before it was ready")
        if "Streamer ready" in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise SystemExit("server not ready in time")


def server_pids(url: str, proc: subprocess.Popen) -> dict[str, list[int]]:
    """The server's processes by role: the supervisor, the core, the front ends."""
    procs = get(url, "/stats").get("processes")
    if not procs:  # one process (--frontends 0)
        return {"supervisor": [proc.pid], "core": [], "frontends": []}
    cores = procs.get("cores") or [procs["core"]]  # one per data-parallel replica
    return {"supervisor": [proc.pid], "core": [c["pid"] for c in cores], "frontends": [f["pid"] for f in procs["frontends"]]}


def offline(model: str, extra: str) -> float | None:
    name = model.removeprefix("random:")
    cmd = [sys.executable, "tools/bench_offline.py", "--models", name, "--systems", "engine", "--no-decode-step",
           *shlex.split(extra)]
    print(f"$ {shlex.join(cmd)}", file=sys.stderr)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    sys.stderr.write(out.stderr[-3000:])
    m = re.search(rf"RESULT {re.escape(name)} engine: .*= ([\d,]+) tok/s", out.stdout + out.stderr)
    return float(m.group(1).replace(",", "")) if m else None


def run_config(args, name: str, flags: str, out: Path) -> dict:
    url = f"http://127.0.0.1:{args.port}"
    out.mkdir(parents=True, exist_ok=True)
    proc = start_server(args.model, args.port, f"{args.server_flags} {flags}", out / "server.log")
    try:
        wait_ready(out / "server.log", proc)
        pids = server_pids(url, proc)
        cpu0 = {role: cpu_seconds(p) for role, p in pids.items()}
        tokens0 = get(url, "/stats")["tokens_generated"]
        load = [sys.executable, "tools/loadgen.py", "--url", url, "--rates", args.rates, "--num-requests",
                str(args.num_requests), "--processes", str(args.processes), "--out", str(out),
                *shlex.split(args.loadgen_flags)]
        print(f"$ {shlex.join(load)}", file=sys.stderr)
        subprocess.run(load, cwd=ROOT, check=True, stdout=(out / "loadgen.txt").open("w"))
        stats = get(url, "/stats")
        cpu = {role: cpu_seconds(p) - cpu0[role] for role, p in pids.items()}
        tokens = stats["tokens_generated"] - tokens0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    rows = []
    for result in json.loads((out / "loadgen.json").read_text())["results"]:
        rows.append({"name": name, "flags": flags, "rate": result["load"], "tok_s": result["output_tok_s"],
                     "completed": result["completed"], "sent": result["sent"], "errors": result["errors"],
                     "client": result["client"], "server": result["server"], "processes": sum(map(len, pids.values())),
                     "client_cpu": [p["cpu_share"] for p in result["client_processes"]], "idle": result.get("idle_sockets"),
                     # over every level of the run: the server's CPU (all its processes) per streamed token,
                     # and the core's and the front ends' shares of it
                     "cpu_ms_per_token": round(sum(cpu.values()) * 1000 / tokens, 4) if tokens else None,
                     "core_ms_per_token": round(cpu["core"] * 1000 / tokens, 4) if tokens and pids["core"] else None,
                     "frontends_ms_per_token": round(cpu["frontends"] * 1000 / tokens, 4)
                     if tokens and pids["frontends"] else None})
    return rows


def idle_open(idle: dict | None) -> str:
    return f"{idle['open']}/{idle['requested']}" if idle and idle.get("requested") else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="random:qwen2.5-0.5b")
    p.add_argument("--config", action="append", default=[],
                   help="NAME=SERVER FLAGS, repeatable; default: one process (--frontends 0) and the defaults")
    p.add_argument("--server-flags", default="", help="flags every configuration gets")
    p.add_argument("--loadgen-flags", default="", help="extra tools/loadgen.py flags (e.g. --cap-output 64)")
    p.add_argument("--rates", default="200", help="offered req/s (Poisson), comma-separated levels; above "
                   "capacity saturates")
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--processes", type=int, default=4, help="load generator processes")
    p.add_argument("--offline", action="store_true", help="run tools/bench_offline.py first (engine alone)")
    p.add_argument("--offline-flags", default="", help="extra tools/bench_offline.py flags")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "serve_bench")
    args = p.parse_args()
    configs = [c.split("=", 1) for c in args.config] or [["one process", "--frontends 0"], ["default", ""]]
    base = offline(args.model, args.offline_flags) if args.offline else None
    rows = [row for name, flags in configs for row in run_config(args, name, flags, args.out / re.sub(r"\W+", "_", name))]
    (args.out / "serve_bench.json").write_text(json.dumps({"offline_tok_s": base, "rows": rows}, indent=1))
    print(f"\n{args.model}, {args.num_requests} requests a level (Poisson arrivals), a websocket per request, "
          f"{args.processes} client processes" + (f"; engine offline: {base:,.0f} tok/s" if base else ""))
    print("| server | offered req/s | delivered tok/s | of offline | completed | client TTFT p99 | client ITL p99 | server ITL p99 "
          "| server CPU / token (core, front ends) | client CPU (max) | idle sockets open |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        c, s = r["client"], r["server"] or {}
        ratio = f"{r['tok_s'] / base:.0%}" if base else "-"
        ms = lambda d, k: "-" if not d or d.get(k, {}).get("p99_ms") is None else f"{d[k]['p99_ms']:.1f} ms"  # noqa: E731
        print(f"| {r['name']} (`{r['flags'] or 'defaults'}`, {r['processes']} proc) | {r['rate']:g} | {r['tok_s']:,.0f} | {ratio} | "
              f"{r['completed']}/{r['sent']} | {ms(c, 'ttft')} | {ms(c, 'itl')} | {ms(s, 'itl')} | "
              f"{r['cpu_ms_per_token']} ms ({r['core_ms_per_token'] or '-'}, {r['frontends_ms_per_token'] or '-'}) | "
              f"{max(r['client_cpu'], default=0):.0%} | "
              f"{idle_open(r['idle'])} |")


if __name__ == "__main__":
    main()
