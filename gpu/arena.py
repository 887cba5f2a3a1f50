"""The KV arena: one contiguous tensor holding K and V of every layer, cut into fixed blocks,
and the quantized storage formats (int8, int4: `KVQuant`) when the arena holds codes.

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

Quantized arenas hold a row's codes in its place: D int8 codes, or D/2 bytes of int4 codes (two a
byte), so the last axis is ``D * bits / 8`` bytes long. Beside them, ``scales`` has the same layout
with the head_dim axis replaced by the row's scales: none for int8 (one float32 scale a row:
``(num_layers, 2, num_blocks, num_kv_heads, block_size)``), ``D / 32`` float16 scales for int4.
The scales of the row at row index ``r`` of ``kv[l, i]`` start at ``r * scales_per_row``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVQuant:
    """A quantized KV format: symmetric absmax codes of `bits` bits in [-qmax, qmax], one scale
    (absmax / qmax, stored as `scale_dtype`) per `group` consecutive values of a row (None, or a
    row shorter than a group: the whole row). int4 codes are two's complement nibbles, value 2j in
    the low nibble of byte j.

    The CUDA kernel's fused write (quantize_chunk in paged_attention.cu) mirrors `quantize` op for
    op: the scale rounded to its storage dtype first, one reciprocal of it per group, then a
    multiply per value (cheaper than a divide on the GPU), round half to even. So the kernel's
    codes and scales equal torch's bit for bit, and the reference can check its writes exactly."""

    bits: int
    group: int | None
    scale_dtype: torch.dtype

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def storage(self) -> torch.dtype:
        """The arena tensor's dtype: int8 codes, or bytes of two int4 codes."""
        return torch.int8 if self.bits == 8 else torch.uint8

    def code_bytes(self, head_dim: int) -> int:
        return head_dim * self.bits // 8

    def group_size(self, head_dim: int) -> int:
        return min(self.group or head_dim, head_dim)

    def scale_shape(self, head_dim: int) -> tuple[int, ...]:
        """The trailing axis of a row's scales: none when the format has one scale a row."""
        return () if self.group is None else (head_dim // self.group_size(head_dim),)

    def row_bytes(self, head_dim: int) -> int:
        """Bytes of one (token, kv head) row of K or V: codes and scales."""
        groups = head_dim // self.group_size(head_dim)
        return self.code_bytes(head_dim) + groups * self.scale_dtype.itemsize

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., D) -> (codes (..., D * bits / 8) in `storage`, scales (..., *scale_shape(D))).
        An all-zero group gets scale 0 and codes 0; a scale past the float16 range saturates."""
        d = x.shape[-1]
        g = x.float().unflatten(-1, (-1, self.group_size(d)))  # (..., groups, group)
        scale = g.abs().amax(dim=-1) * (1.0 / self.qmax)  # a float32 constant, as in the kernel
        if self.scale_dtype != torch.float32:
            scale = scale.clamp(max=torch.finfo(self.scale_dtype).max).to(self.scale_dtype)
        sf = scale.float()
        inv = torch.where(sf > 0, torch.reciprocal(sf), 0.0)
        codes = (g * inv.unsqueeze(-1)).round().clamp(-self.qmax, self.qmax).to(torch.int8).flatten(-2)
        if self.bits == 4:
            codes = pack_int4(codes)
        return codes, scale.reshape(x.shape[:-1] + self.scale_shape(d))

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """codes, scales as `quantize` returns them -> codes * scale in float32, cast to `dtype`."""
        c = unpack_int4(codes) if self.bits == 4 else codes
        s = scale.float().reshape(*c.shape[:-1], -1, 1)  # (..., groups, 1)
        return (c.float().unflatten(-1, (s.shape[-2], -1)) * s).flatten(-2).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], (..., D) -> uint8 (..., D/2): value 2j in the low nibble of byte j."""
    c = codes.to(torch.int16) & 15
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., D/2) -> int8 codes (..., D), each nibble sign-extended."""
    b = packed.to(torch.int16)
    lo, hi = ((b & 15) ^ 8) - 8, ((b >> 4) ^ 8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2).to(torch.int8)


# int8: one float32 scale a row, not float16: 4 bytes against head_dim bytes of codes is 3-6% of the
# row (64 <= D <= 128), and in exchange the scale has the exponent range of bf16 (an fp16 scale
# overflows for |x| > 65504 * 127 and loses precision under 6e-5 * 127).
INT8 = KVQuant(bits=8, group=None, scale_dtype=torch.float32)
# int4: a float16 scale per 32 values, 3.56x the tokens of bf16 (D / 2 + D / 16 bytes a row against
# 2 * D). On SmolLM2 (tools/kv_accuracy.py --variants) a scale per 64 values (3.76x) more than
# doubled the KL divergence from float KV, bf16 scales (3 mantissa bits fewer) raised it a little,
# and float32 scales would fall under 3.5x. float16 saturates only for |x| > 65504 * 7.
INT4 = KVQuant(bits=4, group=32, scale_dtype=torch.float16)
KV_QUANT = {torch.int8: INT8, torch.int4: INT4}  # the storage dtype a KVArena is asked for -> its format


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, kv_dtype: torch.dtype) -> int:
    """Arena bytes one token costs over all layers: K and V rows, with their scales when quantized."""
    quant = KV_QUANT.get(kv_dtype)
    row = quant.row_bytes(head_dim) if quant else head_dim * kv_dtype.itemsize
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
        """Bytes of one block over all layers, K and V (and scales, when quantized)."""
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
    the same (default), or torch.int8 / torch.int4 (`KV_QUANT`), which hold codes in `kv` and add
    the `scales` tensor."""

    def __init__(
        self, shape: ArenaShape, dtype: torch.dtype, device: torch.device | str, kv_dtype: torch.dtype | None = None
    ) -> None:
        kv_dtype = kv_dtype or dtype
        if kv_dtype != dtype and kv_dtype not in KV_QUANT:
            raise ValueError(f"KV storage must be the model dtype {dtype}, torch.int8 or torch.int4, got {kv_dtype}")
        self.shape = shape
        self.dtype = dtype
        self.kv_dtype = kv_dtype
        self.quant = KV_QUANT.get(kv_dtype)
        self.scales = None
        if self.quant is None:
            self.kv = torch.zeros(shape.dims, dtype=kv_dtype, device=device)  # allocated once
        else:
            d, q = shape.head_dim, self.quant
            assert d % q.group_size(d) == 0 and q.code_bytes(d) * 8 == d * q.bits, (d, q)
            self.kv = torch.zeros(shape.dims[:-1] + (q.code_bytes(d),), dtype=q.storage, device=device)
            self.scales = torch.zeros(shape.dims[:-1] + q.scale_shape(d), dtype=q.scale_dtype, device=device)

    @property
    def quantized(self) -> bool:
        return self.quant is not None

    @property
    def block_size(self) -> int:
        return self.shape.block_size

    @property
    def num_blocks(self) -> int:
        return self.shape.num_blocks

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each (num_blocks, Hkv, block_size, D) (quantized: the
        row's code bytes for D), contiguous."""
        return self.kv[layer, 0], self.kv[layer, 1]

    def layer_scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_scales, v_scales) of one layer of a quantized arena, each (num_blocks, Hkv, block_size,
        *scale_shape)."""
        assert self.scales is not None, "only quantized arenas have scales"
        return self.scales[layer, 0], self.scales[layer, 1]

    @property
    def nbytes(self) -> int:
        extra = self.scales.numel() * self.scales.element_size() if self.scales is not None else 0
        return self.kv.numel() * self.kv.element_size() + extra
