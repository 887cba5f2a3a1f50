"""Data-parallel routing on a multi-turn chat workload: the prefix-cache hit rate the cache-aware
router gets against round-robin, in one run, on the same conversations.

For each router: start `python -m streamer serve --data-parallel-size N --router R`, run
--conversations chats at once, each on a websocket of its own, each turn re-sending the whole
conversation (a shared system prompt, then its own user turns and the answers so far), then read
the cores' prefix-cache hit tokens and prompt tokens from /metrics. The hit rate is hit tokens
over prompt tokens, summed over the cores.

    python tools/router_bench.py --model random:tiny-qwen3 --data-parallel-size 2 --conversations 16 \\
        --turns 6 --server-flags "--frontends 1 --kv-memory 0.05"
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families
from serve_bench import start_server, wait_ready
from trio_websocket import open_websocket_url

SYSTEM = "You are a helpful assistant for a travel company. Answer briefly and politely, in plain words."
WORDS = ("river", "mountain", "ticket", "hotel", "museum", "train", "harbour", "market", "garden", "bridge",
         "castle", "island", "festival", "village", "airport", "beach", "forest", "lake", "station", "tower")


def user_turn(rng: random.Random, conversation: int, turn: int, words: int) -> str:
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"Traveller {conversation}, question {turn}: what should I know about {body}?"


def counters(url: str) -> dict[str, float]:
    """The server's prefix-cache hit tokens and prompt tokens, summed over its cores."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {"hits": 0.0, "prompt": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "streamer_prefix_cache_hit_tokens_total":
                out["hits"] += s.value
            elif s.name == "streamer_prompt_tokens_total":
                out["prompt"] += s.value
    return out


async def chat(ws_url: str, conversation: int, args, ttfts: list[float]) -> None:
    rng = random.Random(args.seed * 1000 + conversation)
    messages = [{"role": "system", "content": SYSTEM}]
    async with open_websocket_url(ws_url) as ws:
        for turn in range(args.turns):
            messages.append({"role": "user", "content": user_turn(rng, conversation, turn, args.user_words)})
            await ws.send_message(json.dumps({"type": "generate", "id": f"t{turn}", "messages": messages,
                                              "max_tokens": args.answer_tokens, "ignore_eos": True}))
            t0, text = time.monotonic(), []
            while True:
                frame = json.loads(await ws.get_message())
                if frame["type"] == "token":
                    if not text:
                        ttfts.append(time.monotonic() - t0)
                    text.append(frame["text"])
                elif frame["type"] == "error":
                    raise SystemExit(f"conversation {conversation} turn {turn}: {frame}")
                elif frame["type"] == "done":
                    break
            messages.append({"role": "assistant", "content": "".join(text)})


async def run_policy(args, policy: str) -> dict:
    url = f"http://127.0.0.1:{args.port}"
    out = Path(args.out) / policy
    out.mkdir(parents=True, exist_ok=True)
    flags = f"--data-parallel-size {args.data_parallel_size} --router {policy} {args.server_flags}"
    proc = start_server(args.model, args.port, flags, out / "server.log")
    try:
        wait_ready(out / "server.log", proc)
        before = counters(url)
        ttfts: list[float] = []
        t0 = time.monotonic()
        async with trio.open_nursery() as nursery:
            for c in range(args.conversations):
                nursery.start_soon(chat, url.replace("http://", "ws://") + "/v1/stream", c, args, ttfts)
        wall = time.monotonic() - t0
        after = counters(url)
        with urllib.request.urlopen(f"{url}/stats", timeout=30) as r:
            stats = json.loads(r.read())
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    hits, prompt = after["hits"] - before["hits"], after["prompt"] - before["prompt"]
    ttfts.sort()
    return {"policy": policy, "requests": args.conversations * args.turns, "prompt_tokens": int(prompt),
            "hit_tokens": int(hits), "hit_rate": hits / prompt if prompt else 0.0, "wall_s": wall,
            "ttft_p50_ms": 1e3 * statistics.median(ttfts), "ttft_p99_ms": 1e3 * ttfts[int(0.99 * (len(ttfts) - 1))],
            "routed": stats.get("router", {}).get("routed")}


async def main(args) -> None:
    rows = [await run_policy(args, policy) for policy in args.policies.split(",")]
    print(f"\n{args.conversations} conversations x {args.turns} turns, {args.user_words}-word user turns, "
          f"{args.answer_tokens}-token answers; {args.model}, --data-parallel-size {args.data_parallel_size}")
    print("| router | requests | prompt tokens | prefix-cache hits | hit rate | TTFT P50 | TTFT P99 | wall | per core |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['requests']} | {r['prompt_tokens']:,} | {r['hit_tokens']:,} | "
              f"{100 * r['hit_rate']:.1f}% | {r['ttft_p50_ms']:.0f} ms | {r['ttft_p99_ms']:.0f} ms | "
              f"{r['wall_s']:.1f} s | {r['routed']} |")
    if len(rows) == 2 and rows[1]["hit_rate"]:
        print(f"\nhit rate, {rows[0]['policy']} over {rows[1]['policy']}: {rows[0]['hit_rate'] / rows[1]['hit_rate']:.2f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:tiny-qwen3")
    p.add_argument("--data-parallel-size", type=int, default=2)
    p.add_argument("--policies", default="cache-aware,round-robin")
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--user-words", type=int, default=40)
    p.add_argument("--answer-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8321)
    p.add_argument("--server-flags", default="", help="more flags for every server, e.g. '--frontends 1'")
    p.add_argument("--out", default="/tmp/router_bench")
    args = p.parse_args()
    print(f"$ {shlex.join(sys.argv)}", file=sys.stderr)
    trio.run(main, args)
