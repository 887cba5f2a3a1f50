"""The cost of the websocket path alone: a fake engine that makes tokens for free, served by our real
web app on hypercorn, read by real websocket clients in another process.

The fake engine's step loop hands one TokenEvent to every live generation per step, as the real one
does, then waits `--step-ms` (the device's share of a step). Everything else is the production
path: the per-request EventQueue, the generation task, the socket's writer task, JSON, hypercorn and
wsproto. Prints tokens/s and the server's CPU time per token; on a GPU that CPU time is what stands
between two tokens of a stream beyond the device's own step time.

    python tools/ws_path_bench.py --sockets 8 --streams 32 --tokens 200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from streamer.request import Cancel, EventQueue, Generation  # noqa: E402
from streamer.types import FinishEvent, Timing, TokenEvent  # noqa: E402


class FakeEngine:
    """What the web layer needs of an engine; tokens cost nothing."""

    model_name = "fake"
    max_context = 1 << 20
    metrics = None
    live_requests = 0

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.live: dict[str, list] = {}  # key -> [event queue, tokens left, index]
        self._control_send, self._control = trio.open_memory_channel(math.inf)
        self.tokens = 0
        self._delivered: list[float] = []

    def encode_prompt(self, text: str) -> list[int]:
        return [1, 2, 3]

    def encode_chat(self, messages) -> list[int]:
        return [1, 2, 3]

    def submit(self, ids, params, request_id=None, **scheduling):
        events = EventQueue(params.max_tokens + 1)
        self.live[request_id] = [events, params.max_tokens, 0]
        return Generation(request_id, len(ids), events, partial(self._control_send.send_nowait, Cancel(request_id)))

    def count_error(self, code: str) -> None:
        pass

    def delivered(self, gaps: list[float]) -> None:  # as the engine takes them: appended for the step loop
        self._delivered += gaps

    async def run(self) -> None:
        while True:
            while True:
                try:
                    msg = self._control.receive_nowait()
                except trio.WouldBlock:
                    break
                if isinstance(msg, Cancel) and msg.request_id in self.live:
                    self.live.pop(msg.request_id)[0].close()
            for key, entry in list(self.live.items()):
                events, left, index = entry
                if not events.put(TokenEvent(index, 42, "tok ")):  # the reader left
                    del self.live[key]
                    continue
                self.tokens += 1
                entry[1], entry[2] = left - 1, index + 1
                if left == 1:
                    events.put(FinishEvent("length", 3, index + 1, Timing(0.0, 0.0, 0.0, None)))
                    events.close()
                    del self.live[key]
            self._delivered.clear()  # the engine's step loop takes the reports each step
            await trio.sleep(self.step_s)


async def serve_and_measure(args) -> None:
    from web.server import serve

    engine = FakeEngine(args.step_ms / 1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine.run)
        binds = await nursery.start(serve, engine, "127.0.0.1", 0)
        url = binds[0].replace("http://", "ws://") + "/v1/stream" + ("?batch=1" if args.batch else "")
        client = [sys.executable, __file__, "--client", url, "--sockets", str(args.sockets),
                  "--streams", str(args.streams), "--tokens", str(args.tokens)]
        cpu0, t0, tok0 = time.process_time(), time.perf_counter(), engine.tokens
        result = await trio.run_process(client, capture_stdout=True)
        cpu, wall, tokens = time.process_time() - cpu0, time.perf_counter() - t0, engine.tokens - tok0
        nursery.cancel_scope.cancel()
    client_stats = json.loads(result.stdout)
    print(f"{'batched' if args.batch else 'one frame a message'}: sockets {args.sockets} x streams {args.streams} x {args.tokens} tokens, step {args.step_ms} ms: "
          f"{tokens} tokens in {wall:.2f} s = {tokens / wall:,.0f} tok/s; server CPU {cpu:.2f} s = "
          f"{cpu / tokens * 1e6:.1f} us a token; client ITL p50 {client_stats['p50_ms']:.2f} ms "
          f"p90 {client_stats['p90_ms']:.2f} p95 {client_stats['p95_ms']:.2f} p99 {client_stats['p99_ms']:.2f} ms")


async def client(args) -> None:
    from trio_websocket import open_websocket_url

    gaps: list[float] = []

    async def one_socket(s: int) -> None:
        async with open_websocket_url(args.client, message_queue_size=100_000) as ws:
            last: dict[str, float] = {}
            for i in range(args.streams):
                await ws.send_message(json.dumps({"type": "generate", "id": f"{s}-{i}", "prompt": "hi",
                                                  "max_tokens": args.tokens, "ignore_eos": True}))
            done = 0
            while done < args.streams:
                data = json.loads(await ws.get_message())
                now = time.perf_counter()
                for frame in data if isinstance(data, list) else (data,):
                    if frame["type"] == "token":
                        if frame["id"] in last:
                            gaps.append(now - last[frame["id"]])
                        last[frame["id"]] = now
                    elif frame["type"] in ("done", "error"):
                        done += 1

    async with trio.open_nursery() as nursery:
        for s in range(args.sockets):
            nursery.start_soon(one_socket, s)
    gaps.sort()
    pick = lambda q: gaps[min(len(gaps) - 1, int(q * len(gaps)))] * 1000 if gaps else float("nan")  # noqa: E731
    print(json.dumps({"p50_ms": pick(0.5), "p90_ms": pick(0.9), "p95_ms": pick(0.95), "p99_ms": pick(0.99), "gaps": len(gaps)}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sockets", type=int, default=8)
    ap.add_argument("--streams", type=int, default=32, help="generations per socket")
    ap.add_argument("--tokens", type=int, default=200, help="tokens per generation")
    ap.add_argument("--step-ms", type=float, default=0.0, help="the fake device's time per step")
    ap.add_argument("--batch", action="store_true", help="open /v1/stream?batch=1 (frames batched per message)")
    ap.add_argument("--client", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        trio.run(client, args)
    else:
        os.environ.setdefault("STREAMER_LOG_LEVEL", "warning")
        trio.run(serve_and_measure, args)
