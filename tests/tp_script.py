"""The greedy script tests/test_tensor_parallel.py runs on one process and on each rank of a
tensor-parallel group: chunked prefill of three prompts sharing steps, decodes, and one request
preempted mid-way and recomputed into other blocks."""

from __future__ import annotations

import random

from gpu.runner import ModelRunner, SeqInput
from gpu.sampler import SampleSpec

BLOCK = 16
CHUNK = 16  # prefill tokens a request gets per step
DECODES = 24
PREEMPT_AT = 10  # decode step after which request 1 loses its KV and is computed again


def greedy_script(model) -> list[list[int]]:
    """Each request's greedy tokens. Every rank runs the same steps (same ids, positions, block
    tables); each computes with its own heads and arena."""
    runner = ModelRunner(model, 64, BLOCK, "torch")
    rng = random.Random(7)
    prompts = [[rng.randrange(model.spec.vocab_size) for _ in range(n)] for n in (5, 37, 20)]
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(len(prompts))]
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [0] * len(prompts)  # tokens whose KV is computed
    greedy = SampleSpec()

    def run(todo: dict[int, int | None]) -> None:
        """One step: for each request, up to CHUNK of the ids after its computed ones (and before
        `todo[i]` if set); it samples when they reach its end."""
        order = sorted(todo)
        seqs = []
        for i in order:
            ids = prompts[i] + outputs[i]
            chunk = ids[done[i]:min(done[i] + CHUNK, todo[i] or len(ids))]
            seqs.append(SeqInput(chunk, done[i], tables[i], greedy if done[i] + len(chunk) == len(ids) else None))
        sampled = runner.step(seqs)
        for i, seq, token in zip(order, seqs, sampled, strict=True):
            done[i] += len(seq.token_ids)
            if token is not None:
                outputs[i].append(token)

    while any(not out for out in outputs):  # chunked prefill, the prompts sharing steps
        run({i: None for i, out in enumerate(outputs) if not out})
    for step in range(DECODES):
        if step == PREEMPT_AT:  # request 1 is preempted: its KV is gone, computed again elsewhere
            tables[1] = list(range(3 * 8, 3 * 8 + 8))
            done[1] = 0
            last = len(prompts[1]) + len(outputs[1]) - 1  # the newest token is the decode's
            while done[1] < last:
                run({1: last})
        run({i: None for i in range(len(prompts))})
    return outputs
