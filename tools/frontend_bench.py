"""One front end's CPU per streamed token, with the engine out of the way.

The engine core runs in a process of its own as the server's does (streamer/core.py), but its
model runner computes nothing (tools/step_loop_bench.py's NullRunner: each request streams the
bytes of a multilingual text, so detokenizing does real work). One real front-end process
(`python -m streamer serve --role frontend`) serves websockets from it, and tools/loadgen.py loads
it in a closed loop: one websocket per request, --concurrency at a time. What the front end spends
(user + system CPU, from /proc) over the tokens the clients received is the figure; the core and
the clients share the host with it, so on a small machine the wall-clock rate is theirs too.

    python tools/frontend_bench.py [--concurrency 128] [--requests 384] [--output 200] [--step-ms 0] [--batch]
        [--profile]

`--profile` runs the front end under cProfile and prints its busiest functions.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "random:tiny-qwen3"
TICK = os.sysconf("SC_CLK_TCK")


def serve_core(path: str, step_ms: float) -> None:
    """The engine core with a model that computes nothing, on the Unix socket `path`; each step
    takes at least `step_ms` (the core's thread sleeps, as it would wait on a device)."""
    import trio

    sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
    from step_loop_bench import NullRunner

    class PacedRunner(NullRunner):
        def launch(self, *args, **kwargs):
            time.sleep(step_ms / 1000)
            return super().launch(*args, **kwargs)

    from streamer.build import load_runner
    from streamer.config import EngineConfig
    from streamer.core import serve_core as serve
    from streamer.engine import Engine, run_engine

    async def main() -> None:
        config = EngineConfig(model=MODEL, device="cpu", kv_blocks=60000, max_running=256, max_batch_tokens=8192,
                              max_waiting=10000, overlap=True, launch="inline")
        loaded, runner, num_blocks, max_running = await trio.to_thread.run_sync(load_runner, config)
        engine = Engine(config, loaded, (PacedRunner if step_ms else NullRunner)(runner, "text"), num_blocks, max_running=max_running)
        async with run_engine(engine), trio.open_nursery() as nursery:
            await nursery.start(serve, engine, path)
            print("core ready", flush=True)
            await trio.sleep_forever()

    trio.run(main)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def wait_for(what: str, ok, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not ok():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"{what} not ready in {timeout:.0f} s")
        time.sleep(0.2)


def healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(url + "/healthz", timeout=2).status == 200
    except OSError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--requests", type=int, default=384)
    p.add_argument("--output", type=int, default=200, help="output tokens a request (the workload's, capped)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--step-ms", type=float, default=0, help="pace the core: each step takes at least this long "
                   "(0: as fast as the host goes)")
    p.add_argument("--batch", action="store_true", help="clients open /v1/stream?batch=1, as the chat page does")
    p.add_argument("--serve-core", nargs=2, metavar=("PATH", "STEP_MS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_core:
        serve_core(args.serve_core[0], float(args.serve_core[1]))
        return
    tmp = Path(tempfile.mkdtemp(prefix="frontend-bench-"))
    path = str(tmp / "core.sock")
    core_log = tmp / "core.log"
    core = subprocess.Popen([sys.executable, __file__, "--serve-core", path, str(args.step_ms)], cwd=ROOT,
                            stdout=core_log.open("w"), stderr=subprocess.STDOUT)
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    frontend = None
    try:
        wait_for(f"the core (see {core_log})", lambda: core.poll() is None and "core ready" in core_log.read_text())
        prof = tmp / "frontend.prof"
        cmd = [sys.executable, *(["-m", "cProfile", "-o", str(prof)] if args.profile else []), "-m", "streamer",
               "serve", "--model", MODEL, "--role", "frontend", "--ipc", path, "--listen-fd", str(listener.fileno())]
        frontend = subprocess.Popen(cmd, cwd=ROOT, pass_fds=(listener.fileno(),),
                                    stdout=(tmp / "frontend.log").open("w"), stderr=subprocess.STDOUT)
        wait_for("the front end", lambda: healthy(url))
        cpu0 = cpu_seconds(frontend.pid)
        load = [sys.executable, "tools/loadgen.py", "--url", url, "--concurrency", str(args.concurrency),
                "--num-requests", str(args.requests), "--cap-prompt", "64", "--cap-output", str(args.output),
                "--drain", "60", "--out", str(tmp), *(["--batch"] if args.batch else [])]
        print(f"$ {' '.join(load)}", file=sys.stderr)
        subprocess.run(load, cwd=ROOT, check=True, stdout=(tmp / "loadgen.txt").open("w"))
        cpu = cpu_seconds(frontend.pid) - cpu0
    finally:
        if frontend is not None:
            frontend.send_signal(signal.SIGTERM)  # it drains and exits, writing its profile
            frontend.wait(120)
        core.kill()
        core.wait()
    result = json.loads((tmp / "loadgen.json").read_text())["results"][0]
    tokens = result["output_tok_s"] * result["wall_s"]
    itl = result["client"].get("itl", {})
    pace = f", a step every {args.step_ms:g} ms at least" if args.step_ms else ""
    print(f"\none front end, {MODEL} ids from a core that computes nothing{pace}; {result['completed']}/{result['sent']} "
          f"requests of up to {args.output} tokens, {args.concurrency} at a time ({os.cpu_count()} cores)\n")
    print("| clients | tokens | tok/s (all on this host) | front-end CPU / token | client ITL p99 |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {args.concurrency} | {tokens:,.0f} | {result['output_tok_s']:,.0f} | {cpu / tokens * 1e6:,.0f} us | "
          f"{itl.get('p99_ms', '-')} ms |")
    if args.profile:
        print()
        pstats.Stats(str(prof)).sort_stats("tottime").print_stats(25)
    print(f"logs: {tmp}", file=sys.stderr)


if __name__ == "__main__":
    main()
