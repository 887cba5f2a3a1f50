"""The elementwise parts of a transformer layer: residual add + RMSNorm, q/k/v split + RoPE, SiLU * up.

Two implementations with one interface, chosen with the attention backend (gpu/runner.py):
`TorchOps`, plain torch ops (the CPU path and the reference), and `CudaOps`, one CuPy kernel launch
each from gpu/csrc/fused_ops.cu. Torch needs 6-10 launches and float32 temporaries for each of
these; at decode batch sizes those launches cost more than the layer's GEMMs (docs/BENCHMARKS.md).
The kernels round to the storage dtype where the torch chain does, so the two agree to within
float summation order (tests/test_fused_ops_gpu.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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
        """(x + delta, rms_norm(x + delta)); delta None: (x, rms_norm(x))."""
        if delta is not None:
            x = x + delta
        return x, rms_norm(x, weight, eps)

    def split_rope(self, qkv, rope, hq: int, hkv: int, d: int):
        """qkv (T, (hq+2hkv)*d) -> contiguous q (T, hq, d), k, v (T, hkv, d); q and k rotated."""
        cos, sin = rope
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q = apply_rope(q.view(-1, hq, d), cos, sin).contiguous()
        k = apply_rope(k.view(-1, hkv, d), cos, sin).contiguous()
        return q, k, v.reshape(-1, hkv, d).contiguous()

    def silu_mul(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


_MODULES: dict[bool, object] = {}


class CudaOps:
    """The same ops as TorchOps, one kernel each, launched on torch's current stream (so they are
    captured in CUDA graphs with the rest of the step). The residual add happens in place."""

    name = "cuda"
    _THREADS = 256

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        assert cos.is_cuda and cos.dtype == torch.float32 and cos.is_contiguous()
        self.cos, self.sin = cos, sin.contiguous()
        self._streams: dict[int, object] = {}
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
        for name in ("add_rms_norm", "split_rope", "silu_mul"):
            m.get_function(name)

    def _launch(self, name: str, dtype, grid: int | tuple[int, int], args) -> None:
        import cupy

        ptr = torch.cuda.current_stream().cuda_stream
        if ptr not in self._streams:
            self._streams[ptr] = cupy.cuda.ExternalStream(ptr)
        fn = self._fns.get((name, dtype))
        if fn is None:
            fn = self._fns[(name, dtype)] = self._module(dtype).get_function(name)
        with self._streams[ptr]:
            fn(grid if isinstance(grid, tuple) else (grid,), (self._THREADS,), args)

    @staticmethod
    def _ptr(t: torch.Tensor | None) -> np.uint64:
        return np.uint64(0 if t is None else t.data_ptr())

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        assert positions.dtype == torch.int64
        return positions

    def add_rms_norm(self, x, delta, weight, eps):
        rows, hidden = x.shape
        assert x.is_contiguous() and weight.shape == (hidden,) and weight.dtype == x.dtype
        if delta is not None:
            assert delta.shape == x.shape and delta.dtype == x.dtype and delta.is_contiguous()
        out = torch.empty_like(x)
        if rows:
            p = self._ptr
            self._launch("add_rms_norm", x.dtype, rows,
                         (p(x), p(delta), p(weight), p(out), np.int32(hidden), np.float32(eps)))
        return x, out

    def split_rope(self, qkv, rope, hq: int, hkv: int, d: int):
        t = qkv.shape[0]
        assert qkv.is_contiguous() and qkv.shape[1] == (hq + 2 * hkv) * d and rope.shape == (t,)
        q = torch.empty(t, hq, d, dtype=qkv.dtype, device=qkv.device)
        k = torch.empty(t, hkv, d, dtype=qkv.dtype, device=qkv.device)
        v = torch.empty(t, hkv, d, dtype=qkv.dtype, device=qkv.device)
        if t:
            p = self._ptr
            self._launch("split_rope", qkv.dtype, t, (p(qkv), p(rope), p(self.cos), p(self.sin), p(q), p(k), p(v),
                                                      np.int32(hq), np.int32(hkv), np.int32(d)))
        return q, k, v

    def silu_mul(self, gate_up):
        rows, two_inter = gate_up.shape
        assert gate_up.is_contiguous() and two_inter % 2 == 0
        inter = two_inter // 2
        out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
        if rows and inter:
            p = self._ptr
            self._launch("silu_mul", gate_up.dtype, (min(-(-inter // self._THREADS), 8), min(rows, 65535)),
                         (p(gate_up), p(out), np.int32(rows), np.int32(inter)))
        return out
