"""The scheduler alone, with fake model outputs: budget, no padding, decode-first, FIFO,
preemption and resume, blocks back to the free list."""

from __future__ import annotations

from streamer.allocator import BlockAllocator
from streamer.scheduler import Scheduler, Sequence, Status

BS = 4


def make(num_blocks=64, budget=16, max_running=8):
    alloc = BlockAllocator(num_blocks)
    return alloc, Scheduler(alloc, BS, budget, max_running)


def seq(rid, prompt_len, max_tokens=4, eos=frozenset()):
    return Sequence(rid, list(range(1, prompt_len + 1)), max_tokens, eos)


def live(sched):
    """The scheduler's unfinished sequences by request id (the batcher keeps this table in the engine)."""
    return {q.request_id: q for q in [*sched.running, *sched.waiting]}


def run_step(sched, token=7):
    """Schedule, check the plan's invariants, feed fake tokens; return the plan."""
    plan = sched.schedule()
    assert plan.num_tokens <= sched.max_batch_tokens
    for c in plan.chunks:
        assert c.length >= 1  # no empty (padding) entries
        assert c.start + c.length == c.seq.num_computed  # planned counts as computed
        assert len(c.seq.block_table) * BS >= c.start + c.length  # blocks cover the chunk
    sched.update(plan, [token if c.sample else None for c in plan.chunks])
    return plan


def test_budget_chunks_long_prompt_and_decodes_go_first():
    alloc, s = make(budget=8)
    s.add(seq("a", 3))
    plan = run_step(s)
    assert [(c.seq.request_id, c.length, c.sample) for c in plan.chunks] == [("a", 3, True)]
    s.add(b := seq("b", 20))
    plan = run_step(s)  # a decodes first (1 token), b gets the other 7 as a prefill chunk
    assert [(c.seq.request_id, c.start, c.length, c.sample) for c in plan.chunks] == [("a", 3, 1, True), ("b", 0, 7, False)]
    plan = run_step(s)
    assert [(c.seq.request_id, c.start, c.length) for c in plan.chunks] == [("a", 4, 1), ("b", 7, 7)]
    plan = run_step(s)
    assert [(c.seq.request_id, c.start, c.length, c.sample) for c in plan.chunks] == [("a", 5, 1, True), ("b", 14, 6, True)]
    assert b.output_ids == [7]


def test_fifo_admission_stops_at_first_request_that_does_not_fit():
    alloc, s = make(num_blocks=8, budget=64)
    s.add(seq("big", 20))  # 5 blocks
    s.add(seq("small1", 2))  # would fit in the 1 remaining block ...
    plan = run_step(s)
    assert [c.seq.request_id for c in plan.chunks] == ["big", "small1"]
    s.add(seq("huge", 10))  # 3 blocks: does not fit now
    s.add(seq("tiny", 1))  # fits, but must not overtake "huge"
    plan = run_step(s)
    assert "tiny" not in [c.seq.request_id for c in plan.chunks]
    assert [q.request_id for q in s.waiting] == ["huge", "tiny"]


def test_max_running_caps_admission():
    alloc, s = make(budget=64, max_running=2)
    for r in "abc":
        s.add(seq(r, 2))
    plan = run_step(s)
    assert [c.seq.request_id for c in plan.chunks] == ["a", "b"]
    assert [q.request_id for q in s.waiting] == ["c"]


def test_lowering_max_running_at_run_time_preempts_nobody():
    """A controller lowers the cap below the running count: all keep decoding, nobody is
    admitted until fewer run than the cap, and then only up to it."""
    alloc, s = make(budget=64, max_running=8)
    for i in range(4):
        s.add(seq(f"r{i}", 2, max_tokens=2 + i))  # r0 ends first, then r1, ...
    run_step(s)
    for i in range(4, 7):
        s.add(seq(f"r{i}", 2))
    s.max_running = 2
    plan = run_step(s)  # r0..r3 decode, r0 ends; nobody is admitted
    assert [c.seq.request_id for c in plan.chunks] == ["r0", "r1", "r2", "r3"] and not plan.preempted
    assert [q.request_id for q in s.waiting] == ["r4", "r5", "r6"] and s.num_preemptions == 0
    plan = run_step(s)  # r1..r3 still over the cap of 2: r1 ends, still nobody admitted
    assert [c.seq.request_id for c in plan.chunks] == ["r1", "r2", "r3"] and not plan.preempted
    run_step(s)  # r2 ends: one runs, a slot under the cap
    plan = run_step(s)
    assert [c.seq.request_id for c in plan.chunks] == ["r3", "r4"]
    assert [q.request_id for q in s.waiting] == ["r5", "r6"] and s.num_preemptions == 0


def test_finish_on_eos_and_length_frees_blocks():
    alloc, s = make()
    s.add(seq("eos", 3, max_tokens=10, eos=frozenset({9})))
    s.add(seq("len", 3, max_tokens=2))
    plan = s.schedule()
    outs = s.update(plan, [9, 5])
    assert [(o.seq.request_id, o.finish_reason) for o in outs] == [("eos", "stop"), ("len", None)]
    outs = s.update(s.schedule(), [5])
    assert [(o.seq.request_id, o.finish_reason) for o in outs] == [("len", "length")]
    assert alloc.num_free == alloc.num_blocks and not s.has_work()


def test_preempts_the_younger_and_resumes_from_prompt_plus_output():
    alloc, s = make(num_blocks=4, budget=64)
    old, new = seq("old", 4, max_tokens=8), seq("new", 4, max_tokens=8)
    s.add(old)
    s.add(new)
    for _ in range(8):  # position 8 (after 5 generated tokens) needs a 3rd block
        if new.num_preemptions:
            break
        run_step(s, token=11)
    # "old" needed a 3rd block with none free: of the two, both scheduled last step, "new", the
    # later arrival, was preempted
    assert (old.num_preemptions, new.num_preemptions) == (0, 1)
    assert new.status is Status.WAITING and len(new.block_table) == 0 and new.num_computed == 0
    generated = list(new.output_ids)
    assert len(generated) == 5
    s.add(later := seq("later", 2))
    assert list(s.waiting)[:2] == [new, later]  # the preempted one keeps its place
    while old.status is not Status.FINISHED:
        run_step(s, token=12)
    # "new" resumes: one chunk recomputes prompt + generated tokens, then samples the next one
    plan = run_step(s, token=13)
    first = next(c for c in plan.chunks if c.seq is new)
    assert (first.start, first.length, first.sample) == (0, 4 + 5, True)
    assert new.output_ids == generated + [13]


def test_finish_and_abort_are_idempotent_and_return_every_block():
    alloc, s = make(num_blocks=16)
    seqs = {r: seq(r, 5) for r in "abcd"}
    for q in seqs.values():
        s.add(q)
    run_step(s)
    s.finish(seqs["a"], "cancelled")  # running
    s.finish(seqs["a"], "cancelled")  # again: no-op
    s.add(e := seq("e", 3))
    s.finish(e, "cancelled")  # still waiting
    for r in "bcd":
        s.finish(seqs[r], "cancelled")
    assert alloc.statistics().free_blocks == alloc.statistics().total_blocks == 16
    assert not s.has_work()


def test_update_drops_results_of_requests_finished_during_the_step():
    alloc, s = make()
    s.add(a := seq("a", 3))
    plan = s.schedule()
    s.finish(a, "cancelled")  # e.g. the client left while the step ran
    assert s.update(plan, [5]) == []
    assert alloc.num_free == alloc.num_blocks


