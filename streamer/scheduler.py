"""The scheduler: which tokens of which requests run in the next step. Plain synchronous Python.

Owns the waiting and running queues and the block allocator; the batcher (streamer/batcher.py),
which holds the table of requests by id, is its only caller. There are no prefill and decode
phases: each step, every scheduled request's computed tokens catch up towards its known tokens
(prompt + generated) under one token budget. Decodes of running requests go first (least
recently scheduled first), then chunks of running prefills, then new requests in the order of
the policy (streamer/policy.py; arrival order by default). `schedule() -> StepPlan`, then
`update(plan, sampled) -> [TokenOutput]`.

A plan counts as computed once it is scheduled: `num_computed` moves at schedule(), and a chunk
that samples leaves its request one `pending` token whose id only update() learns. So the next
step may be scheduled before this one's ids are back (the engine overlaps them): a pending token
is scheduled as a decode like any other, its id fed on the device from the step that samples it.
A request that has every token it may get, pending ones included, is not scheduled again; one
that an update ends (EOS, a stop string) may already be in the next plan, whose token for it is
dropped. A request preempted while its sample is in flight still gets that token.

A request preempted for memory is swapped out when the host pool has free slots (the plan lists
the block -> slot copies for the runner) and resumes from where it stopped; else it is recomputed.

The static-batch benchmark baseline is a subclass of this one: streamer/static.py.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from operator import attrgetter
from typing import ClassVar

from streamer.allocator import BlockAllocator, HostSlots
from streamer.policy import Policy


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
    num_computed: int = 0  # tokens whose K/V are in the arena, or written by a step already planned
    pending: int = 0  # tokens sampled by a planned step whose ids update() has not brought yet (0 or 1)
    # int32 block ids: packed for a step by joining the buffers, not element by element (gpu/attention.py)
    block_table: array = field(default_factory=lambda: array("i"))
    status: Status = Status.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of its full computed blocks
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of computed
    priority: int = 0  # higher classes are admitted first (policy `priority`)
    client: str = ""  # who asked (a connection, an address), for the policy `fair`
    arrival: int = 0  # arrival number, set by Scheduler.add
    t_arrival: float = 0.0  # the scheduler's clock at add
    last_step: int = 0  # the step that last scheduled it (least recently scheduled is preempted first)
    computed_high: int = 0  # most tokens it ever had computed: below this, computing again is recompute
    swap_slots: list[int] = field(default_factory=list)  # swapped out: host slot i holds its block i
    ghost: ClassVar[bool] = False  # True for a padding row of a padded static batch (streamer/static.py)

    @property
    def num_tokens(self) -> int:
        """Known tokens: the prompt and the generated ids update() has brought."""
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:  # decode: no copy of the whole history
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]


# Chunk and TokenOutput, made once per token, are plain slotted records: a frozen dataclass's
# __init__ (one object.__setattr__ a field) costs three times as much. Nothing changes them.
@dataclass(slots=True)
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
    # KV copies the runner makes before the step's forward: swap-ins first (host slot -> device
    # block), then swap-outs (device block -> host slot), so that a host slot freed by a swap-in
    # may be reused by a swap-out of the same step (the first-token pass preempts after admission).
    # They never share a device block: a swap-in's blocks come from an admission, which never
    # follows a preemption of the same step, and an admitted request is never a victim.
    swap_out: tuple[tuple[int, int], ...] = ()  # (block, slot)
    swap_in: tuple[tuple[int, int], ...] = ()  # (slot, block)

    @cached_property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    @cached_property
    def num_decodes(self) -> int:
        """Chunks of one token that sample: decodes."""
        return sum(1 for c in self.chunks if c.length == 1 and c.sample)


@dataclass(slots=True)
class TokenOutput:
    seq: Sequence
    token_id: int
    finish_reason: str | None  # "stop" (EOS) | "length" | None


class Scheduler:
    # Running requests are scheduled in this order: least recently scheduled first, then by arrival.
    _order_key: ClassVar[Callable[[Sequence], tuple]] = attrgetter("last_step", "arrival")

    def __init__(
        self, allocator: BlockAllocator, block_size: int, max_batch_tokens: int, max_running: int,
        prefix_caching: bool = False, policy: Policy | None = None,
        clock: Callable[[], float] = time.monotonic, host_slots: HostSlots | None = None,
    ) -> None:
        self.allocator = allocator
        self.host_slots = host_slots or HostSlots(0)  # the swap pool's free slots; none: always recompute
        self.policy = policy or Policy()
        self.clock = clock
        self.prefix_caching = prefix_caching
        self.prefix_hit_tokens = 0
        self.block_size = block_size
        # Knobs a controller may turn between steps (from the step loop, like everything here):
        self.max_batch_tokens = max_batch_tokens  # token budget of one step
        # Most running requests. Lowered below the running count, it preempts nobody: admission
        # stops until fewer run (only _admit and _pending_prefill read it).
        self.max_running = max_running
        # Arrival order, except that preempted requests wait at the front, oldest first.
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self.num_preemptions = 0
        self.recomputed_tokens = 0  # tokens computed again after their KV was freed by a preemption
        self.num_swaps_out = self.num_swaps_in = 0  # preemptions that swapped; their resumptions
        self.swapped_out_blocks = self.swapped_in_blocks = 0
        self._swap_out: list[tuple[int, int]] = []  # this step's copies, for its plan
        self._swap_in: list[tuple[int, int]] = []
        self.num_steps = 0
        self._arrivals = itertools.count()

    # --- the queues --------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        assert seq.status is Status.WAITING and not seq.output_ids, seq.request_id
        assert seq.prompt_ids and seq.max_tokens >= 1
        seq.arrival, seq.t_arrival = next(self._arrivals), self.clock()
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a request now (stop string, cancel, error) and free its blocks. Idempotent."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self._stop_running(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        self.host_slots.free(seq.swap_slots)  # a swapped-out request cancelled while it waits
        seq.swap_slots = []
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step ------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        self.num_steps += 1
        budget = self.max_batch_tokens
        chunks: list[Chunk] = []
        preempted: list[Sequence] = []
        self._swap_out, self._swap_in = [], []
        # Running requests, least recently scheduled first (a decode deferred last step goes first
        # now): decodes (one token to catch up), then unfinished prefills. With the `first-token`
        # policy, decodes leave a share of the budget to pending prefills. A request is scheduled
        # this step once its `last_step` is this step's number.
        order = sorted(self.running, key=self._order_key)
        keep = self.policy.prefill_reserve(budget, self._pending_prefill(budget)) if self.policy.first_token else 0
        budget, rest = self._schedule_decodes(order, budget, keep, chunks, preempted)
        budget = self._schedule_prefills(rest, budget, chunks, preempted)
        if not preempted:
            budget = self._admit(budget, chunks)
        if keep:  # budget the prefills could not use goes to the decodes deferred for them
            self._schedule_decodes(order, budget, 0, chunks, preempted)
        assert not {b for b, _ in self._swap_out} & {b for _, b in self._swap_in}, "see StepPlan"
        return StepPlan(tuple(chunks), tuple(preempted), tuple(self._swap_out), tuple(self._swap_in))

    def _schedule_decodes(self, order: list[Sequence], budget: int, keep: int, chunks: list[Chunk],
                          preempted: list[Sequence]) -> tuple[int, list[Sequence]]:
        """A one-token chunk for each running decode in `order` while the budget stays above
        `keep`. Returns the budget left and the requests of `order` left for the prefill pass: the
        running ones with more than one token to compute, and all those after the budget ran out.
        The hot loop of a decode step: one pass, no call for most requests."""
        running, step, block_size = Status.RUNNING, self.num_steps, self.block_size
        rest: list[Sequence] = []
        for i, seq in enumerate(order):
            if budget <= keep:
                rest += order[i:]
                break
            if seq.status is not running or seq.last_step == step:
                continue
            sampled = len(seq.output_ids) + seq.pending
            start = seq.num_computed
            todo = len(seq.prompt_ids) + sampled - start
            if todo != 1:
                rest.append(seq)
                continue
            if sampled >= seq.max_tokens:
                continue  # all its tokens are sampled; an update will finish it
            # (most decodes: the last block has room, and no call is made)
            if start >= len(seq.block_table) * block_size and not self._grow_or_preempt(seq, 1, preempted):
                continue  # seq itself was preempted
            chunks.append(Chunk(seq, start, 1, True))
            seq.last_step = step
            if start < seq.computed_high:  # KV freed by a preemption, computed again
                self.recomputed_tokens += 1
            else:
                seq.computed_high = start + 1
            seq.num_computed = start + 1
            seq.pending += 1
            budget -= 1
        return budget, rest

    def _schedule_prefills(self, order: list[Sequence], budget: int, chunks: list[Chunk],
                           preempted: list[Sequence]) -> int:
        """Chunks for the running prefills in `order` while budget lasts; returns the budget left."""
        for seq in order:
            if budget <= 0:
                break
            if seq.status is not Status.RUNNING or seq.last_step == self.num_steps:
                continue
            todo = seq.num_tokens + seq.pending - seq.num_computed
            if todo <= 1 or len(seq.output_ids) + seq.pending >= seq.max_tokens:
                continue
            length = min(todo, budget)
            if -(-(seq.num_computed + length) // self.block_size) > len(seq.block_table) and \
                    not self._grow_or_preempt(seq, length, preempted):
                continue  # seq itself was preempted
            self._add_chunk(seq, length, chunks)
            budget -= length
        return budget

    def _admit(self, budget: int, chunks: list[Chunk]) -> int:
        """Admit waiting requests in policy order while budget, slots and blocks last. The first
        request whose blocks do not fit stops admission: nothing overtakes it, so a long prompt
        is not starved by short ones. Returns the budget left."""
        policy = self.policy
        if not self.waiting or budget <= 0 or len(self.running) >= self.max_running:
            return budget
        candidates = self.waiting
        if policy.reorders:
            candidates = policy.admission_order(list(self.waiting), self.running, self.clock())
        if policy.fair:
            running_of = Counter(s.client for s in self.running)
            waiting_of = Counter(s.client for s in self.waiting)
            share = policy.client_share(self.max_running, len(running_of.keys() | waiting_of.keys()))
        admitted = 0
        for seq in candidates:
            if budget <= 0 or len(self.running) >= self.max_running:
                break
            if policy.fair and not seq.num_preemptions and running_of[seq.client] >= share and any(
                    n for c, n in waiting_of.items() if c != seq.client):
                continue  # this client has its share while another waits
            if self.prefix_caching and not seq.block_table and not seq.swap_slots:
                self._reuse_prefix(seq)
            assert not seq.pending  # preempted with a token in flight: update() brought it before this schedule
            length = min(seq.num_tokens - seq.num_computed, budget)
            need = self._blocks_needed(seq, seq.num_computed + length)
            if not self.allocator.can_allocate(need):
                if not seq.swap_slots:  # (a swapped-out one holds no device block and keeps its KV)
                    self._release(seq)  # give back any cached prefix it took; retried next step
                    seq.num_computed = 0
                break
            seq.block_table.extend(self.allocator.allocate(need))
            if seq.swap_slots:
                self._swap_back(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            self._add_chunk(seq, length, chunks)
            budget -= length
            admitted += 1
            if policy.fair:
                running_of[seq.client] += 1
                waiting_of[seq.client] -= 1
        if not policy.reorders:  # admitted in queue order: a prefix of it
            for _ in range(admitted):
                self.waiting.popleft()
        elif admitted:
            self.waiting = deque(s for s in self.waiting if s.status is Status.WAITING)
        return budget

    def _add_chunk(self, seq: Sequence, length: int, chunks: list[Chunk]) -> None:
        start = seq.num_computed
        end = start + length
        sample = end == len(seq.prompt_ids) + len(seq.output_ids) + seq.pending
        chunks.append(Chunk(seq, start, length, sample))
        seq.last_step = self.num_steps
        if start < seq.computed_high:  # KV freed by a preemption, computed again
            self.recomputed_tokens += min(end, seq.computed_high) - start
        if end > seq.computed_high:
            seq.computed_high = end
        seq.num_computed = end
        seq.pending += sample

    def _pending_prefill(self, limit: int) -> int:
        """Prefill tokens that could run this step (counted up to `limit`)."""
        n = 0
        admissible = self.waiting if len(self.running) < self.max_running else ()
        for seq in itertools.chain(self.running, admissible):
            todo = seq.num_tokens + seq.pending - seq.num_computed
            if todo > 1 or seq.status is Status.WAITING:
                n += todo
                if n >= limit:
                    break
        return n

    def update(self, plan: StepPlan, sampled: list[int | None]) -> list[TokenOutput]:
        """Record the step's results: one sampled id per chunk with `sample`, else None. Plans are
        updated in the order they were scheduled."""
        outputs = []
        running, finished = Status.RUNNING, Status.FINISHED
        prefix_caching, block_size = self.prefix_caching, self.block_size
        for chunk, token in zip(plan.chunks, sampled, strict=True):
            seq = chunk.seq
            if seq.status is finished:
                continue  # finished (cancelled, stopped) while the step ran: its result is dropped
            if chunk.sample:
                assert token is not None
                seq.pending -= 1
                seq.output_ids.append(token)  # a request preempted since this step was planned keeps it too
            # A block is cached once its ids are all known (its K/V may still be in flight: any
            # step that reads it is planned later, so runs later on the device's one stream).
            if (prefix_caching and seq.num_computed // block_size > len(seq.block_hashes) and seq.status is running
                    and min(seq.num_computed, seq.num_tokens) // block_size > len(seq.block_hashes)):
                self._register_full_blocks(seq)  # (the first test alone is false for most tokens)
            if not chunk.sample:
                continue
            reason = None
            if token in seq.eos_ids:
                reason = "stop"
            elif len(seq.output_ids) >= seq.max_tokens:
                reason = "length"
            if reason:
                self.finish(seq, reason)
            outputs.append(TokenOutput(seq, token, reason))
        return outputs

    # --- blocks --------------------------------------------------------------------------------
    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def _grow_or_preempt(self, seq: Sequence, length: int, preempted: list[Sequence]) -> bool:
        """Give `seq` blocks for `length` more tokens, preempting running requests not yet scheduled
        this step (`seq` among them) in the policy's victim order: least recently scheduled first,
        then the latest arrival. False if `seq` itself was preempted."""
        need = self._blocks_needed(seq, seq.num_computed + length)
        if not need:  # most decode steps: the last block has room
            return True
        while not self.allocator.can_allocate(need):
            victim = min((s for s in self.running if s.last_step != self.num_steps), key=self.policy.victim_key)
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        seq.block_table.extend(self.allocator.allocate(need))
        return True

    def _stop_running(self, seq: Sequence) -> None:
        """`seq`, running, has ended (finish() frees its blocks next)."""
        self.running.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Free all of seq's blocks. If the host pool has room for its computed blocks they are
        swapped out (copied before this step's forward may overwrite them) and it resumes from
        num_computed; else it will be recomputed from prompt + generated tokens (with prefix
        caching, its full blocks stay cached until evicted, and come back for free). It waits
        ahead of every new arrival, among the preempted ones by arrival."""
        self.running.remove(seq)
        n = -(-seq.num_computed // self.block_size)
        slots = self.host_slots.allocate(n) if n else None
        if slots is not None:
            self._swap_out += zip(seq.block_table[:n], slots, strict=True)
            seq.swap_slots = slots
            self.num_swaps_out += 1
            self.swapped_out_blocks += n
        else:
            seq.num_computed = 0
        # Its block hashes go too: they name blocks it no longer holds. When it is swapped back,
        # update() registers its full blocks again under the same hashes (where no other block
        # holds that prefix already), so its swapped-in blocks serve as prefix cache like any.
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        i = 0
        while i < len(self.waiting) and self.waiting[i].num_preemptions and self.waiting[i].arrival < seq.arrival:
            i += 1
        self.waiting.insert(i, seq)

    def _swap_back(self, seq: Sequence) -> None:
        """seq, just given fresh blocks, gets its swapped-out KV back into the first of them. Its
        slots are free at once: this step's swap-outs, the only writers that could reuse them,
        run after its swap-ins (StepPlan)."""
        self._swap_in += zip(seq.swap_slots, seq.block_table[: len(seq.swap_slots)], strict=True)
        self.num_swaps_in += 1
        self.swapped_in_blocks += len(seq.swap_slots)
        self.host_slots.free(seq.swap_slots)
        seq.swap_slots = []

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = array("i")
        seq.block_hashes = []

    # --- prefix cache ------------------------------------------------------------------------
    def _block_hash(self, seq: Sequence, i: int, parent: int) -> int:
        """Hash of block i's tokens chained onto its prefix's hash (blake2b: no practical collisions)."""
        tokens = seq.token_ids(i * self.block_size, (i + 1) * self.block_size)
        h = hashlib.blake2b(parent.to_bytes(16, "little"), digest_size=16)
        h.update(array("I", tokens).tobytes())  # native byte order: the hashes never leave the process
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
            seq.block_table.extend(found)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed = len(seq.block_table) * self.block_size
        if seq.num_computed and seq.num_preemptions == 0:
            seq.cached_tokens = seq.num_computed
            self.prefix_hit_tokens += seq.num_computed

    def _register_full_blocks(self, seq: Sequence) -> None:
        for i in range(len(seq.block_hashes), min(seq.num_computed, seq.num_tokens) // self.block_size):
            h = self._block_hash(seq, i, seq.block_hashes[-1] if seq.block_hashes else 0)
            self.allocator.register(seq.block_table[i], h)
            seq.block_hashes.append(h)
