"""The KV arena: one contiguous tensor holding K and V of every layer, cut into fixed blocks,
and the int8 storage format (quantize/dequantize) when the arena holds int8.

Owned by the model runner; the block *allocator* (which blocks are free) is plain Python in
`streamer/allocator.py` and only ever hands the GPU int32 block ids.

Layout (row-major, contiguous)::

    kv: (num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim)
         index 1 is 0 for K, 1 for V

Token ``t`` (0-based position in its sequence) of a request whose block table is ``bt``
lives, for layer ``l`` and kv head ``h``, at::

    kv[l, 0 or 1, bt[t // block_size], h, t % block_size, :]

so the "slot" of that token is ``bt[t // block_size] * block_size + t % block_size``.
Strides in elements: head_dim=1, block_size=D, head=bs*D, block=Hkv*bs*D, k/v=nb*Hkv*bs*D,
layer=2*nb*Hkv*bs*D. One (block, head) tile is ``bs*D`` contiguous elements, which is what the
attention kernel streams through shared memory; writing a new token touches Hkv runs of D.

int8 arenas add ``scales: (num_layers, 2, num_blocks, num_kv_heads, block_size)`` float32, the
same layout without the head_dim axis: the scale of the row at element offset ``o`` of
``kv[l, i]`` is at offset ``o // head_dim`` of ``scales[l, i]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Per-(token, kv head) scales are float32, not float16: 4 bytes against head_dim bytes of codes is
# 3-6% of the row (64 <= D <= 128), and in exchange the scale has the exponent range of bf16 (an
# fp16 scale overflows for |x| > 65504 * 127 and loses precision under 6e-5 * 127) and the CUDA
# kernel and torch produce bit-identical codes from it, so the reference can check the kernel's
# writes exactly.
SCALE_DTYPE = torch.float32
_INV_127 = 1.0 / 127  # a float32 constant in both torch and the CUDA kernel, so they round alike


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization over the last axis: x (..., D) -> (codes int8 (..., D),
    scale float32 (...)), scale = absmax / 127, codes = round-half-even(x / scale) in [-127, 127].
    An all-zero row gets scale 0 and codes 0. The CUDA kernel (quantize_row) mirrors this op for
    op: one reciprocal per row, then a multiply per element (cheaper than a divide on the GPU)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1) * _INV_127
    inv = torch.where(scale > 0, torch.reciprocal(scale), 0.0)
    codes = (xf * inv.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes (..., D) int8, scale (...) -> codes * scale in float32, then cast to `dtype`."""
    return (codes.float() * scale.unsqueeze(-1)).to(dtype)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, kv_dtype: torch.dtype) -> int:
    """Arena bytes one token costs over all layers: K and V rows, plus their scales when int8."""
    row = head_dim * kv_dtype.itemsize + (SCALE_DTYPE.itemsize if kv_dtype == torch.int8 else 0)
    return num_layers * 2 * num_kv_heads * row


@dataclass(frozen=True)
class ArenaShape:
    num_layers: int
    num_blocks: int
    num_kv_heads: int
    block_size: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_blocks", "num_kv_heads", "block_size", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ArenaShape.{name} must be positive, got {getattr(self, name)}")

    @property
    def dims(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_blocks, self.num_kv_heads, self.block_size, self.head_dim)

    def bytes_per_block(self, kv_dtype: torch.dtype) -> int:
        """Bytes of one block over all layers, K and V (and scales, for int8)."""
        return self.block_size * kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, kv_dtype)


def blocks_that_fit(
    nbytes: int, *, num_layers: int, num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype
) -> int:
    """How many blocks an arena of ``nbytes`` holds (at least 0); `dtype` is the KV storage dtype."""
    per = ArenaShape(num_layers, 1, num_kv_heads, block_size, head_dim).bytes_per_block(dtype)
    return max(0, int(nbytes // per))


class KVArena:
    """One allocation for the whole KV cache; per-layer K and V are views into it.

    `dtype` is what K/V come in and go out as (the model's); `kv_dtype` how they are stored:
    the same (default) or torch.int8, which adds the `scales` tensor."""

    def __init__(
        self, shape: ArenaShape, dtype: torch.dtype, device: torch.device | str, kv_dtype: torch.dtype | None = None
    ) -> None:
        kv_dtype = kv_dtype or dtype
        if kv_dtype not in (dtype, torch.int8):
            raise ValueError(f"KV storage must be the model dtype {dtype} or torch.int8, got {kv_dtype}")
        self.shape = shape
        self.dtype = dtype
        self.kv_dtype = kv_dtype
        self.kv = torch.zeros(shape.dims, dtype=kv_dtype, device=device)  # allocated once
        self.scales = torch.zeros(shape.dims[:-1], dtype=SCALE_DTYPE, device=device) if self.quantized else None

    @property
    def quantized(self) -> bool:
        return self.kv_dtype == torch.int8

    @property
    def block_size(self) -> int:
        return self.shape.block_size

    @property
    def num_blocks(self) -> int:
        return self.shape.num_blocks

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each (num_blocks, Hkv, block_size, D), contiguous."""
        return self.kv[layer, 0], self.kv[layer, 1]

    def layer_scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_scales, v_scales) of one layer of an int8 arena, each (num_blocks, Hkv, block_size)."""
        assert self.scales is not None, "only int8 arenas have scales"
        return self.scales[layer, 0], self.scales[layer, 1]

    @property
    def nbytes(self) -> int:
        extra = self.scales.numel() * self.scales.element_size() if self.scales is not None else 0
        return self.kv.numel() * self.kv.element_size() + extra
