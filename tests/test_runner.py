"""The model runner's decode path over static buffers (what CUDA graphs replay) against its
ordinary eager path, on the CPU: same padding, packing and block tables, same logits."""

from __future__ import annotations

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
