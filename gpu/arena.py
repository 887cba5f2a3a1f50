"""The KV arena: one contiguous tensor holding K and V of every layer, cut into fixed blocks.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    def bytes_per_block(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.block_size * self.head_dim * elem


def blocks_that_fit(
    nbytes: int, *, num_layers: int, num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype
) -> int:
    """How many blocks an arena of ``nbytes`` holds (at least 0)."""
    per = ArenaShape(num_layers, 1, num_kv_heads, block_size, head_dim).bytes_per_block(dtype)
    return max(0, nbytes // per)


class KVArena:
    """One allocation for the whole KV cache; per-layer K and V are views into it."""

    def __init__(self, shape: ArenaShape, dtype: torch.dtype, device: torch.device | str) -> None:
        self.shape = shape
        self.dtype = dtype
        self.kv = torch.zeros(shape.dims, dtype=dtype, device=device)  # allocated once

    @property
    def block_size(self) -> int:
        return self.shape.block_size

    @property
    def num_blocks(self) -> int:
        return self.shape.num_blocks

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each (num_blocks, Hkv, block_size, D), contiguous."""
        return self.kv[layer, 0], self.kv[layer, 1]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()
