"""The scheduler: which tokens of which requests run in the next step. Plain synchronous Python.

Owns the request table (waiting and running queues) and the block allocator; only the step-loop
task calls it. There are no prefill and decode phases: each step, every scheduled request's
computed tokens catch up towards its known tokens (prompt + generated) under one token budget.
Decodes of running requests go first, then chunks of running prefills, then new requests in
arrival order. `schedule() -> StepPlan`, then `update(plan, sampled) -> [TokenOutput]`.
"""

from __future__ import annotations

import enum
import hashlib
from collections import deque
from dataclasses import dataclass, field

from streamer.allocator import BlockAllocator


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's token state. Mutated only by the scheduler."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int  # already capped so prompt + output fits the model's context
    eos_ids: frozenset[int] = frozenset()
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the arena
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of its full computed blocks
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of computed

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:  # decode: no copy of the whole history
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]


@dataclass(frozen=True)
class Chunk:
    """Tokens [start, start+length) of `seq` run this step; `sample` when they reach its end."""

    seq: Sequence
    start: int
    length: int
    sample: bool


@dataclass(frozen=True)
class StepPlan:
    chunks: tuple[Chunk, ...]
    preempted: tuple[Sequence, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


@dataclass(frozen=True)
class TokenOutput:
    seq: Sequence
    token_id: int
    finish_reason: str | None  # "stop" (EOS) | "length" | None


class Scheduler:
    def __init__(
        self, allocator: BlockAllocator, block_size: int, max_batch_tokens: int, max_running: int,
        static_batch: int | None = None, prefix_caching: bool = False,
    ) -> None:
        self.allocator = allocator
        self.prefix_caching = prefix_caching
        self.prefix_hit_tokens = 0
        # Static batching (a baseline for benchmarks): admit up to `static_batch` requests together,
        # only once the previous batch has completely finished.
        self.static_batch = static_batch
        self.block_size = block_size
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.max_admit_per_step: int | None = None  # most new requests admitted in one step; None: no cap
        self.waiting: deque[Sequence] = deque()  # arrival order; preempted requests rejoin at the front
        self.running: list[Sequence] = []  # admission order
        self.requests: dict[str, Sequence] = {}
        self.num_preemptions = 0

    # --- request table -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        assert seq.request_id not in self.requests, seq.request_id
        assert seq.prompt_ids and seq.max_tokens >= 1
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def finish(self, request_id: str, reason: str) -> Sequence | None:
        """End a request now (stop string, cancel, error) and free its blocks. Idempotent."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step ------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        budget = self.max_batch_tokens
        chunks: list[Chunk] = []
        preempted: list[Sequence] = []
        scheduled: set[int] = set()
        if self.static_batch and not self.running:
            while self.waiting and len(self.running) < self.static_batch:
                seq = self.waiting.popleft()
                seq.status = Status.RUNNING
                self.running.append(seq)  # blocks come as its prefill chunks are scheduled

        # Running requests: decodes (one token to catch up) first, then unfinished prefills.
        for decode_pass in (True, False):
            for seq in list(self.running):
                if budget == 0:
                    break
                if seq.status is not Status.RUNNING or id(seq) in scheduled:
                    continue
                todo = seq.num_tokens - seq.num_computed
                if (todo == 1) != decode_pass:
                    continue
                length = min(todo, budget)
                if not self._grow_or_preempt(seq, length, scheduled, preempted):
                    continue  # seq itself was preempted
                chunks.append(Chunk(seq, seq.num_computed, length, seq.num_computed + length == seq.num_tokens))
                scheduled.add(id(seq))
                budget -= length

        # Waiting requests, strictly in order: admit nothing new once blocks or budget run out.
        admitted = 0
        while (self.waiting and budget > 0 and len(self.running) < self.max_running and not preempted
               and not self.static_batch and (self.max_admit_per_step is None or admitted < self.max_admit_per_step)):
            seq = self.waiting[0]
            if self.prefix_caching and not seq.block_table:
                self._reuse_prefix(seq)
            length = min(seq.num_tokens - seq.num_computed, budget)
            need = self._blocks_needed(seq, seq.num_computed + length)
            if not self.allocator.can_allocate(need):
                self._release(seq)  # give back any cached prefix it took; retried next step
                seq.num_computed = 0
                break
            seq.block_table += self.allocator.allocate(need)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(Chunk(seq, seq.num_computed, length, seq.num_computed + length == seq.num_tokens))
            scheduled.add(id(seq))
            budget -= length
            admitted += 1
        return StepPlan(tuple(chunks), tuple(preempted))

    def update(self, plan: StepPlan, sampled: list[int | None]) -> list[TokenOutput]:
        """Record the step's results: one sampled id per chunk with `sample`, else None."""
        outputs = []
        for chunk, token in zip(plan.chunks, sampled, strict=True):
            seq = chunk.seq
            if seq.status is not Status.RUNNING:
                continue  # finished (cancelled) while the step ran: its result is dropped
            seq.num_computed = chunk.start + chunk.length
            if self.prefix_caching:
                self._register_full_blocks(seq)
            if not chunk.sample:
                continue
            assert token is not None
            seq.output_ids.append(token)
            reason = None
            if token in seq.eos_ids:
                reason = "stop"
            elif len(seq.output_ids) >= seq.max_tokens:
                reason = "length"
            if reason:
                self.finish(seq.request_id, reason)
            outputs.append(TokenOutput(seq, token, reason))
        return outputs

    # --- blocks --------------------------------------------------------------------------------
    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def _grow_or_preempt(self, seq: Sequence, length: int, scheduled: set[int], preempted: list[Sequence]) -> bool:
        """Give `seq` blocks for `length` more tokens, preempting the most recently admitted
        requests not yet scheduled this step (possibly `seq` itself). False if `seq` was preempted."""
        need = self._blocks_needed(seq, seq.num_computed + length)
        while not self.allocator.can_allocate(need):
            victims = [s for s in self.running if id(s) not in scheduled]
            victim = victims[-1]  # seq itself is among them, so this is never empty
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        seq.block_table += self.allocator.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free all of seq's blocks; it will be recomputed from prompt + generated tokens."""
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []

    # --- prefix cache ------------------------------------------------------------------------
    def _block_hash(self, seq: Sequence, i: int, parent: int) -> int:
        """Hash of block i's tokens chained onto its prefix's hash (blake2b: no practical collisions)."""
        tokens = seq.token_ids(i * self.block_size, (i + 1) * self.block_size)
        h = hashlib.blake2b(parent.to_bytes(16, "little"), digest_size=16)
        h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
        return int.from_bytes(h.digest(), "little")

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Take the cached blocks of seq's longest cached prefix. The last known token is always
        recomputed (it yields the logits), so a reused block is never written again."""
        assert seq.num_computed == 0 and not seq.block_table
        parent = 0
        for i in range((seq.num_tokens - 1) // self.block_size):
            h = self._block_hash(seq, i, parent)
            found = self.allocator.lookup([h])
            if not found:
                break
            seq.block_table += found
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed = len(seq.block_table) * self.block_size
        if seq.num_computed and seq.num_preemptions == 0:
            seq.cached_tokens = seq.num_computed
            self.prefix_hit_tokens += seq.num_computed

    def _register_full_blocks(self, seq: Sequence) -> None:
        for i in range(len(seq.block_hashes), seq.num_computed // self.block_size):
            h = self._block_hash(seq, i, seq.block_hashes[-1] if seq.block_hashes else 0)
            self.allocator.register(seq.block_table[i], h)
            seq.block_hashes.append(h)
