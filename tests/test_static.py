"""Static batches, the benchmark baseline (streamer/static.py), with fake model outputs: whole
batches admitted together, and padded ones computing their padding and holding finished rows."""

from __future__ import annotations

from streamer.allocator import BlockAllocator
from streamer.static import StaticScheduler
from tests.test_scheduler import BS, live, run_step, seq


def test_static_batching_admits_together_and_waits_for_the_whole_batch():
    alloc = BlockAllocator(64)
    s = StaticScheduler(alloc, BS, 64, 8, batch_size=2)
    s.add(seq("a", 2, max_tokens=1))
    s.add(seq("b", 2, max_tokens=4))
    s.add(seq("c", 2, max_tokens=1))
    plan = run_step(s)
    assert [c.seq.request_id for c in plan.chunks] == ["a", "b"]  # a finishes here
    for _ in range(3):
        plan = run_step(s)
        assert [c.seq.request_id for c in plan.chunks] == ["b"]  # c waits although a slot is free
    plan = run_step(s)
    assert [c.seq.request_id for c in plan.chunks] == ["c"]


def test_padded_static_batch_computes_the_padding_and_holds_finished_rows():
    alloc = BlockAllocator(64)
    s = StaticScheduler(alloc, BS, 64, 8, batch_size=2, padding=True)
    s.add(seq("a", 2, max_tokens=1))
    s.add(seq("b", 5, max_tokens=4))
    s.add(seq("c", 2, max_tokens=1))
    plan = run_step(s)  # a's prompt is padded to b's 5 tokens: a row of 3 padding tokens
    assert [(c.seq.request_id, c.length) for c in plan.chunks] == [("a", 2), ("b", 5), ("pad:a", 3)]
    assert {r for r, q in live(s).items() if not q.ghost} == {"b", "c"}  # a finished (1 token); its row is held
    for _ in range(3):  # b's 3 more tokens; a's row decodes beside it, the padding row does not
        plan = run_step(s)
        assert [c.seq.request_id for c in plan.chunks] == ["b", "held:a"]
        assert all(c.length == 1 for c in plan.chunks)
    assert "b" not in live(s)
    plan = run_step(s)  # the batch has ended: padding rows go, c comes in alone (no padding)
    assert [c.seq.request_id for c in plan.chunks] == ["c"] and all(not q.ghost for q in s.running)
    assert not s.has_work() and alloc.num_free == alloc.num_blocks


def test_padding_rows_give_way_under_memory_pressure():
    alloc = BlockAllocator(4)  # 16 tokens
    s = StaticScheduler(alloc, BS, 64, 8, batch_size=2, padding=True)
    s.add(seq("a", 1, max_tokens=1))
    s.add(seq("b", 4, max_tokens=9))
    run_step(s)  # a, b and a's 3-token padding row: 3 blocks
    rows = [[c.seq.request_id for c in run_step(s).chunks] for _ in range(8)]  # b grows to 12 tokens
    assert rows[0] == ["b", "held:a"] and rows[-1] == ["b"]  # a's rows gave their blocks up ...
    assert s.num_preemptions == 0 and not [q for q in live(s).values() if not q.ghost]  # ... and b was never preempted
    assert all(q.ghost for q in s.running)
    run_step(s)
    assert not s.has_work() and alloc.num_free == alloc.num_blocks
