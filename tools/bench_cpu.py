"""CPU benchmark: N concurrent streams of the embedded model through the engine, against Hugging
Face `generate` on the same prompts one at a time. Prints aggregate output tok/s and the ratio.

    python tools/bench_cpu.py [--streams 16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamer.config import EngineConfig  # noqa: E402
from streamer.engine import open_engine  # noqa: E402
from streamer.types import SamplingParams, TokenEvent  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about autumn.", "Explain photosynthesis simply.",
    "Give me three tips for learning to code.", "What is 17 times 23?", "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?", "Name five fruits that are red.", "Write a short poem about the sea.",
    "What does a compiler do?", "Summarise the plot of Cinderella.", "How do vaccines work?",
    "Suggest a name for a friendly robot.", "What is the boiling point of water in Fahrenheit?",
    "Tell me a fun fact about octopuses.", "How many continents are there? List them.",
]


async def run_engine(prompts, max_tokens, budget) -> tuple[float, int]:
    async with open_engine(EngineConfig(model="smollm2", kv_memory=0.25, max_batch_tokens=budget)) as engine:
        counts = [0] * len(prompts)

        async def one(i, ids):
            async with engine.submit(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) as gen:
                async for ev in gen:
                    counts[i] += isinstance(ev, TokenEvent)

        async def progress():
            while True:
                await trio.sleep(1)
                print(f"  engine: {sum(counts)}/{len(prompts) * max_tokens} tokens", file=sys.stderr)

        t0 = time.perf_counter()
        async with trio.open_nursery() as outer:
            outer.start_soon(progress)
            async with trio.open_nursery() as nursery:
                for i, ids in enumerate(prompts):
                    nursery.start_soon(one, i, ids)
            outer.cancel_scope.cancel()
        return time.perf_counter() - t0, sum(counts)


def run_hf(folder, prompts, max_tokens) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total = 0
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        x = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        total += out.shape[1] - len(ids)
        print(f"  hf: {i + 1}/{len(prompts)} prompts", file=sys.stderr)
    return time.perf_counter() - t0, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch-tokens", type=int, default=512)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from gpu.models import ensure_smollm2

    folder = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    prompts = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
               for i in range(args.streams)]
    eng_s, eng_n = trio.run(run_engine, prompts, args.max_tokens, args.max_batch_tokens)
    hf_s, hf_n = run_hf(folder, prompts, args.max_tokens)
    eng_rate, hf_rate = eng_n / eng_s, hf_n / hf_s
    print(f"\nSmolLM2-135M-Instruct, float32, CPU ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), {args.streams} streams x {args.max_tokens} tokens, torch {torch.__version__}")
    print(f"| {'system':<36} | {'tokens':>6} | {'wall s':>7} | {'out tok/s':>9} |")
    print(f"|{'-' * 38}|{'-' * 8}|{'-' * 9}|{'-' * 11}|")
    print(f"| {'streamer, ' + str(args.streams) + ' concurrent streams':<36} | {eng_n:>6} | {eng_s:>7.2f} | {eng_rate:>9.1f} |")
    print(f"| {'HF generate, one prompt at a time':<36} | {hf_n:>6} | {hf_s:>7.2f} | {hf_rate:>9.1f} |")
    print(f"\nratio streamer / HF sequential: {eng_rate / hf_rate:.2f}x")


if __name__ == "__main__":
    main()
