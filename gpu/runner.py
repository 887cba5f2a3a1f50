"""The model runner: turns one step's ragged batch into a forward pass and sampled tokens.

Owns the model, the KV arena, the host swap pool and the attention backend. Called from one worker
thread at a time (the engine's step loop); it holds no per-request state between steps.

Steps may overlap: step N+1 may be launched before step N is collected (at most one step ahead),
so the host prepares the next step while the device runs this one. A decode whose token step N
samples names that row of step N's ids (`SeqInput.feed`); the runner copies it on the device, so
the id never makes a round trip through the host first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from gpu.arena import ArenaShape, KVArena
from gpu.attention import TorchAttention, build_metadata
from gpu.model import Transformer
from gpu.sampler import SampleSpec, apply_bitmask, sample, token_logprobs
from gpu.swap import SwapPool


@dataclass(slots=True)  # one a token each step: slotted, not frozen (cheaper to build); nothing changes it
class SeqInput:
    """One request's slice of a step: tokens at positions start_pos.. and its whole block table."""

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: SampleSpec | None  # None: a prefill chunk that does not reach the prompt's end
    # >= 0: this one-token decode's id is row `feed` of the previous launched step's sampled ids
    # (token_ids holds a placeholder); -1: token_ids are the ids
    feed: int = -1


@dataclass
class Launched:
    """A step queued on the device: its sampled ids land in `ids` once `done` has fired."""

    ids: torch.Tensor | None  # (S,) int64, pinned host memory on CUDA; None while its sampling is deferred
    done: torch.cuda.Event | None  # None: already computed (CPU)
    mask: list[bool]  # per seq of the step: whether it sampled
    begin: torch.cuda.Event | float  # when the device started it: a timing event, or (CPU) the clock
    end: float = 0.0  # CPU: when the computation ended
    logprobs: torch.Tensor | None = None  # gpu/sampler.token_logprobs' rows, for the sampling seqs `lp_rows`
    lp_rows: list[tuple[int, int]] | None = None  # (position among the step's sampling seqs, its k)
    # A step whose sampling waits for its grammar masks (`sample_deferred`): (logits, specs, masked rows)
    deferred: tuple | None = None


def make_backend(name: str, arena: KVArena, scale: float):
    if name == "torch":
        return TorchAttention(arena, scale)
    if name == "cuda":
        from gpu.cuda_attention import CudaAttention  # needs CuPy; imported only on CUDA

        return CudaAttention(arena, scale)
    raise ValueError(f"unknown attention backend {name!r}; use 'torch' or 'cuda'")


class ModelRunner:
    def __init__(
        self, model: Transformer, num_blocks: int, block_size: int, attention: str,
        graph_batch: int = 0, capture: bool = True, kv_dtype: torch.dtype | None = None, swap_slots: int = 0,
        graph_tokens: int = 0,
    ) -> None:
        """`num_blocks` usable KV blocks (ids 0..num_blocks-1); one more, the scratch block, takes
        the writes of padding rows. `graph_batch` > 0: decode steps of up to that many requests
        run from static buffers, replayed as CUDA graphs when `capture`. `kv_dtype`: how the arena
        stores K/V, the model's dtype (None), torch.int8 or torch.int4. `swap_slots` > 0: a host pool of that
        many blocks for preempted requests' KV. `graph_tokens` > 0: other steps of up to that many
        tokens run as pieces between attention launches (gpu/piecewise.py), replayed as CUDA graphs
        when `capture`."""
        s = model.spec
        self.model = model
        self.device = model.device
        shape = ArenaShape(s.num_layers, num_blocks + 1, s.num_kv_heads, block_size, s.head_dim)
        self.arena = KVArena(shape, model.dtype, model.device, kv_dtype)
        self.swap = SwapPool(self.arena, swap_slots) if swap_slots else None
        self.backend = make_backend(attention, self.arena, model.scale)
        # The "cuda" backend brings the fused elementwise kernels too; "torch" is torch ops throughout.
        self.ops = model.cuda_ops() if attention == "cuda" else model.torch_ops
        if attention == "cuda":
            self.ops.warmup(model.dtype)
        self._last_ids = torch.empty(0, dtype=torch.long, device=self.device)  # the last launched step's samples
        self.graphs = None
        if graph_batch:
            from gpu.graphs import DecodeGraphs

            per_seq = -(-min(s.max_position, num_blocks * block_size) // block_size)
            self.graphs = DecodeGraphs(model, self.backend, self.ops, block_size, num_blocks, graph_batch, per_seq, capture)
        self.pieces = None
        if graph_tokens:
            from gpu.piecewise import PiecewiseGraphs

            self.pieces = PiecewiseGraphs(model, self.backend, self.ops, graph_tokens, capture)

    def step(self, seqs: list[SeqInput]) -> list[int | None]:
        """Run one forward pass over all `seqs`; return a sampled id per seq that samples."""
        return self.collect(self.launch(seqs))

    def replays(self, num_seqs: int) -> bool:
        """Whether a decode step of `num_seqs` one-token sampling seqs goes through the decode
        graphs: on CUDA one graph replay, well under a millisecond of host time. Other steps launch
        from Python: as pieces, a replay and an attention launch a layer; eagerly, ~200 kernels
        (several milliseconds)."""
        return self.graphs is not None and 0 < num_seqs <= self.graphs.bmax

    def launch(self, seqs: list[SeqInput], swap_out: tuple[tuple[int, int], ...] = (),
               swap_in: tuple[tuple[int, int], ...] = (), masks: tuple[list[int], torch.Tensor | None] | None = None,
               ) -> Launched:
        """Queue the step's work on the device and return at once (on CUDA; the CPU computes here).
        `collect` waits for the sampled ids. At most two steps in flight, collected in launch
        order: launch N, launch N+1, collect N, launch N+2, collect N+1, ...

        First the step's KV swaps, on the same stream as its forward: `swap_in` (slot, block)
        pairs, then `swap_out` (block, slot) pairs. So a victim's blocks are copied out before
        another request's forward overwrites them, swapped-in blocks are filled before the forward
        reads them, and a host slot a swap-in reads may be written by a swap-out of the same step."""
        # The host packs the step first; `begin` is recorded after, so the step's device time
        # never counts the host's packing (a device idle meanwhile shows as idle).
        cuda = self.device.type == "cuda"
        feed = [(i, s.feed) for i, s in enumerate(seqs) if s.feed >= 0]
        g = self.graphs
        if self.replays(len(seqs)) and all(len(s.token_ids) == 1 and s.sample for s in seqs):
            step = g.pack([s.token_ids[0] for s in seqs], [s.start_pos for s in seqs], [s.block_table for s in seqs], feed)
            begin = self._begin(swap_out, swap_in)
            logits = g.logits(step, self._last_ids)
            specs = [s.sample for s in seqs]
            return self._sampled(logits, specs, [True] * len(seqs), begin, masks)
        if not seqs:  # only swaps this step
            return self._sampled(None, [], [], self._begin(swap_out, swap_in))
        ids: list[int] = []
        positions: list[int] = []
        q_lens, seq_lens, rows, specs = [], [], [], []
        fed = []  # (row of ids, row of the last step's samples)
        for s in seqs:
            if s.feed >= 0:
                fed.append((len(ids), s.feed))
            ids += s.token_ids
            positions += range(s.start_pos, s.start_pos + len(s.token_ids))
            q_lens.append(len(s.token_ids))
            seq_lens.append(s.start_pos + len(s.token_ids))
            if s.sample is not None:
                rows.append(len(ids) - 1)  # logits only at the request's last position
                specs.append(s.sample)
        t, k = len(ids), len(fed)
        # One host-to-device copy, from pinned memory (reused only once the copy is done):
        # [ids | positions | logit rows | fed rows | their rows in the last step's samples]
        host = torch.tensor(ids + positions + rows + [r for r, _ in fed] + [f for _, f in fed], dtype=torch.long,
                            pin_memory=cuda)
        begin = self._begin(swap_out, swap_in)
        dev = self.device
        meta = build_metadata(q_lens, seq_lens, [s.block_table for s in seqs], self.arena.block_size, dev)
        packed = host.to(dev, non_blocking=cuda)
        input_ids, pos, row_idx, fed_rows, fed_src = packed.split([t, t, len(rows), k, k])
        if k:
            input_ids.index_put_((fed_rows,), self._last_ids.index_select(0, fed_src))  # (see graphs.py _upload)
        if self.pieces is not None and t <= self.pieces.tmax:
            logits = self.pieces.logits(input_ids, pos, meta, row_idx)  # writes the KV
        else:
            logits = self.model.forward(input_ids, pos, meta, self.backend, row_idx, self.ops)
        return self._sampled(logits if specs else None, specs, [s.sample is not None for s in seqs], begin, masks)

    def _begin(self, swap_out: tuple[tuple[int, int], ...], swap_in: tuple[tuple[int, int], ...]):
        """Mark the start of the step's device work (a timing event; the CPU: the clock), then
        queue its swaps."""
        if self.device.type == "cuda":
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
        else:
            begin = time.perf_counter()
        if swap_in:
            self.swap.swap_in([slot for slot, _ in swap_in], [block for _, block in swap_in])
        if swap_out:
            self.swap.swap_out([block for block, _ in swap_out], [slot for _, slot in swap_out])
        return begin

    def sample_deferred(self, launched: Launched, bitmask: torch.Tensor | None) -> None:
        """Sample a step launched with deferred masks, now that they are known (None: unmasked)."""
        logits, specs, rows = launched.deferred
        done = self._sampled(logits, specs, launched.mask, launched.begin, (rows, bitmask) if bitmask is not None else None)
        for name in ("ids", "done", "end", "logprobs", "lp_rows", "deferred"):
            setattr(launched, name, getattr(done, name))

    def _sampled(self, logits: torch.Tensor | None, specs: list[SampleSpec], mask: list[bool], begin,
                 masks: tuple[list[int], torch.Tensor | None] | None = None) -> Launched:
        """Sample the step's logits rows (None: it samples nothing) and queue the copy back."""
        if masks is not None and masks[1] is None:
            return Launched(None, None, mask, begin, deferred=(logits, specs, masks[0]))
        if logits is None:
            ids = torch.empty(0, dtype=torch.long, device=self.device)
        else:
            masked = apply_bitmask(logits, *masks) if masks is not None else logits
            ids = sample(masked, specs, self.ops.argmax)
        lp, lp_rows = None, None
        if any(s.logprobs >= 0 for s in specs):
            lp, rows = token_logprobs(logits, ids, specs)
            lp_rows = [(r, specs[r].logprobs) for r in rows]
        self._last_ids = ids  # the next step's decodes may take their ids from it (SeqInput.feed)
        if ids.device.type != "cuda":
            return Launched(ids, None, mask, begin, time.perf_counter(), lp, lp_rows)
        host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        host.copy_(ids, non_blocking=True)  # the step's one device-to-host copy (two with logprobs)
        if lp is not None:
            lp = torch.empty(lp.shape, dtype=lp.dtype, pin_memory=True).copy_(lp, non_blocking=True)
        done = torch.cuda.Event(enable_timing=True)
        done.record()
        return Launched(host, done, mask, begin, logprobs=lp, lp_rows=lp_rows)

    @staticmethod
    def ready(launched: Launched) -> bool:
        """Whether `collect` would return without waiting (a non-blocking look at the device)."""
        return launched.done is None or launched.done.query()

    @staticmethod
    def collect(launched: Launched) -> list[int | None]:
        """Wait for a launched step (the GIL is free meanwhile); its sampled id per seq, None where
        the seq did not sample."""
        if launched.done is not None:
            launched.done.synchronize()
        ids = launched.ids.tolist()
        if len(ids) == len(launched.mask):  # every seq sampled (a decode step)
            return ids
        it = iter(ids)
        return [next(it) if m else None for m in launched.mask]

    @staticmethod
    def logprobs(launched: Launched) -> dict[int, tuple[float, tuple[tuple[int, float], ...]]] | None:
        """After `collect`: the step's logprobs by seq position, (sampled id's log-probability,
        ((id, log-probability) of the top k, most likely first)); None if no seq asked."""
        if launched.logprobs is None:
            return None
        seq_of = [i for i, m in enumerate(launched.mask) if m]  # sampling row -> seq position
        out = {}
        for (r, k), row in zip(launched.lp_rows, launched.logprobs.tolist(), strict=True):
            width = (len(row) - 1) // 2  # the step's largest k
            out[seq_of[r]] = (row[0], tuple(zip(map(int, row[1 + width:1 + width + k]), row[1:1 + k], strict=True)))
        return out

    @staticmethod
    def timing(launched: Launched, previous: Launched | None) -> tuple[float, float]:
        """(seconds the device spent on a collected step, seconds it sat idle between `previous`
        and it); on the CPU, the host's clock around the computation."""
        if launched.done is None:
            idle = launched.begin - previous.end if previous is not None and previous.done is None else 0.0
            return launched.end - launched.begin, max(0.0, idle)
        seconds = launched.begin.elapsed_time(launched.done) / 1000
        idle = previous.done.elapsed_time(launched.begin) / 1000 if previous is not None and previous.done else 0.0
        return seconds, max(0.0, idle)
