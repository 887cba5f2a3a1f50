"""The KV block allocator: a free list and refcounts over the arena's block ids. Plain Python.

Owned by the scheduler (and so only ever touched from the step-loop task). The GPU never sees
this object, only the int32 block ids it hands out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class AllocatorStats:
    total_blocks: int
    free_blocks: int
    used_blocks: int


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV arena must hold at least one block")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks with refcount 1; raises if fewer are free (check `can_allocate` first)."""
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def incref(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} is free"
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block with none left goes back to the free list."""
        for b in blocks:
            assert self._refs[b] > 0, f"double free of block {b}"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def statistics(self) -> AllocatorStats:
        free = len(self._free)
        return AllocatorStats(self.num_blocks, free, self.num_blocks - free)
