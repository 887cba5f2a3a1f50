"""CUDA graphs of decode-only steps: one graph per batch-size bucket, captured at warm-up.

Owned by the model runner. A decode step of n requests (one new token each) replays the graph of
the smallest bucket >= n; rows n..bucket-1 are padding that read and write only the arena's
scratch block. Step inputs are packed on the host into pinned buffers and reach the graph's
static device buffers in two non-blocking copies. Attention is the same one launch per layer,
captured inside the graph.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from gpu.attention import AttnMetadata

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, model, backend, ops, block_size: int, scratch_block: int, max_batch: int, max_blocks_per_seq: int,
                 capture: bool = True) -> None:
        self.model, self.backend, self.ops = model, backend, ops
        self.bs, self.scratch = block_size, scratch_block
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.bmax = bmax = max_batch
        dev = model.device
        cap = bmax * max_blocks_per_seq
        # int64: [ids | positions | slots], each bmax long.   int32: [cu_q | seq_lens | cu_blocks | tables]
        self.dev64 = torch.zeros(3 * bmax, dtype=torch.int64, device=dev)
        self.dev32 = torch.zeros(3 * bmax + 2 + cap, dtype=torch.int32, device=dev)
        pin = dev.type == "cuda"
        self.host64 = torch.zeros(3 * bmax, dtype=torch.int64, pin_memory=pin)
        self.host32 = torch.zeros(3 * bmax + 2 + cap, dtype=torch.int32, pin_memory=pin)
        self.rows = torch.arange(bmax, device=dev)
        self.max_context = model.spec.max_position
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture_all()

    # --- views into the static buffers ---------------------------------------------------------
    def _inputs(self, b: int):
        m = self.bmax
        ids, pos, slots = self.dev64[:b], self.dev64[m : m + b], self.dev64[2 * m : 2 * m + b]
        cu_q, lens = self.dev32[: b + 1], self.dev32[m + 1 : m + 1 + b]
        cu_b, tables = self.dev32[2 * m + 1 : 2 * m + 2 + b], self.dev32[3 * m + 2 :]
        return ids, pos, slots, cu_q, lens, cu_b, tables

    def _meta(self, b: int, host: tuple | None = None) -> AttnMetadata:
        """Metadata over the static buffers. `host` (seq_lens, tables) is needed only by the
        torch reference backend; the CUDA kernel reads the device side alone."""
        _, _, slots, cu_q, lens, cu_b, tables = self._inputs(b)
        seq_lens_host, tables_host = host if host else ((self.max_context,) * b, ((self.scratch,),) * b)
        return AttnMetadata(cu_q, lens, cu_b, tables, slots, 1, max(seq_lens_host), (1,) * b,
                            tuple(seq_lens_host), tuple(tables_host))

    # --- fill -----------------------------------------------------------------------------------
    def _fill(self, b: int, ids: list[int], positions: list[int], tables: list[list[int]]) -> None:
        """Pack one decode step (n <= b real rows, the rest padding) and copy it to the device."""
        n, m, bs = len(ids), self.bmax, self.bs
        pad = b - n
        pos = np.asarray(positions + [0] * pad, dtype=np.int64)
        tabs = tables + [[self.scratch]] * pad
        lens = pos + 1
        nblocks = np.fromiter((len(t) for t in tabs), dtype=np.int64, count=b)
        flat = np.fromiter(itertools.chain.from_iterable(tabs), dtype=np.int64, count=int(nblocks.sum()))
        cu_b = np.concatenate(([0], np.cumsum(nblocks)))
        slots = flat[cu_b[:-1] + pos // bs] * bs + pos % bs
        h64, h32 = self.host64.numpy(), self.host32.numpy()
        h64[:b] = ids + [0] * pad
        h64[m : m + b] = pos
        h64[2 * m : 2 * m + b] = slots
        h32[: b + 1] = np.arange(b + 1)
        h32[m + 1 : m + 1 + b] = lens
        h32[2 * m + 1 : 2 * m + 2 + b] = cu_b
        h32[3 * m + 2 : 3 * m + 2 + len(flat)] = flat
        used32 = 3 * m + 2 + len(flat)
        # Safe to reuse the pinned buffers next step: every step ends in a device-to-host sync.
        self.dev64.copy_(self.host64, non_blocking=True)
        self.dev32[:used32].copy_(self.host32[:used32], non_blocking=True)

    def _host(self, b: int, positions: list[int], tables: list[list[int]]) -> tuple:
        """(seq_lens, tables) as tuples, for the torch reference backend's eager run only: a
        replayed graph reads the device buffers alone, so CUDA steps skip this O(blocks) copy."""
        pad = b - len(positions)
        return tuple(p + 1 for p in positions) + (1,) * pad, tuple(map(tuple, tables)) + ((self.scratch,),) * pad

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    # --- run ------------------------------------------------------------------------------------
    def logits(self, ids: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Logits (n, V) of a decode step, by graph replay (or eagerly over the same static
        buffers when nothing was captured, e.g. on the CPU)."""
        n = len(ids)
        b = self.bucket(n)
        assert b is not None and n >= 1
        self._fill(b, ids, positions, tables)
        if b in self.graphs:
            graph, out = self.graphs[b]
            graph.replay()
        else:
            inputs = self._inputs(b)
            meta = self._meta(b, self._host(b, positions, tables))
            out = self.model.forward(inputs[0], inputs[1], meta, self.backend, self.rows[:b], self.ops)
        return out[:n]

    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for b in reversed(self.buckets):  # largest first: smaller graphs reuse its pool memory
            self._fill(b, [0] * b, [0] * b, [[self.scratch]] * b)
            inputs, meta = self._inputs(b), self._meta(b)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the graph, as CUDA graphs require
                self.model.forward(inputs[0], inputs[1], meta, self.backend, self.rows[:b], self.ops)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model.forward(inputs[0], inputs[1], meta, self.backend, self.rows[:b], self.ops)
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize()
