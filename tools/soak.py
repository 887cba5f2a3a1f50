"""Soak: many concurrent websocket clients against a Streamer server, each asking a few generations
(some cancelled mid-way, some dropping the connection mid-stream); prints one JSON summary.

    python tools/soak.py --clients 1000 --requests 5            # starts its own server (tiny model)
    python tools/soak.py --url ws://127.0.0.1:8000/v1/stream    # drives a running server

With its own server it also reports the server's RSS before and after, and checks afterwards that
the KV free count is back to its total and nothing is running or waiting (`/stats`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

ROOT = Path(__file__).resolve().parent.parent


async def client(url: str, n: int, rng: random.Random, tally: Counter, max_tokens: int) -> None:
    try:
        async with open_websocket_url(url, message_queue_size=4096) as ws:
            for j in range(n):
                action = rng.choices(["finish", "cancel", "drop"], [0.85, 0.1, 0.05])[0]
                await ws.send_message(json.dumps({"type": "generate", "id": f"r{j}", "prompt": f"Soak {j}: once",
                                                  "max_tokens": rng.randint(1, max_tokens), "ignore_eos": True}))
                tally["requests"] += 1
                tokens = 0
                while True:
                    frame = json.loads(await ws.get_message())
                    if frame["id"] != f"r{j}":  # our cancel crossed the previous request's done
                        assert frame.get("code") == "unknown_id", frame
                        tally["cancel_after_done:unknown_id"] += 1
                    elif frame["type"] == "token":
                        tokens += 1
                        if tokens == 2 and action == "cancel":
                            await ws.send_message(json.dumps({"type": "cancel", "id": f"r{j}"}))
                        if tokens == 2 and action == "drop":
                            tally["dropped_mid_stream"] += 1
                            return  # leaving the block closes the socket under a live generation
                    elif frame["type"] == "error":
                        tally[f"error:{frame['code']}"] += 1
                        if frame["code"] not in ("internal", "shutting_down"):
                            break
                    else:
                        tally[f"done:{frame['finish_reason']}"] += 1
                        break
    except (ConnectionClosed, HandshakeError, OSError) as exc:
        tally[f"client_failure:{type(exc).__name__}"] += 1


async def drive(url: str, clients: int, requests: int, max_tokens: int, seed: int, limit: float) -> dict:
    tally: Counter = Counter()
    rng = random.Random(seed)
    t0 = time.monotonic()
    with trio.move_on_after(limit) as scope:
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(client, url, requests, random.Random(rng.random()), tally, max_tokens)
    return {"clients": clients, "duration_s": round(time.monotonic() - t0, 1), "timed_out": scope.cancelled_caught,
            "outcomes": dict(sorted(tally.items()))}


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


async def http_json(base: str, path: str) -> dict:
    host, port = base.removeprefix("http://").rstrip("/").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += await stream.receive_some()
        head, _, body = raw.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
        while len(body) < length:  # hypercorn leaves closing the connection to the client
            body += await stream.receive_some()
    return json.loads(body)


async def with_server(args) -> dict:
    command = [sys.executable, "-m", "streamer", "serve", "--model", args.model, "--port", "0",
               "--max-running", "256", "--max-waiting", "4096", "--max-batch-tokens", "2048",
               "--kv-memory", "0.05"]
    proc = await trio.lowlevel.open_process(command, cwd=ROOT, stdout=subprocess.PIPE,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        buffered = b""
        while b"Streamer ready" not in buffered:
            chunk = await proc.stdout.receive_some()
            if not chunk:
                raise SystemExit(f"server exited: {buffered.decode(errors='replace')}")
            buffered += chunk
        url = json.loads(next(ln for ln in buffered.decode().splitlines() if "Streamer ready" in ln))["url"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(discard, proc.stdout)  # one log line per request: keep the pipe flowing
            summary = await measure(proc, url, args)
            nursery.cancel_scope.cancel()
        return summary
    finally:
        if proc.returncode is None:
            proc.kill()


async def discard(stream) -> None:
    while await stream.receive_some():
        pass


async def measure(proc, url: str, args) -> dict:
    before = rss_mib(proc.pid)
    summary = await drive(url.replace("http://", "ws://") + "v1/stream", args.clients, args.requests,
                          args.max_tokens, args.seed, args.limit)
    stats = await http_json(url, "/stats")
    with trio.move_on_after(30):  # aborts of dropped clients land within a step or two
        while stats["running"] + stats["waiting"]:
            await trio.sleep(0.2)
            stats = await http_json(url, "/stats")
    summary.update(server_rss_mib={"before": round(before, 1), "after": round(rss_mib(proc.pid), 1)},
                   after={"running": stats["running"], "waiting": stats["waiting"], "kv": stats["kv"]})
    proc.send_signal(15)  # SIGTERM: drains (nothing is live by now) and exits 0
    summary["exit_status"] = await proc.wait()
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server's /v1/stream; default: start one")
    parser.add_argument("--model", default="random:tiny-qwen3")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=5, help="generations per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=float, default=600, help="seconds before the clients give up")
    args = parser.parse_args()
    if args.url:
        summary = trio.run(drive, args.url, args.clients, args.requests, args.max_tokens, args.seed, args.limit)
    else:
        summary = trio.run(with_server, args)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
