"""Structured output's cost: N concurrent requests through one engine, free against constrained by
a JSON schema, in the same process and on the same prompts. Prints output tok/s of each run, the
ratio, and the host's mask time per constrained token.

    python tools/grammar_bench.py [--model smollm2] [--requests 64] [--max-tokens 128] [--rounds 2]

Free requests run with EOS ignored for --max-tokens tokens. Constrained ones must write a list of
--items short strings (the schema forces the length) and end where the JSON closes; throughput
is tokens over wall time either way, so the ratio is the cost per token of the grammar.
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


async def run(engine, prompts, params: SamplingParams) -> tuple[float, int, list[str]]:
    counts = [0] * len(prompts)
    texts = [""] * len(prompts)

    async def one(i, ids):
        async with engine.submit(ids, params) as gen:
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
    return time.perf_counter() - t0, sum(counts), texts


async def main(args) -> None:
    config = EngineConfig(model=args.model, kv_memory=args.kv_memory, max_running=max(args.requests, 8))
    async with open_engine(config) as engine:
        prompts = [engine.encode_chat([{"role": "user", "content": f"List {args.items} {TOPICS[i % len(TOPICS)]} as JSON."}])
                   for i in range(args.requests)]
        free = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        constrained = SamplingParams(max_tokens=args.max_tokens * 4, grammar=("json_schema", schema(args.items)))
        await run(engine, prompts[:2], constrained)  # warm-up: compiles the schema, builds the tokenizer's tables
        await run(engine, prompts[:2], free)
        rows = []
        for r in range(args.rounds):
            for name, params in (("free", free), ("json_schema", constrained)):
                seconds, tokens, texts = await run(engine, prompts, params)
                if name == "json_schema":
                    for t in texts:
                        json.loads(t)  # every constrained answer parses
                rows.append((r, name, seconds, tokens))
                print(f"  round {r} {name}: {tokens} tokens in {seconds:.2f} s", file=sys.stderr)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{args.model} on {device}; {args.requests} concurrent requests; schema of {args.items} strings\n")
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
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--items", type=int, default=24)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--kv-memory", type=float, default=0.3)
    trio.run(main, p.parse_args())
