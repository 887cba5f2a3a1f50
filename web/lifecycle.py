"""The server's shutdown sequence: the `closing` event the sockets watch, counts of open things,
and `drain()`, which streamer/__main__.py (or a test) calls on SIGTERM.
"""

from __future__ import annotations

import structlog
import trio

from streamer.handle import EngineHandle
from streamer.types import RequestError

log = structlog.get_logger(__name__)
FLUSH_TIMEOUT = 5.0  # after the engine is empty, how long sockets get to send their last frames


class OpenCount:
    """How many of something are open, with a wait for none: ``with count:`` or open()/close()."""

    def __init__(self) -> None:
        self.value = 0
        self._zero = trio.Event()
        self._zero.set()

    def open(self) -> None:
        if self.value == 0:
            self._zero = trio.Event()
        self.value += 1

    def close(self) -> None:
        self.value -= 1
        if self.value == 0:
            self._zero.set()

    def __enter__(self) -> OpenCount:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def wait_zero(self) -> None:
        while self.value:
            await self._zero.wait()


class Lifecycle:
    """Shared by every socket of one app: `closing` is set once the server stops taking work."""

    def __init__(self) -> None:
        self.closing = trio.Event()
        self.sockets = OpenCount()


async def drain(engine: EngineHandle, lifecycle: Lifecycle, timeout: float, hurry: trio.Event | None = None) -> int:
    """Stop accepting, let live generations finish for up to `timeout` s (or until `hurry` is set),
    then end the rest with a `shutting_down` error; returns how many were cut. Sockets close (1001)
    once their generations ended, given at most FLUSH_TIMEOUT s to send their last frames."""
    engine.stop_accepting()
    lifecycle.closing.set()
    log.info("drain_started", live=engine.live_requests, timeout_s=timeout)
    cut = 0
    async with trio.open_nursery() as nursery:
        if hurry is not None:
            async def cut_short() -> None:
                await hurry.wait()
                nursery.cancel_scope.cancel()
            nursery.start_soon(cut_short)
        with trio.move_on_after(timeout):
            await engine.wait_drained()
        nursery.cancel_scope.cancel()
    if engine.live_requests:
        cut = engine.live_requests
        engine.abort_all(RequestError("shutting_down", "the server is shutting down"))
    with trio.move_on_after(FLUSH_TIMEOUT):
        await engine.wait_drained()
        await lifecycle.sockets.wait_zero()
    log.info("drain_finished", cut=cut, sockets_left=lifecycle.sockets.value)
    return cut
