"""The fused CuPy kernels (gpu/csrc/fused_ops.cu) against the torch ops they replace, on fresh random inputs.

The kernels round where torch rounds, so they agree to within one unit in the last place of the
storage dtype (float summation order in the norm may flip a rounding). Needs CUDA and CuPy.
"""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from gpu.fused_ops import CudaOps, TorchOps

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("cupy") is None, reason="needs CUDA and cupy"
    ),
]

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # relative spacing at the top of a binade
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _ops(max_pos: int, d: int):
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    ang = torch.arange(max_pos, device="cuda").float()[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    return TorchOps(cos, sin), CudaOps(cos, sin), seed


def _close(got: torch.Tensor, want: torch.Tensor, dtype, seed: int, what: str) -> None:
    ulp = ULP[dtype]
    scale = want.float().abs().amax().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=ulp, atol=ulp * scale,
                               msg=lambda m: f"{what} (seed {seed}): {m}")
    # and almost everywhere bit-identical: a rounding flip is the exception, not the rule
    same = (got == want).float().mean().item()
    assert same > 0.95, f"{what} (seed {seed}): only {same:.1%} of elements identical"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("rows,hidden", [(1, 576), (7, 896), (300, 2048), (33, 4096)])
def test_add_rms_norm_matches_torch(dtype, rows, hidden):
    ref, cuda, seed = _ops(16, 64)
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype) * 3
    delta = torch.randn_like(x)
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    want_x, want_h = ref.add_rms_norm(x, delta, w, 1e-6)
    got_x, got_h = cuda.add_rms_norm(x.clone(), delta, w, 1e-6)
    assert torch.equal(got_x, want_x), f"residual add differs (seed {seed})"  # one rounding, same in both
    _close(got_h, want_h, dtype, seed, "add_rms_norm")
    _, want_h = ref.add_rms_norm(x, None, w, 1e-5)
    x_before = x.clone()
    got_x, got_h = cuda.add_rms_norm(x, None, w, 1e-5)
    assert torch.equal(got_x, x_before), "without delta the residual is left alone"
    _close(got_h, want_h, dtype, seed, "rms_norm")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("hq,hkv,d", [(14, 2, 64), (9, 3, 64), (32, 8, 128)])
def test_split_rope_matches_torch(dtype, hq, hkv, d):
    ref, cuda, seed = _ops(4096, d)
    t = 257
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device="cuda", dtype=dtype)
    pos = torch.randint(0, 4096, (t,), device="cuda")
    want = ref.split_rope(qkv, ref.rope(pos, dtype), hq, hkv, d)
    got = cuda.split_rope(qkv, cuda.rope(pos, dtype), hq, hkv, d)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert g.shape == w.shape and g.is_contiguous(), (name, g.shape, w.shape)
        _close(g, w, dtype, seed, f"split_rope {name}")
    assert torch.equal(got[2], want[2]), "v is a plain copy"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("rows,inter", [(1, 1536), (200, 4864), (3, 14336)])
def test_silu_mul_matches_torch(dtype, rows, inter):
    ref, cuda, seed = _ops(16, 64)
    gate_up = torch.randn(rows, 2 * inter, device="cuda", dtype=dtype) * 4
    _close(cuda.silu_mul(gate_up), ref.silu_mul(gate_up), dtype, seed, "silu_mul")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("rows,hidden,inter", [(256, 896, 4864), (64, 2048, 8192), (100, 576, 1536)])
def test_split_k_projection_and_norm_match_the_unsplit_chain(dtype, rows, hidden, inter):
    """The down projection as split-K float32 partials summed by add_rms_norm gives the residual
    and normed rows of F.linear + add + norm, to within the GEMM's summation order."""
    from gpu.fused_ops import split_k

    ref, cuda, seed = _ops(16, 64)
    act = torch.randn(rows, inter, device="cuda", dtype=dtype)
    w_down = torch.randn(hidden, inter, device="cuda", dtype=dtype) * inter**-0.5
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype) * 3
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    delta = cuda.residual_linear(act, w_down)
    splits = split_k(rows, hidden, inter)
    assert splits > 1 and delta.shape == (splits, rows, hidden) and delta.dtype == torch.float32
    got_x, got_h = cuda.add_rms_norm(x.clone(), delta, w, 1e-6)
    want_x, want_h = ref.add_rms_norm(x, ref.residual_linear(act, w_down), w, 1e-6)
    _close(got_x, want_x, dtype, seed, "residual after split-K")
    _close(got_h, want_h, dtype, seed, "norm after split-K")
    # the same partials through the torch reference: one rounding of their sum, then the add
    tx, th = ref.add_rms_norm(x, delta, w, 1e-6)
    _close(got_x, tx, dtype, seed, "residual, torch sum of the partials")
    _close(got_h, th, dtype, seed, "norm, torch sum of the partials")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("rows,vocab", [(1, 151936), (256, 49152), (7, 1000), (3, 1001)])
def test_argmax_matches_torch_with_ties_inf_and_nan(dtype, rows, vocab):
    _, cuda, seed = _ops(16, 64)
    logits = torch.randn(rows, vocab, device="cuda", dtype=dtype) * 4
    gen = random.Random(seed)
    if rows > 1:  # a tie for the maximum: the first index wins
        top = logits[0].max()
        for c in sorted(gen.sample(range(vocab), 2)):
            logits[0, c] = top + 8
    if rows > 2:
        logits[1] = float("-inf")  # all -inf: index 0
        logits[2, gen.randrange(vocab)] = float("nan")  # NaN counts as the maximum
        logits[2, gen.randrange(vocab)] = float("inf")
    got = cuda.argmax(logits)
    assert got.dtype == torch.int64 and torch.equal(got, logits.argmax(dim=-1)), f"seed {seed}"


def test_fused_ops_replay_in_a_cuda_graph():
    ref, cuda, seed = _ops(1024, 64)
    dtype = torch.bfloat16
    x = torch.randn(64, 896, device="cuda", dtype=dtype)
    delta, w = torch.randn_like(x), torch.randn(896, device="cuda", dtype=dtype)
    qkv = torch.randn(64, 18 * 64, device="cuda", dtype=dtype)
    pos = torch.randint(0, 1024, (64,), device="cuda")
    x0 = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        cuda.add_rms_norm(x.clone(), delta, w, 1e-6)
        cuda.split_rope(qkv, pos, 14, 2, 64)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, h = cuda.add_rms_norm(x, delta, w, 1e-6)
        q, k, v = cuda.split_rope(qkv, pos, 14, 2, 64)
    x.copy_(x0)
    pos.copy_(torch.randint(0, 1024, (64,), device="cuda"))  # new positions, same graph
    graph.replay()
    torch.cuda.synchronize()
    _close(h, ref.add_rms_norm(x0, delta, w, 1e-6)[1], dtype, seed, "graph add_rms_norm")
    _close(q, ref.split_rope(qkv, ref.rope(pos, dtype), 14, 2, 64)[0], dtype, seed, "graph split_rope")
