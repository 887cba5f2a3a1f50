"""Multi-turn chat with and without prefix caching: the time to first token of each turn.

A chat client re-sends the whole conversation every turn. With prefix caching the engine reuses the
KV blocks of everything it has already seen and computes only the new turn; without it, every turn
recomputes the whole conversation. One engine per setting, the same conversation (the embedded
model's own greedy answers), run through the chat template exactly as the websocket path does.

    python tools/multiturn_bench.py --turns 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from streamer.config import EngineConfig  # noqa: E402
from streamer.engine import open_engine  # noqa: E402
from streamer.types import FinishEvent, SamplingParams, TokenEvent  # noqa: E402

TOPICS = ("rivers", "bridges", "volcanoes", "libraries", "glaciers", "lighthouses", "deserts", "orchards",
          "harbours", "telescopes", "forests", "railways")


def question(turn: int) -> str:
    topic = TOPICS[turn % len(TOPICS)]
    return (f"Turn {turn}: tell me three short facts about {topic}, and say how {topic} changed the lives "
            f"of the people who lived near them. Keep it brief and plain, one sentence per fact.")


async def conversation(model: str, prefix_caching: bool, turns: int, answer_tokens: int) -> list[tuple]:
    config = EngineConfig(model=model, prefix_caching=prefix_caching, kv_memory=0.5, max_batch_tokens=4096)
    rows = []
    async with open_engine(config) as engine:
        messages = [{"role": "system", "content": "You are a concise assistant."}]
        for turn in range(turns):
            messages.append({"role": "user", "content": question(turn)})
            ids = engine.encode_chat(messages)
            hits_before = engine.statistics().prefix_hit_tokens
            text, finish = [], None
            async with engine.submit(ids, SamplingParams(max_tokens=answer_tokens)) as gen:
                async for ev in gen:
                    if isinstance(ev, TokenEvent):
                        text.append(ev.text)
                    elif isinstance(ev, FinishEvent):
                        finish = ev
            messages.append({"role": "assistant", "content": "".join(text)})
            reused = engine.statistics().prefix_hit_tokens - hits_before
            rows.append((turn + 1, len(ids), reused, finish.timing.ttft_ms))
            print(f"  {'cache' if prefix_caching else 'no cache'}: turn {turn + 1}/{turns}, {len(ids)} prompt tokens, "
                  f"TTFT {finish.timing.ttft_ms:.0f} ms", file=sys.stderr, flush=True)
    return rows


async def main(args) -> None:
    with_cache = await conversation(args.model, True, args.turns, args.answer_tokens)
    without = await conversation(args.model, False, args.turns, args.answer_tokens)
    print(f"\nmodel {args.model}, {args.turns} turns, answers of up to {args.answer_tokens} tokens")
    print("| turn | prompt tokens | reused from cache | TTFT with cache ms | TTFT without ms | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for (turn, n, reused, ttft), (_, n2, _, ttft2) in zip(with_cache, without, strict=True):
        note = "" if n == n2 else f" (prompt {n2} without)"
        print(f"| {turn} | {n}{note} | {reused} | {ttft:.0f} | {ttft2:.0f} | {ttft2 / ttft:.1f}x |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--answer-tokens", type=int, default=48)
    trio.run(main, ap.parse_args())
