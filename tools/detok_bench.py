"""Detokenizing alone: µs a token for a batch of requests that each get one token per step.

Streams: `smollm2` (the embedded model's tokenizer on multilingual text), `bytes` (the random
models' byte tokenizer on the same text's UTF-8, so many tokens end mid-character) and `vocab`
(the byte tokenizer fed ids drawn uniformly from qwen2.5's 151,936-id vocabulary, as a
random-weights model emits them: nearly all decode to nothing). Modes: `add` (one
`Detokenizer.add` per token) and, where streamer/detok.py has it, `batch` (one `add_batch` per
step for all requests) and `batch1` (the same with `one_call`: one Rust `decode_batch` a step,
on the tokenizers' thread pool; TOKENIZERS_PARALLELISM=false keeps it on this thread). All must
give the same deltas; the tool checks that.

    python tools/detok_bench.py --requests 256 --tokens 200
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from transformers import AutoTokenizer  # noqa: E402

from gpu.models import byte_tokenizer, ensure_smollm2  # noqa: E402
from streamer import detok  # noqa: E402

TEXT = (
    "The quick brown fox jumps over the lazy dog, and then it writes a short essay about why. "
    "Crème brûlée, naïve façade, Ångström, São Paulo. 今日は良い天気ですね。我们去公园散步吧！"
    "한국어도 있어요. Emoji: 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ✨ sparkles ✨. "
    "def main(args): return sum(x * x for x in range(args.n))  # some code, too\n"
)


def streams(kind: str, tokenizer, n: int, length: int) -> list[list[int]]:
    if kind == "vocab":
        rng = random.Random(0)
        return [[rng.randrange(151936) for _ in range(length)] for _ in range(n)]
    ids = tokenizer.encode(TEXT * (1 + length // 40), add_special_tokens=False)
    return [(ids[i % 97 :] + ids)[:length] for i in range(n)]  # each request starts elsewhere


def run(mode: str, tokenizer, ids: list[list[int]], stop: tuple[str, ...]) -> tuple[float, list[list[str]]]:
    dets = [detok.Detokenizer(tokenizer, [10, 11, 12, 13], stop) for _ in ids]
    out: list[list[str]] = [[] for _ in ids]
    t0 = time.perf_counter()
    for step in range(len(ids[0])):
        if mode == "add":
            deltas = [d.add(s[step]) for d, s in zip(dets, ids, strict=True)]
        else:
            deltas = detok.add_batch([(d, s[step]) for d, s in zip(dets, ids, strict=True)], mode == "batch1")
        for o, delta in zip(out, deltas, strict=True):
            o.append(delta)
    wall = time.perf_counter() - t0
    for o, d in zip(out, dets, strict=True):
        o.append(d.finish())
    return wall, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3, help="best of")
    args = ap.parse_args()
    smol = AutoTokenizer.from_pretrained(ensure_smollm2(), local_files_only=True)
    tokenizers = {"smollm2": smol, "bytes": byte_tokenizer(), "vocab": byte_tokenizer()}
    modes = ["add"] + (["batch", "batch1"] if hasattr(detok, "add_batch") else [])
    tokens = args.requests * args.tokens
    print(f"{args.requests} requests x {args.tokens} tokens, best of {args.repeat}, µs a token:")
    for kind, tok in tokenizers.items():
        ids = streams(kind, tok, args.requests, args.tokens)
        for stop in ((), ("STOP", "\n\n")):
            row, ref = [], None
            for mode in modes:
                best = float("inf")
                for _ in range(args.repeat):
                    wall, out = run(mode, tok, ids, stop)
                    best = min(best, wall)
                    assert ref is None or out == ref, f"{mode} deltas differ from add's"
                    ref = out
                row.append(f"{mode} {best / tokens * 1e6:6.2f}")
            print(f"  {kind:8} {'stop' if stop else 'no stop':8} " + "   ".join(row))


if __name__ == "__main__":
    main()
