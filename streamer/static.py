"""Static batching, a benchmark baseline (`EngineConfig.static_batch`): the engine's scheduler when
it is set. A subclass of the continuous-batching Scheduler (streamer/scheduler.py); plain Python.

A batch of up to `batch_size` requests is admitted together, and nothing more until all of it has
finished. With `padding` it also does the work a padded static batch does: each prompt's padding
up to the batch's longest is computed (a padding row of its own), and a finished request's row goes
on decoding until the batch's last request ends. Padding rows have no request behind them: their
tokens go nowhere, and memory pressure drops them before it preempts any request. A preempted
request is always recomputed (no swap pool) and waits for the next batch.
"""

from __future__ import annotations

from array import array
from dataclasses import replace
from operator import attrgetter

from streamer.allocator import BlockAllocator
from streamer.scheduler import Chunk, Scheduler, Sequence, Status, StepPlan, TokenOutput


class PaddingRow(Sequence):
    """A row of a padded static batch with no request behind it (the batcher never sees its id)."""

    ghost = True


class StaticScheduler(Scheduler):
    _order_key = attrgetter("ghost", "last_step", "arrival")  # padding rows after the requests

    def __init__(self, allocator: BlockAllocator, block_size: int, max_batch_tokens: int, max_running: int,
                 batch_size: int, padding: bool = False, capacity: int | None = None, **kw) -> None:
        """`capacity`: the most tokens one sequence may hold (a padding row never grows past it).
        `kw`: the Scheduler's, but a host pool (preempted requests are recomputed)."""
        assert batch_size >= 1 and "host_slots" not in kw
        super().__init__(allocator, block_size, max_batch_tokens, max_running, **kw)
        self.batch_size = batch_size
        self.padding = padding
        self.capacity = capacity

    def schedule(self) -> StepPlan:
        if all(s.ghost for s in self.running):
            for row in self.running:  # the batch has ended: its padding rows go
                self._release(row)
                row.status = Status.FINISHED
            self.running = []
            while self.waiting and len(self.running) < self.batch_size:
                seq = self.waiting.popleft()
                seq.status = Status.RUNNING
                self.running.append(seq)  # blocks come as its prefill chunks are scheduled
            if self.padding and self.running:
                self._pad_prompts()
        return super().schedule()

    def _admit(self, budget: int, chunks: list[Chunk]) -> int:
        return budget  # no admission mid-batch: schedule() admits whole batches

    def update(self, plan: StepPlan, sampled: list[int | None]) -> list[TokenOutput]:
        if not any(c.sample and c.seq.ghost for c in plan.chunks):
            return super().update(plan, sampled)
        kept = []
        for chunk, token in zip(plan.chunks, sampled, strict=True):
            row = chunk.seq
            if not (chunk.sample and row.ghost):
                kept.append((chunk, token))
            elif row.status is not Status.FINISHED:  # (a row dropped since the step was planned: nothing)
                assert token is not None
                row.pending -= 1
                row.output_ids.append(token)  # its next input; the token goes nowhere else
        return super().update(replace(plan, chunks=tuple(c for c, _ in kept)), [t for _, t in kept])

    def _stop_running(self, seq: Sequence) -> None:
        if self.padding:
            self._hold_row(seq)  # its row goes on decoding, a padding row now
        else:
            super()._stop_running(seq)

    def _grow_or_preempt(self, seq: Sequence, length: int, preempted: list[Sequence]) -> bool:
        """Padding rows not yet scheduled this step give their blocks up first (in the policy's
        victim order, `seq` among them), dropped, not queued; then requests are preempted."""
        need = self._blocks_needed(seq, seq.num_computed + length)
        while need and not self.allocator.can_allocate(need):
            rows = [s for s in self.running if s.ghost and s.last_step != self.num_steps]
            if not rows:
                break
            row = min(rows, key=self.policy.victim_key)
            self.running.remove(row)
            self._release(row)
            row.status = Status.FINISHED
            if row is seq:
                return False
        return super()._grow_or_preempt(seq, length, preempted)

    # --- padding rows --------------------------------------------------------------------------
    def _pad_prompts(self) -> None:
        """A padding row for each prompt of the new batch shorter than its longest: the padding's
        tokens are computed (its K/V written to blocks of its own) and one token sampled."""
        width = max(s.num_tokens for s in self.running)
        for seq in list(self.running):
            if seq.num_tokens < width:
                self.running.append(self._row(f"pad:{seq.request_id}", [0] * (width - seq.num_tokens), 1, seq))

    def _hold_row(self, seq: Sequence) -> None:
        """`seq` ended: a padding row takes its place, its blocks and its tokens, and decodes on
        while the batch's longest request may still run (never past `capacity`)."""
        live = [s for s in self.running if not s.ghost and s is not seq]
        tokens = seq.prompt_ids + seq.output_ids
        longest = max((s.max_tokens - len(s.output_ids) for s in live), default=0)
        if self.capacity is not None:
            longest = min(longest, self.capacity - len(tokens))
        i = self.running.index(seq)
        if longest < 1:
            del self.running[i]
            return
        row = self._row(f"held:{seq.request_id}", tokens, longest, seq)
        row.block_table, seq.block_table = seq.block_table, array("i")
        row.block_hashes, seq.block_hashes = seq.block_hashes, []
        row.num_computed = min(seq.num_computed, len(tokens) - 1)  # the last token is the next input
        row.computed_high = row.num_computed
        self.running[i] = row

    @staticmethod
    def _row(name: str, tokens: list[int], max_tokens: int, like: Sequence) -> PaddingRow:
        return PaddingRow(name, tokens, max_tokens, status=Status.RUNNING, arrival=like.arrival,
                          t_arrival=like.t_arrival, last_step=like.last_step)
