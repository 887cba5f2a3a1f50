"""The queue a request's events travel by, step loop -> request task (streamer/request.py)."""

import pytest
import trio
import trio.testing

from streamer.request import EventQueue


async def test_events_arrive_in_order_and_the_end_after_the_queued_ones():
    q = EventQueue(8)
    got = []

    async def reader():
        while True:
            try:
                got.append(await q.get())
            except trio.EndOfChannel:
                got.append("end")
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()  # the reader is parked on the empty queue
        assert q.put(1) and q.put(2)
        await trio.testing.wait_all_tasks_blocked()
        assert q.put(3)
        q.close()  # queued events still reach the reader, then the end
    assert got == [1, 2, 3, "end"]


async def test_a_parked_reader_can_be_cancelled_and_read_again():
    q = EventQueue(8)
    with trio.move_on_after(0.01) as scope:
        await q.get()
    assert scope.cancelled_caught
    q.put("x")  # no stale wake-up of the cancelled wait
    with trio.fail_after(1):
        assert await q.get() == "x"


async def test_get_is_a_cancel_point_even_with_events_queued():
    q = EventQueue(8)
    q.put("x")
    with trio.CancelScope() as scope:
        scope.cancel()
        await q.get()
    assert scope.cancelled_caught and len(q) == 1


async def test_after_the_reader_leaves_puts_are_refused_and_nothing_is_kept():
    q = EventQueue(8)
    q.put(1)
    q.leave()
    assert q.reader_gone and len(q) == 0
    assert q.put(2) is False and len(q) == 0
    with pytest.raises(trio.EndOfChannel):
        await q.get()
