"""A request as the engine holds it, the messages request tasks send the step loop, and the
`Generation` a request's task reads its events from. The step loop alone mutates a `Request`."""

from __future__ import annotations

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
    outbox: trio.MemorySendChannel
    detok: Detokenizer
    t_arrival: float
    label: str  # the client's id, for logs
    spec: SampleSpec  # how its tokens are drawn (unseeded: the same for every token)
    t_scheduled: float | None = None
    t_first: float | None = None
    t_last: float | None = None  # last token sent
    room: int = 0  # tokens that may be sent before the outbox must be looked at again (engine._send)


@dataclass(frozen=True)
class Submit:
    request: Request


@dataclass(frozen=True)
class Cancel:
    request_id: str


@dataclass(frozen=True)
class AbortAll:
    error: RequestError


class Generation:
    """A request's stream of events. Use as ``async with gen: async for ev in gen``."""

    def __init__(self, request_id: str, prompt_tokens: int, events: trio.MemoryReceiveChannel,
                 control: trio.MemorySendChannel) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._events = events
        self._control = control  # the engine's cancel channel
        self._done = False

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc) -> None:
        # The engine notices the closed channel and aborts the request, freeing its blocks.
        self._events.close()

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> TokenEvent | FinishEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._events.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None
        if isinstance(event, FinishEvent):
            self._done = True
        return event

    async def cancel(self) -> None:
        """Ask the step loop to end this request; the stream then ends with 'cancelled'."""
        self._control.send_nowait(Cancel(self.request_id))
