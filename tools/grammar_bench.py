"""Structured output's cost: N concurrent requests through one engine, free against constrained by
a JSON schema, in the same process and on the same prompts. Prints output tok/s of each run, the
ratio, and the host's mask time per constrained token.

    python tools/grammar_bench.py [--model smollm2] [--requests 64] [--max-tokens 512] [--rounds 2]

Constrained requests must write a list of --items short strings (the schema forces the length)
and end where the JSON closes, so their lengths differ. Each free request then runs, EOS ignored,
for exactly as many tokens as the constrained request with its prompt wrote: the same batch sizes
step by step and the same tail, so the ratio of tok/s (tokens over wall time) is the grammar's
cost per token and nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamer.config import EngineConfig  # noqa: E402
from streamer.engine import open_engine  # noqa: E402
from streamer.types import SamplingParams, TokenEvent  # noqa: E402

TOPICS = ["fruits", "rivers", "colours", "tools", "birds", "cities", "games", "metals", "trees", "planets",
          "instruments", "spices", "fabrics", "stones", "dances", "boats"]


def schema(items: int) -> str:
    return json.dumps({"type": "object", "properties": {"topic": {"type": "string", "maxLength": 16}, "items": {
        "type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": items, "maxItems": items}},
        "required": ["topic", "items"], "additionalProperties": False})


async def run(engine, prompts, params: list[SamplingParams]) -> tuple[float, list[int], list[str]]:
    counts = [0] * len(prompts)
    texts = [""] * len(prompts)

    async def one(i, ids):
        async with engine.submit(ids, params[i]) as gen:
            async for ev in gen:
                if isinstance(ev, TokenEvent):
                    counts[i] += 1
                    texts[i] += ev.text
                elif ev.finish_reason == "error":
                    raise RuntimeError(f"request {i} failed: {ev.error}")

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i, ids in enumerate(prompts):
            nursery.start_soon(one, i, ids)
    return time.perf_counter() - t0, counts, texts


async def main(args) -> None:
    config = EngineConfig(model=args.model, kv_memory=args.kv_memory, max_running=max(args.requests, 8))
    async with open_engine(config) as engine:
        prompts = [engine.encode_chat([{"role": "user", "content": f"List {args.items} {TOPICS[i % len(TOPICS)]} as JSON."}])
                   for i in range(args.requests)]
        constrained = [SamplingParams(max_tokens=args.max_tokens, grammar=("json_schema", schema(args.items)))] * len(prompts)
        await run(engine, prompts[:2], constrained)  # warm-up: compiles the schema, builds the tokenizer's tables
        await run(engine, prompts[:2], [SamplingParams(max_tokens=8, ignore_eos=True)] * 2)
        rows = []
        for r in range(args.rounds):
            seconds, counts, texts = await run(engine, prompts, constrained)
            unfinished = sum(1 for c in counts if c >= args.max_tokens)
            for t in texts if not unfinished else ():
                json.loads(t)  # every constrained answer parses
            free = [SamplingParams(max_tokens=c, ignore_eos=True) for c in counts]
            free_seconds, free_counts, _ = await run(engine, prompts, free)
            assert free_counts == counts, "a free request stopped short of its constrained twin's length"
            for name, s in (("json_schema", seconds), ("free", free_seconds)):
                rows.append((r, name, s, sum(counts)))
                print(f"  round {r} {name}: {sum(counts)} tokens in {s:.2f} s", file=sys.stderr)
            if unfinished:
                print(f"  round {r}: {unfinished} constrained requests hit --max-tokens", file=sys.stderr)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    lengths = sorted(counts)
    print(f"\n{args.model} on {device}; {args.requests} concurrent requests; schema of {args.items} strings; "
          f"tokens per request min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}\n")
    print("| run | round | tokens | seconds | tok/s |")
    print("|---|---:|---:|---:|---:|")
    best = {}
    for r, name, seconds, tokens in rows:
        print(f"| {name} | {r} | {tokens} | {seconds:.2f} | {tokens / seconds:,.0f} |")
        best[name] = max(best.get(name, 0.0), tokens / seconds)
    print(f"\nconstrained / free (best of rounds): {best['json_schema'] / best['free']:.1%}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=512, help="cap on a constrained answer's length")
    p.add_argument("--items", type=int, default=24)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--kv-memory", type=float, default=0.3)
    trio.run(main, p.parse_args())
