"""The model runner's decode path over static buffers (what CUDA graphs replay) against its
ordinary eager path, on the CPU: same padding, packing and block tables, same logits."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from gpu.attention import build_metadata
from gpu.models import load_model
from gpu.runner import ModelRunner, SeqInput
from gpu.sampler import SampleSpec


@pytest.mark.parametrize("kv_dtype", [None, torch.int8])
def test_static_decode_buffers_match_the_eager_path_and_padding_touches_only_scratch(kv_dtype):
    model = load_model("random:tiny-llama", "cpu", torch.float32).model
    eager = ModelRunner(model, 64, 16, "torch", kv_dtype=kv_dtype)
    static = ModelRunner(model, 64, 16, "torch", graph_batch=8, capture=False, kv_dtype=kv_dtype)
    assert static.arena.kv.dtype == (kv_dtype or torch.float32)
    rng = random.Random()
    lens = [1, 5, 16, 17, 40]  # 5 requests: bucket 8, so 3 padding rows
    tables, start = [], 0
    for n in lens:
        tables.append(list(range(start, start + n // 16 + 1)))
        start += n // 16 + 1
    prompts = [[rng.randrange(320) for _ in range(n)] for n in lens]
    for runner in (eager, static):
        runner.step([SeqInput(p, 0, t, None) for p, t in zip(prompts, tables, strict=True)])
    nxt = [rng.randrange(320) for _ in lens]
    assert static.graphs.bucket(len(lens)) == 8

    before = static.arena.kv.clone()
    scales_before = None if kv_dtype is None else static.arena.scales.clone()
    got = static.graphs.logits(static.graphs.pack(nxt, lens, tables))
    meta = build_metadata([1] * len(lens), [n + 1 for n in lens], tables, 16, "cpu")
    want = model.forward(torch.tensor(nxt), torch.tensor(lens), meta, eager.backend, torch.arange(len(lens)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    changed = (static.arena.kv != before).any(dim=(0, 1, 3, 5))  # (blocks, slots in block)
    written = {(t[n // 16], n % 16) for n, t in zip(lens, tables, strict=True)}
    scratch = static.arena.num_blocks - 1
    assert {tuple(x) for x in changed.nonzero().tolist()} - written <= {(scratch, 0)}
    if kv_dtype is not None:  # int8: the scales of exactly the same slots, the scratch slot included
        changed = (static.arena.scales != scales_before).any(dim=(0, 1, 3))
        assert {tuple(x) for x in changed.nonzero().tolist()} == written | {(scratch, 0)}

    spec = SampleSpec()
    step = [SeqInput([x], n, t, spec) for x, n, t in zip(nxt, lens, tables, strict=True)]
    assert static.step(step) == eager.step(step)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_mixed_steps_in_pieces_match_the_eager_forward_and_padding_writes_no_kv(name):
    """The pieces a mixed step runs as (gpu/piecewise.py; here eagerly over the same static
    buffers, as on the CPU) against the whole forward pass: same logits, same KV, no KV written for
    the padding rows of the bucket, and a smaller step after a larger one reads none of its rows."""
    model = load_model(f"random:{name}", "cpu", torch.float32).model
    eager = ModelRunner(model, 64, 16, "torch")
    pieces = ModelRunner(model, 64, 16, "torch", graph_tokens=96, capture=False)
    assert pieces.pieces.buckets == [16, 32, 64, 96]
    rng = random.Random()
    tables = [[0, 1, 2], [3, 4], [5, 6, 7, 8]]
    spec = SampleSpec()

    def run(runner, seqs):
        t = sum(len(s.token_ids) for s in seqs)
        ids = torch.tensor([x for s in seqs for x in s.token_ids])
        pos = torch.tensor([p for s in seqs for p in range(s.start_pos, s.start_pos + len(s.token_ids))])
        meta = build_metadata([len(s.token_ids) for s in seqs], [s.start_pos + len(s.token_ids) for s in seqs],
                              [s.block_table for s in seqs], 16, "cpu")
        rows = torch.tensor(list(itertools.accumulate(len(s.token_ids) for s in seqs)))[[i for i, s in enumerate(seqs)
                                                                                         if s.sample]] - 1
        if runner.pieces is None:
            return model.forward(ids, pos, meta, runner.backend, rows, runner.ops)
        assert runner.pieces.bucket(t) > t  # padding rows in every step here
        return runner.pieces.logits(ids, pos, meta, rows)

    # a long first chunk (bucket 96), then a shorter mixed step (bucket 32): decodes and chunks
    first = [SeqInput([rng.randrange(320) for _ in range(40)], 0, tables[0], spec),
             SeqInput([rng.randrange(320) for _ in range(20)], 0, tables[1], spec),
             SeqInput([rng.randrange(320) for _ in range(30)], 0, tables[2], None)]
    second = [SeqInput([rng.randrange(320)], 40, tables[0], spec),
              SeqInput([rng.randrange(320)], 20, tables[1], spec),
              SeqInput([rng.randrange(320) for _ in range(25)], 30, tables[2], spec)]
    for step in (first, second):
        before = pieces.arena.kv.clone()
        want, got = run(eager, step), run(pieces, step)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pieces.arena.kv, eager.arena.kv, rtol=1e-5, atol=1e-5)
        changed = (pieces.arena.kv != before).any(dim=(0, 1, 3, 5))  # (blocks, slots in block)
        written = {(s.block_table[p // 16], p % 16) for s in step
                   for p in range(s.start_pos, s.start_pos + len(s.token_ids))}
        assert {tuple(x) for x in changed.nonzero().tolist()} == written
    # and through the runner's own launch: the same sampled tokens
    third = [SeqInput([rng.randrange(320)], 41, tables[0], spec), SeqInput([rng.randrange(320)], 55, tables[2], spec),
             SeqInput([rng.randrange(320) for _ in range(3)], 21, tables[1], spec)]
    assert pieces.step(third) == eager.step(third)
