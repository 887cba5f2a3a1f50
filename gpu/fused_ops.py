"""The elementwise parts of a transformer layer: residual add + RMSNorm, q/k/v split + RoPE, SiLU * up;
plus the projections whose output is a residual delta, and the greedy argmax over logits.

Two implementations with one interface, chosen with the attention backend (gpu/runner.py):
`TorchOps`, plain torch ops (the CPU path and the reference), and `CudaOps`, one CuPy kernel launch
each from gpu/csrc/fused_ops.cu. Torch needs 6-10 launches and float32 temporaries for each of
these; at decode batch sizes those launches cost more than the layer's GEMMs.
The kernels round to the storage dtype where the torch chain does, so the two agree to within
float summation order (tests/test_fused_ops_gpu.py).

`residual_linear` is the o and down projections. Where their output is too small to fill the GPU
(decode batches of small models), CudaOps splits the reduction over K into float32 partials
(split-K) and the next add_rms_norm sums them, so the GEMM runs on 2-4x the thread blocks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpu import cupy_launch

_SRC = Path(__file__).parent / "csrc" / "fused_ops.cu"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same order of operations as HF: normalise in float32, cast back, then scale.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, H, D); cos/sin: (T, D) already gathered at each token's position."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class TorchOps:
    name = "torch"

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos, self.sin = cos, sin  # float32 (max_position, D)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """Per-step RoPE operand for split_rope: the gathered tables, cast as HF casts them."""
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)

    def add_rms_norm(self, x, delta, weight, eps):
        """(x + delta, rms_norm(x + delta)); delta None: (x, rms_norm(x)). A float32 delta of shape
        (S, T, H) is split-K partials: their sum, rounded to x's dtype, is the delta."""
        if delta is not None:
            x = x + (delta.sum(0).to(x.dtype) if delta.dim() == 3 else delta)
        return x, rms_norm(x, weight, eps)

    def residual_linear(self, x, weight):
        """x @ weight.T, the delta that the next add_rms_norm adds to the residual stream."""
        return F.linear(x, weight)

    def argmax(self, logits):
        return logits.argmax(dim=-1)

    def split_rope(self, qkv, rope, hq: int, hkv: int, d: int, out=None):
        """qkv (T, (hq+2hkv)*d) -> contiguous q (T, hq, d), k, v (T, hkv, d); q and k rotated.
        `out`: (q, k, v) tensors of those shapes to write instead of new ones."""
        cos, sin = rope
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q = apply_rope(q.view(-1, hq, d), cos, sin).contiguous()
        k = apply_rope(k.view(-1, hkv, d), cos, sin).contiguous()
        v = v.reshape(-1, hkv, d).contiguous()
        if out is None:
            return q, k, v
        for o, x in zip(out, (q, k, v), strict=True):
            o.copy_(x)
        return out

    def silu_mul(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


_MODULES: dict[bool, object] = {}
_NORM_VECS = 4  # 8-value vectors an add_rms_norm thread holds (NORM_VECS in the .cu)
# Split-K for residual_linear where the output has at most this many elements and 64 or more rows:
# on an H100, qwen2.5-0.5b's down projection plus the add_rms_norm after it at 256 rows took
# 10.4 us split against 12.7 unsplit, and llama-3.2-1b's at 256 rows (524k outputs) was faster unsplit.
_SPLIT_K_MAX_OUT = 1 << 18
_SPLIT_K_MIN_ROWS = 64


def split_k(rows: int, n: int, k: int) -> int:
    """How many K slices residual_linear computes apart (1: an ordinary GEMM)."""
    if rows < _SPLIT_K_MIN_ROWS or rows * n > _SPLIT_K_MAX_OUT:
        return 1
    s = 4 if k >= 4096 else 2
    return s if k % (s * 64) == 0 else 1


class CudaOps:
    """The same ops as TorchOps, one kernel each, launched on torch's current stream (so they are
    captured in CUDA graphs with the rest of the step). The residual add happens in place."""

    name = "cuda"
    _THREADS = 256
    _ARGMAX_THREADS = 512

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        assert cos.is_cuda and cos.dtype == torch.float32 and cos.is_contiguous()
        self.cos, self.sin = cos, sin.contiguous()
        self._device_index = cos.device.index
        self._fns: dict[tuple, object] = {}

    @staticmethod
    def _module(dtype: torch.dtype):
        import cupy

        assert dtype in (torch.bfloat16, torch.float16), dtype
        bf16 = dtype == torch.bfloat16
        if bf16 not in _MODULES:
            major, minor = torch.cuda.get_device_capability()
            options = ("-std=c++17", f"--gpu-architecture=sm_{major}{minor}", f"-DUSE_BF16={int(bf16)}")
            _MODULES[bf16] = cupy.RawModule(code=_SRC.read_text(), options=options)
        return _MODULES[bf16]

    def warmup(self, dtype: torch.dtype) -> None:
        """Compile now, so no request waits on NVRTC."""
        m = self._module(dtype)
        for name in ("add_rms_norm", "split_rope", "silu_mul", "argmax_rows"):
            m.get_function(name)

    def _launch(self, name: str, dtype, grid: int | tuple[int, int], args, threads: int = 0) -> None:
        fn = self._fns.get((name, dtype))
        if fn is None:
            fn = self._fns[(name, dtype)] = self._module(dtype).get_function(name)
        with cupy_launch.current(self._device_index):
            fn(grid if isinstance(grid, tuple) else (grid,), (threads or self._THREADS,), args)


    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        assert positions.dtype == torch.int64
        return positions

    @staticmethod
    def _aligned(*ts: torch.Tensor | None) -> bool:
        return all(t is None or (t.is_contiguous() and t.data_ptr() % 16 == 0) for t in ts)

    def add_rms_norm(self, x, delta, weight, eps):
        rows, hidden = x.shape
        assert weight.shape == (hidden,) and weight.dtype == x.dtype
        assert hidden % 8 == 0 and hidden <= 1024 * 8 * _NORM_VECS, f"hidden size {hidden}: needs a multiple of 8"
        parts = None
        if delta is not None and delta.dim() == 3:  # split-K partials from residual_linear
            assert delta.shape[1:] == x.shape and delta.dtype == torch.float32, (delta.shape, delta.dtype)
            parts, delta = delta, None
        elif delta is not None:
            assert delta.shape == x.shape and delta.dtype == x.dtype
        assert self._aligned(x, delta, parts, weight), "add_rms_norm needs contiguous, 16-byte aligned tensors"
        out = torch.empty_like(x)
        if rows:
            p = cupy_launch.ptr
            threads = max(128, -(-hidden // (8 * _NORM_VECS * 32)) * 32)
            self._launch("add_rms_norm", x.dtype, rows, (
                p(x), p(delta), p(parts), np.int32(0 if parts is None else parts.shape[0]),
                np.int64(0 if parts is None else parts.stride(0)), p(weight), p(out), np.int32(hidden),
                np.float32(eps)), threads)
        return x, out

    def residual_linear(self, x, weight):
        """x @ weight.T; float32 partials (S, T, N) where split_k() says so, else (T, N) in x's dtype."""
        t, k = x.shape
        n = weight.shape[0]
        s = split_k(t, n, k)
        if s == 1:
            return F.linear(x, weight)
        return torch.bmm(x.view(t, s, k // s).transpose(0, 1), weight.view(n, s, k // s).permute(1, 2, 0),
                         out_dtype=torch.float32)

    def argmax(self, logits):
        """torch.argmax over the last dim of (rows, vocab) 16-bit logits, one block a row."""
        rows, vocab = logits.shape
        if vocab % 8 or not self._aligned(logits) or logits.dtype not in (torch.bfloat16, torch.float16):
            return logits.argmax(dim=-1)
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
        if rows:
            self._launch("argmax_rows", logits.dtype, rows, (cupy_launch.ptr(logits), cupy_launch.ptr(out), np.int32(vocab)),
                         self._ARGMAX_THREADS)
        return out

    def split_rope(self, qkv, rope, hq: int, hkv: int, d: int, out=None):
        t = qkv.shape[0]
        assert qkv.shape[1] == (hq + 2 * hkv) * d and rope.shape == (t,)
        assert d % 16 == 0 and self._aligned(qkv), "split_rope needs head_dim % 16 == 0 and an aligned qkv"
        if out is None:
            out = tuple(torch.empty(t, h, d, dtype=qkv.dtype, device=qkv.device) for h in (hq, hkv, hkv))
        q, k, v = out
        assert q.shape == (t, hq, d) and k.shape == v.shape == (t, hkv, d) and self._aligned(q, k, v)
        if t:
            p = cupy_launch.ptr
            blocks = min(-(-t * (hq + 2 * hkv) * (d // 16) // self._THREADS), 65535)
            self._launch("split_rope", qkv.dtype, blocks, (p(qkv), p(rope), p(self.cos), p(self.sin), p(q), p(k), p(v),
                                                           np.int32(t), np.int32(hq), np.int32(hkv), np.int32(d)))
        return q, k, v

    def silu_mul(self, gate_up):
        rows, two_inter = gate_up.shape
        inter = two_inter // 2
        assert two_inter % 16 == 0 and self._aligned(gate_up), "silu_mul needs an aligned (rows, 2*inter), inter % 8 == 0"
        out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
        if rows and inter:
            p = cupy_launch.ptr
            blocks = min(-(-rows * inter // (8 * self._THREADS)), 4096)
            self._launch("silu_mul", gate_up.dtype, blocks, (p(gate_up), p(out), np.int32(rows), np.int32(inter)))
        return out
