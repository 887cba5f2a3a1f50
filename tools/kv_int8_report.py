"""int8 KV cache report: what int8 K/V costs in accuracy and buys in memory.

On the embedded SmolLM2-135M (CPU, float32 or --dtype bfloat16 weights, torch attention backend) it runs N chat prompts
greedily with the model's native KV dtype and with int8 KV, and prints: greedy agreement (identical
continuations, mean first divergence), teacher-forced log-prob drift of the native run's chosen
tokens, KV bytes per token and blocks per memory budget, and how many requests' KV of the shared
workload (gpu/workload.json) fit in that budget for each workload model's shapes.

    python tools/kv_int8_report.py [--prompts 100] [--new-tokens 24] [--memory-gib 10]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from workload import load_spec, requests  # noqa: E402

from gpu.arena import blocks_that_fit, kv_bytes_per_token  # noqa: E402
from gpu.attention import build_metadata  # noqa: E402
from gpu.models import load_model  # noqa: E402
from gpu.runner import ModelRunner, SeqInput  # noqa: E402
from gpu.sampler import SampleSpec  # noqa: E402

BLOCK = 16
SUBJECTS = ["the water cycle", "photosynthesis", "a binary search", "the French Revolution", "compound interest",
            "black holes", "a hash table", "vaccines", "the Pythagorean theorem", "climate change"]
ASKS = ["Explain {} in one sentence.", "Give me three facts about {}.", "Write a short poem about {}.",
        "What is the most common misconception about {}?", "Describe {} to a ten-year-old.",
        "Summarise {} in two sentences.", "Why does {} matter?", "Ask me a quiz question about {}.",
        "List two pros and two cons of studying {}.", "Write a tweet about {}."]


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    """n deterministic chat prompts: question templates crossed with subjects."""
    texts = [ask.format(subj) for ask in ASKS for subj in SUBJECTS]
    texts = (texts * math.ceil(n / len(texts)))[:n]
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for t in texts]


class Progress:
    """One stderr line, rewritten in place: label, done/total, elapsed."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.t0 = label, total, time.perf_counter()

    def __call__(self, done: int) -> None:
        bar = "#" * (20 * done // self.total)
        sys.stderr.write(f"\r  {self.label:<28} [{bar:<20}] {done}/{self.total} {time.perf_counter() - self.t0:5.0f}s")
        if done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _tables(lengths: list[int]) -> tuple[list[list[int]], int]:
    tables, at = [], 0
    for n in lengths:
        k = -(-n // BLOCK)
        tables.append(list(range(at, at + k)))
        at += k
    return tables, at


def greedy(model, kv_dtype, prompts, new_tokens: int, eos: frozenset[int], label: str) -> list[list[int]]:
    """Greedy continuations of every prompt, all in one batch: one prefill step, then decode steps."""
    tables, nblocks = _tables([len(p) + new_tokens for p in prompts])
    runner = ModelRunner(model, nblocks, BLOCK, "torch", kv_dtype=kv_dtype)
    spec = SampleSpec()
    show = Progress(label, new_tokens)
    outs = [[t] for t in runner.step([SeqInput(p, 0, tb, spec) for p, tb in zip(prompts, tables, strict=True)])]
    show(1)
    for step in range(1, new_tokens):
        live = [i for i, o in enumerate(outs) if o[-1] not in eos]
        if live:
            seqs = [SeqInput([outs[i][-1]], len(prompts[i]) + len(outs[i]) - 1, tables[i], spec) for i in live]
            for i, tok in zip(live, runner.step(seqs), strict=True):
                outs[i].append(tok)
        show(step + 1)
    return outs


@torch.inference_mode()
def chosen_logprobs(model, kv_dtype, prompts, outs, label: str, chunk: int = 10) -> list[torch.Tensor]:
    """Teacher-forced log-probs of each continuation's tokens, one prefill over prompt + continuation."""
    show = Progress(label, len(prompts))
    result = []
    for lo in range(0, len(prompts), chunk):
        ps, os_ = prompts[lo : lo + chunk], outs[lo : lo + chunk]
        seqs = [p + o for p, o in zip(ps, os_, strict=True)]
        tables, nblocks = _tables([len(s) for s in seqs])
        runner = ModelRunner(model, nblocks, BLOCK, "torch", kv_dtype=kv_dtype)
        meta = build_metadata([len(s) for s in seqs], [len(s) for s in seqs], tables, BLOCK, "cpu")
        rows, start = [], 0
        for p, s in zip(ps, seqs, strict=True):  # the positions that predict each continuation token
            rows += range(start + len(p) - 1, start + len(s) - 1)
            start += len(s)
        ids = torch.tensor([t for s in seqs for t in s])
        pos = torch.tensor([i for s in seqs for i in range(len(s))])
        logp = torch.log_softmax(runner.model.forward(ids, pos, meta, runner.backend, torch.tensor(rows)).float(), -1)
        at = 0
        for o in os_:
            result.append(logp[torch.arange(at, at + len(o)), torch.tensor(o)])
            at += len(o)
        show(min(lo + chunk, len(prompts)))
    return result


def shapes(spec: dict) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a workload.json model entry."""
    d = spec.get("head_dim") or spec["hidden_size"] // spec["num_attention_heads"]
    return spec["num_hidden_layers"], spec["num_key_value_heads"], d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=24, help="greedy tokens per prompt (EOS stops early)")
    ap.add_argument("--memory-gib", type=float, default=10.0, help="KV budget for the capacity rows")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="weights and native KV dtype (bfloat16: the GPU's native KV, emulated on the CPU)")
    args = ap.parse_args()
    torch.manual_seed(0)

    loaded = load_model("smollm2", "cpu", getattr(torch, args.dtype))
    model, native = loaded.model, loaded.model.dtype
    prompts = chat_prompts(loaded.tokenizer, args.prompts)
    lens = [len(p) for p in prompts]
    print(f"smollm2 ({args.dtype}, CPU): {len(prompts)} chat prompts of {min(lens)}-{max(lens)} tokens "
          f"(mean {statistics.mean(lens):.1f}), up to {args.new_tokens} greedy tokens each", file=sys.stderr)
    t0 = time.perf_counter()
    base = greedy(model, None, prompts, args.new_tokens, loaded.eos_token_ids, "greedy, native KV")
    q8 = greedy(model, torch.int8, prompts, args.new_tokens, loaded.eos_token_ids, "greedy, int8 KV")
    lp_base = chosen_logprobs(model, None, prompts, base, "teacher-forced, native KV")
    lp_q8 = chosen_logprobs(model, torch.int8, prompts, base, "teacher-forced, int8 KV")
    wall = time.perf_counter() - t0

    same = sum(a == b for a, b in zip(base, q8, strict=True))
    first = [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
             for a, b in zip(base, q8, strict=True) if a != b]
    drift = torch.cat([(a - b).abs() for a, b in zip(lp_base, lp_q8, strict=True)])

    mem = int(args.memory_gib * 2**30)
    spec = load_spec()
    work = requests(spec)
    mean_len = statistics.mean(len(it.prompt) + it.output_len for it in work)
    mean_blocks = statistics.mean(-(-(len(it.prompt) + it.output_len) // BLOCK) for it in work)
    s = model.spec
    models = [("smollm2-135m", (s.num_layers, s.num_kv_heads, s.head_dim), native)]
    models += [(name, shapes(cfg), torch.bfloat16) for name, cfg in spec["models"].items()]

    lines = [
        f"Accuracy: smollm2-135m-instruct, {args.dtype} weights, native KV = {args.dtype}, {len(prompts)} chat prompts "
        f"({min(lens)}-{max(lens)} tokens), {args.new_tokens} greedy tokens max, EOS stops; {wall:.0f} s",
        "",
        "| metric | value |",
        "| --- | ---: |",
        f"| identical greedy continuations | {same}/{len(prompts)} |",
        f"| mean first-divergence position (of the {len(first)} that diverge) | "
        + (f"{statistics.mean(first):.1f} |" if first else "- |"),
        f"| teacher-forced \\|Δlogprob\\| of the native run's tokens, mean over {drift.numel()} tokens | "
        f"{drift.mean():.5f} |",
        f"| same, max | {drift.max():.4f} |",
        f"| same, 99th percentile | {drift.quantile(0.99):.4f} |",
        "",
        f"Capacity: {args.memory_gib:g} GiB of KV, block size {BLOCK}; shared workload "
        f"({len(work)} requests, mean prompt + output = {mean_len:.0f} tokens = {mean_blocks:.1f} blocks)",
        "",
        "| model (layers, kv heads, D) | KV dtype | bytes/token | blocks | workload requests that fit | gain |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, (layers, hkv, d), dt in models:
        fit = {}
        for kv in (dt, torch.int8):
            per = kv_bytes_per_token(layers, hkv, d, kv)
            blocks = blocks_that_fit(mem, num_layers=layers, num_kv_heads=hkv, block_size=BLOCK, head_dim=d, dtype=kv)
            fit[kv] = blocks / mean_blocks
            gain = f"{fit[kv] / fit[dt]:.2f}x" if kv != dt else ""
            label = str(kv).removeprefix("torch.")
            lines.append(f"| {name} ({layers}, {hkv}, {d}) | {label} | {per} | {blocks} | {fit[kv]:.0f} | {gain} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
