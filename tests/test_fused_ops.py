"""The torch reference of the fused ops (gpu/fused_ops.TorchOps) on the CPU: split-K partials are
a delta like any other, and the CUDA ops refuse shapes their 8-wide kernels cannot take."""

from __future__ import annotations

import pytest
import torch

from gpu.fused_ops import TorchOps, split_k


def test_partials_are_summed_then_rounded_then_added():
    ops = TorchOps(torch.ones(4, 8), torch.zeros(4, 8))
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    parts = torch.randn(3, 5, 16, dtype=torch.float32)
    w = torch.randn(16, dtype=torch.bfloat16)
    got_x, got_h = ops.add_rms_norm(x, parts, w, 1e-6)
    want_x, want_h = ops.add_rms_norm(x, parts.sum(0).to(torch.bfloat16), w, 1e-6)
    assert torch.equal(got_x, want_x) and torch.equal(got_h, want_h)
    assert torch.equal(ops.residual_linear(x, torch.eye(16, dtype=torch.bfloat16)), x)


def test_split_k_only_where_it_was_measured_to_pay():
    assert split_k(256, 896, 4864) == 4  # qwen2.5-0.5b down at decode batch 256
    assert split_k(256, 896, 896) == 2 and split_k(64, 896, 896) == 2  # its o projection
    assert split_k(256, 2048, 8192) == 1  # llama-3.2-1b down at 256 rows: faster unsplit (measured)
    assert split_k(63, 896, 4864) == 1 and split_k(32, 896, 4864) == 1  # below 64 rows: left to cuBLAS
    assert split_k(8192, 896, 4864) == 1  # prefill
    assert split_k(128, 896, 4800) == 1  # K slices must be whole 64-wide tiles


def test_cuda_ops_refuse_a_model_they_cannot_run():
    from gpu.model import ModelSpec, Transformer

    spec = ModelSpec("llama", 32, 20, 1, 2, 1, 10, 40, 1e-6, True, False, False, 16)
    model = Transformer.__new__(Transformer)
    model.spec = spec
    with pytest.raises(ValueError, match="divisible by 8 and head_dim by 16"):
        model.cuda_ops()
