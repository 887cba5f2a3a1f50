"""The host swap pool: KV blocks of preempted requests, in pinned host memory (plain on the CPU).

Owned by the model runner and driven from `ModelRunner.launch`, in its one worker thread, on the
device's current stream: copies are ordered with the steps' kernels by the stream, and the host
never touches the pool's memory, so no extra sync is needed. Which slots are free is plain Python
in streamer/allocator.py (`HostSlots`); this object only sees int slot and block ids.

Layout: slot-major, ``(slots, num_layers, 2, num_kv_heads, block_size, head_dim)`` (quantized
arenas: their code bytes for head_dim, and the scales likewise), so one slot is one contiguous run
of bytes and a run of consecutive slots is one copy. A swap is one gather (or scatter) kernel over
the arena's block axis plus one copy per run of consecutive slots, usually one per request.
"""

from __future__ import annotations

import torch

from gpu.arena import KVArena


def runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(index into ids, first id, length) of each run of consecutive ids."""
    out: list[tuple[int, int, int]] = []
    for i, x in enumerate(ids):
        if out and x == out[-1][1] + out[-1][2]:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((i, x, 1))
    return out


class SwapPool:
    def __init__(self, arena: KVArena, slots: int) -> None:
        assert slots >= 1
        self.arena = arena
        self.num_slots = slots
        pin = arena.kv.is_cuda
        per_slot = lambda t: (slots, *t.shape[:2], *t.shape[3:])  # noqa: E731  the block axis moved first
        self.kv = torch.empty(per_slot(arena.kv), dtype=arena.kv.dtype, pin_memory=pin)
        self.scales = None
        if arena.scales is not None:
            self.scales = torch.empty(per_slot(arena.scales), dtype=arena.scales.dtype, pin_memory=pin)

    @property
    def nbytes(self) -> int:
        return sum(host.numel() * host.element_size() for _, host in self._pairs())

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(arena tensor viewed block-major, pool tensor) for K/V and, quantized, the scales."""
        pairs = [(self.arena.kv.movedim(2, 0), self.kv)]
        if self.scales is not None:
            pairs.append((self.arena.scales.movedim(2, 0), self.scales))
        return pairs

    def swap_out(self, blocks: list[int], slots: list[int]) -> None:
        """Copy arena blocks into host slots (queued; done when the step's event fires)."""
        assert len(blocks) == len(slots)
        idx = torch.tensor(blocks, dtype=torch.long).to(self.arena.kv.device, non_blocking=True)
        for dev, host in self._pairs():
            gathered = dev.index_select(0, idx)  # (n, L, 2, Hkv, bs[, D]), contiguous, on the device
            for i, s, n in runs(slots):
                host[s : s + n].copy_(gathered[i : i + n], non_blocking=True)

    def swap_in(self, slots: list[int], blocks: list[int]) -> None:
        """Copy host slots into arena blocks (queued before anything the step reads them with)."""
        assert len(blocks) == len(slots)
        idx = torch.tensor(blocks, dtype=torch.long).to(self.arena.kv.device, non_blocking=True)
        for dev, host in self._pairs():
            staged = torch.empty((len(slots), *host.shape[1:]), dtype=host.dtype, device=dev.device)
            for i, s, n in runs(slots):
                staged[i : i + n].copy_(host[s : s + n], non_blocking=True)
            dev.index_copy_(0, idx, staged)  # writes through the view into the arena
