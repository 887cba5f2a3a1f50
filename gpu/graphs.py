"""CUDA graphs of decode-only steps: one graph per batch-size bucket, captured at warm-up.

Owned by the model runner. A decode step of n requests (one new token each) replays the graph of
the smallest bucket >= n; rows n..bucket-1 are padding that read and write only the arena's
scratch block. Step inputs are packed on the host into pinned buffers and reach the graph's
static device buffers in two non-blocking copies; decodes whose ids the previous step sampled get
them there, on the device, before the replay. Attention is the same one launch per layer, captured
inside the graph.
"""

from __future__ import annotations

import contextlib
import gc
from array import array

import numpy as np
import torch

from gpu.attention import AttnMetadata, flat_tables


@contextlib.contextmanager
def collector_paused():
    """For CUDA-graph capture: no Python garbage may be finalized mid-capture (freeing, say, an
    earlier engine's graphs makes CUDA calls that invalidate the capture). So collect it now and
    pause the collector until the capture is done."""
    gc.collect()
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, model, backend, ops, block_size: int, scratch_block: int, max_batch: int, max_blocks_per_seq: int,
                 capture: bool = True) -> None:
        self.model, self.backend, self.ops = model, backend, ops
        self.bs, self.scratch = block_size, scratch_block
        self._pad_table = array("i", [scratch_block])  # a padding row's table
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.bmax = bmax = max_batch
        dev = model.device
        cap = bmax * max_blocks_per_seq
        # int64: [ids | positions | slots], each bmax long; int32: [cu_q | seq_lens | cu_blocks | tables];
        # fed: [rows fed | their rows in the last step's samples], each bmax long
        self.dev64 = torch.zeros(3 * bmax, dtype=torch.int64, device=dev)
        self.fed = torch.zeros(2 * bmax, dtype=torch.int64, device=dev)
        self.dev32 = torch.zeros(3 * bmax + 2 + cap, dtype=torch.int32, device=dev)
        pin = dev.type == "cuda"
        # Two sets of pinned staging buffers, used in turn: step N packs into one while the copies
        # of step N-1 (which may not have run yet: steps overlap) read the other. Step N-2's copies
        # are done by then: it was collected before step N was launched.
        # (The int64 one holds dev64 then fed.)
        self._staging = [(torch.zeros(5 * bmax, dtype=torch.int64, pin_memory=pin),
                       torch.zeros(3 * bmax + 2 + cap, dtype=torch.int32, pin_memory=pin)) for _ in range(2)]
        self._turn = 0
        self.max_context = model.spec.max_position
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            with collector_paused():
                self._capture()

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
    def _fill(self, b: int, ids: list[int], positions: list[int], tables: list[list[int]],
              feed: list[tuple[int, int]] = (), last: torch.Tensor | None = None) -> None:
        self._upload(self._pack(b, ids, positions, tables, feed), last)

    def _pack(self, b: int, ids: list[int], positions: list[int], tables: list[list[int]],
              feed: list[tuple[int, int]] = ()) -> tuple:
        """Pack one decode step (n <= b real rows, the rest padding) into pinned staging buffers,
        on the host alone; `feed` (r, j): row r's id will be id j of the previous step's samples."""
        n, m, bs = len(ids), self.bmax, self.bs
        pad = b - n
        pos = np.asarray(positions + [0] * pad, dtype=np.int64)
        tabs = tables + [self._pad_table] * pad
        lens = pos + 1
        nblocks = np.fromiter((len(t) for t in tabs), dtype=np.int64, count=b)
        flat = flat_tables(tabs).astype(np.int64)
        cu_b = np.concatenate(([0], np.cumsum(nblocks)))
        slots = flat[cu_b[:-1] + pos // bs] * bs + pos % bs
        host64, host32 = self._staging[self._turn]
        self._turn ^= 1
        h64, h32 = host64.numpy(), host32.numpy()
        h64[:b] = ids + [0] * pad
        h64[m : m + b] = pos
        h64[2 * m : 2 * m + b] = slots
        k = len(feed)
        if k:
            h64[3 * m : 3 * m + k] = [r for r, _ in feed]
            h64[4 * m : 4 * m + k] = [j for _, j in feed]
        h32[: b + 1] = np.arange(b + 1)
        h32[m + 1 : m + 1 + b] = lens
        h32[2 * m + 1 : 2 * m + 2 + b] = cu_b
        h32[3 * m + 2 : 3 * m + 2 + len(flat)] = flat
        return host64, host32, 3 * m + 2 + len(flat), k

    def _upload(self, packed: tuple, last: torch.Tensor | None) -> None:
        """Copy a packed step to the static device buffers (non-blocking); then the fed rows take
        their ids from `last`, the previous step's samples, on the device."""
        host64, host32, used32, k = packed
        m = self.bmax
        self.dev64.copy_(host64[: 3 * m], non_blocking=True)
        self.dev32[:used32].copy_(host32[:used32], non_blocking=True)
        if k:
            self.fed.copy_(host64[3 * m :], non_blocking=True)
            # (index_put_ rather than index_copy_, which has been seen to hold the host here, at
            # least at first use)
            self.dev64.index_put_((self.fed[:k],), last.index_select(0, self.fed[m : m + k]))

    def _host(self, b: int, positions: list[int], tables: list[list[int]]) -> tuple:
        """(seq_lens, tables) as tuples, for the torch reference backend's eager run only: a
        replayed graph reads the device buffers alone, so CUDA steps skip this O(blocks) copy."""
        pad = b - len(positions)
        return tuple(p + 1 for p in positions) + (1,) * pad, tuple(map(tuple, tables)) + ((self.scratch,),) * pad

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    # --- run ------------------------------------------------------------------------------------
    def pack(self, ids: list[int], positions: list[int], tables: list[list[int]],
             feed: list[tuple[int, int]] = ()) -> tuple:
        """A decode step's inputs, packed on the host (no device work yet) for `logits`. `feed`:
        (row, j) pairs, row's id is the previous step's sample j instead of ids[row]."""
        n = len(ids)
        b = self.bucket(n)
        assert b is not None and n >= 1
        return n, b, self._pack(b, ids, positions, tables, feed), (positions, tables)

    def logits(self, step: tuple, last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (n, V) of a packed decode step, by graph replay (or eagerly over the same static
        buffers when nothing was captured, e.g. on the CPU); `last`: the previous step's samples."""
        n, b, packed, (positions, tables) = step
        self._upload(packed, last)
        if b in self.graphs:
            graph, out = self.graphs[b]
            graph.replay()
        else:
            inputs = self._inputs(b)
            meta = self._meta(b, self._host(b, positions, tables))
            out = self.model.forward(inputs[0], inputs[1], meta, self.backend, None, self.ops)
        return out[:n]

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for b in reversed(self.buckets):  # largest first: smaller graphs reuse its pool memory
            self._fill(b, [0] * b, [0] * b, [[self.scratch]] * b)
            inputs, meta = self._inputs(b), self._meta(b)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the graph, as CUDA graphs require
                self.model.forward(inputs[0], inputs[1], meta, self.backend, None, self.ops)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model.forward(inputs[0], inputs[1], meta, self.backend, None, self.ops)
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize()
