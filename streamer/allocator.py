"""The KV block allocator: a free list, refcounts, and the prefix cache's content index; and the
free list of the host swap pool's slots. Plain Python.

Owned by the scheduler (and so only ever touched from the step-loop task). The GPU never sees
this object, only the int32 block ids it hands out.

Prefix caching: a full block whose K/V are computed can be registered under a hash chained over
the token ids of its whole prefix. When its last reference goes, it is kept, still indexed, in an
LRU of evictable blocks; a later request with the same prefix takes it back (`lookup`) instead of
recomputing it. Evictable blocks count as free: `allocate` evicts the least recently used first.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass(frozen=True)
class AllocatorStats:
    total_blocks: int
    free_blocks: int  # includes cached blocks no request holds (evictable)
    used_blocks: int
    cached_blocks: int = 0  # free blocks still indexed by the prefix cache


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV arena must hold at least one block")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._by_hash: dict[int, int] = {}  # content hash -> block
        self._hash_of: dict[int, int] = {}  # block -> content hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks with refcount 1; raises if fewer are free (check `can_allocate` first)."""
        if n > self.num_free:
            raise MemoryError(f"asked for {n} KV blocks, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:  # evict the least recently used cached block
                b, _ = self._evictable.popitem(last=False)
                del self._by_hash[self._hash_of.pop(b)]
            self._refs[b] = 1
            blocks.append(b)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; unreferenced blocks become free (or evictable)."""
        for b in blocks:
            assert self._refs[b] > 0, f"double free of block {b}"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    # --- prefix cache ---------------------------------------------------------------------------
    def register(self, block: int, content: int) -> None:
        """`block` (held, full, computed) now holds the K/V of the prefix hashed as `content`."""
        assert self._refs[block] > 0
        if content in self._by_hash or block in self._hash_of:
            return  # the same prefix computed twice at once: keep the first copy
        self._by_hash[content] = block
        self._hash_of[block] = content

    def lookup(self, chain: list[int]) -> list[int]:
        """Blocks of the longest cached prefix of `chain`, each with a reference taken."""
        found = []
        for content in chain:
            b = self._by_hash.get(content)
            if b is None:
                break
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1
            found.append(b)
        return found

    def statistics(self) -> AllocatorStats:
        free = self.num_free
        return AllocatorStats(self.num_blocks, free, self.num_blocks - free, len(self._evictable))


class HostSlots:
    """Free list of the host swap pool's slots (gpu/swap.py), owned by the scheduler beside the
    BlockAllocator. Lowest ids first, so a request's slots are mostly one run: one copy each way."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots))  # a heap

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """n slots, or None (and nothing taken) if fewer are free."""
        if n > len(self._free):
            return None
        return [heapq.heappop(self._free) for _ in range(n)]

    def free(self, slots: list[int]) -> None:
        for s in slots:
            assert 0 <= s < self.num_slots
            heapq.heappush(self._free, s)
        assert len(self._free) <= self.num_slots, "double free of a host slot"
