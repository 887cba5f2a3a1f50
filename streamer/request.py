"""A request as the engine holds it, the messages request tasks send the step loop, and the
`Generation` a request's task reads its events from (through an `EventQueue`). The step loop
alone mutates a `Request`."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from gpu.sampler import SampleSpec
from streamer.detok import Detokenizer
from streamer.scheduler import Sequence
from streamer.types import FinishEvent, RequestError, SamplingParams, TokenEvent


@dataclass(eq=False)
class Request:
    """What the step loop keeps per request beside the scheduler's `Sequence`."""

    seq: Sequence
    params: SamplingParams
    outbox: EventQueue  # or, in the engine core process, the request's front end's link (streamer/core.py)
    detok: Detokenizer | None  # None: the tokens leave as ids, detokenized by the front end
    t_arrival: float
    label: str  # the client's id, for logs
    spec: SampleSpec  # how its tokens are drawn (unseeded: the same for every token)
    matcher: object | None = None  # its grammar's state (streamer/grammar.py Matcher), once compiled
    t_scheduled: float | None = None
    t_first: float | None = None
    t_last: float | None = None  # last token sent


class EventQueue:
    """One request's events, from the step loop to the request's task: a queue and the task
    parked on it, if any.

    It does what a trio memory channel of one sender and one receiver does here, for less: the
    step loop sends one event a running request a step, its most frequent operation
    (tools/step_loop_bench.py measures it).
    `put` never blocks; `get` is a full checkpoint only when it has to wait: with events queued
    it returns at once (after checkpoint_if_cancelled), so a reader that fell behind catches up
    in one turn. The reader leaving (`leave`) is what the step loop looks at to abort a request
    whose client has gone."""

    __slots__ = ("capacity", "_events", "_reader", "closed", "reader_gone", "watcher")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity  # events the reader may fall behind by (the engine enforces it)
        self._events: deque = deque()
        self._reader: trio.lowlevel.Task | None = None
        self.closed = False  # the step loop sent its last event
        self.reader_gone = False  # the request's task left: later events are dropped
        self.watcher: Callable[[], None] | None = None  # called at each put and at close (`merge`)

    def __len__(self) -> int:
        return len(self._events)

    # --- the step loop's side ---
    def put(self, event) -> bool:
        """Queue an event and wake the reader; False (and nothing queued) if the reader left."""
        if self.reader_gone:
            return False
        self._events.append(event)
        if self._reader is not None:
            task, self._reader = self._reader, None
            trio.lowlevel.reschedule(task)
        elif self.watcher is not None:
            self.watcher()
        return True

    def put_token(self, index: int, token_id: int, text: str, logprobs=None) -> str | None:
        """Queue a token's event. None if queued; else why not, and nothing queued: "cancelled" (the
        reader left) or "slow_consumer" (a token may take any slot but the last, kept for the
        error: the reader stopped reading)."""
        if len(self._events) >= self.capacity - 1:
            return "slow_consumer"
        return None if self.put(TokenEvent(index, token_id, text, logprobs)) else "cancelled"

    def close(self) -> None:
        """No more events: the reader gets the queued ones, then the end."""
        self.closed = True
        if self._reader is not None:
            task, self._reader = self._reader, None
            trio.lowlevel.reschedule(task)
        elif self.watcher is not None:
            self.watcher()

    # --- the request's side ---
    async def get(self):
        """The next event; trio.EndOfChannel once the queue is closed and empty, or left."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._events:
            if self.closed or self.reader_gone:
                raise trio.EndOfChannel
            assert self._reader is None, "one reader at a time"
            self._reader = trio.lowlevel.current_task()

            def abort(_):
                self._reader = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
            if not self._events:  # woken by close()
                raise trio.EndOfChannel
        return self._events.popleft()

    def get_nowait(self):
        """The next queued event, None if there is none yet; trio.EndOfChannel once closed and empty."""
        if self._events:
            return self._events.popleft()
        if self.closed or self.reader_gone:
            raise trio.EndOfChannel
        return None

    def leave(self) -> None:
        """The reader is done (maybe early): queued and later events are dropped."""
        self.reader_gone = True
        self._events.clear()


@dataclass(frozen=True)
class Submit:
    request: Request


@dataclass(frozen=True)
class Cancel:
    request_id: str


@dataclass(frozen=True)
class Compiled:
    """A request's grammar is ready (`matcher`), or could not be compiled (`error`)."""

    request_id: str
    matcher: object | None
    error: RequestError | None = None


@dataclass(frozen=True)
class AbortAll:
    error: RequestError


class Generation:
    """A request's stream of events. Use as ``async with gen: async for ev in gen``."""

    def __init__(self, request_id: str, prompt_tokens: int, events: EventQueue, cancel: Callable[[], None]) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._events = events
        self._cancel = cancel  # asks the step loop to end the request; never blocks
        self._done = False

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading: the engine notices the reader has left and aborts the request, freeing its blocks."""
        self._events.leave()

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> TokenEvent | FinishEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._events.get()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        if isinstance(event, FinishEvent):
            self._done = True
        return event

    async def cancel(self) -> None:
        """Ask the step loop to end this request; the stream then ends with 'cancelled'."""
        self._cancel()


async def merge(gens: list[Generation | None], more: Callable[[], None] | None = None):
    """Read several generations in one task: yields (i, event) as events arrive, until every
    `gens[i]` has finished. `more`, if given, is called once, after the first event: it may fill
    in the None entries of `gens` (a caller submits its later samples then). The caller holds
    each generation's `async with`."""
    wake = trio.Event()

    def poke() -> None:
        wake.set()  # the current `wake`: the loop below replaces it after each wait

    done: set[int] = set()
    while True:
        for i, g in enumerate(gens):
            if g is None or i in done:
                continue
            events = g._events
            if events.watcher is None:
                events.watcher = poke
            try:
                while (ev := events.get_nowait()) is not None:
                    if isinstance(ev, FinishEvent):
                        done.add(i)
                    yield i, ev
                    if more is not None:
                        more, call = None, more
                        call()
            except trio.EndOfChannel:
                done.add(i)
        if len(done) == sum(g is not None for g in gens):
            return
        await wake.wait()
        wake = trio.Event()
