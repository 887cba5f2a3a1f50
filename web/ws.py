"""One /v1/stream websocket connection: a reader loop, one task per generation, one writer task.

`Connection` owns the connection's table of live generations; only its own tasks touch it.
web/app.py creates one per socket and hands it the socket's receive and send functions.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog
import trio

from streamer.handle import EngineHandle
from streamer.types import FinishEvent, RequestError, Timing, TokenEvent
from web import intake
from web.config import WebConfig
from web.lifecycle import Lifecycle, OpenCount
from web.protocol import Cancel, Generate, ProtocolError, done_frame, error_frame, parse_frame, token_frame
from web.wswrite import SendTexts

log = structlog.get_logger(__name__)

# Frames queued for the writer, per live generation the socket may hold: one step's frames for
# all of them fit (a token each, or an error and a done frame), so a step's tokens go out in one
# message. Bounded still: a slow client blocks only its own generation tasks instead of growing
# the server's memory.
FRAMES_PER_LIVE_GENERATION = 2
# Live generations one socket may hold by default (--max-live-per-connection); more is answered
# "overloaded" before reaching the engine.
MAX_LIVE_PER_CONNECTION = WebConfig.max_live_per_connection
# Close codes this module chooses (docs/PROTOCOL.md); hypercorn itself sends 1009 and 1007.
CLOSE_GOING_AWAY = (1001, "server shutting down")
CLOSE_IDLE = (4408, "idle timeout")
_CLOSE = {"type": "_close"}  # writer sentinel: every frame queued before it is sent first

_connection_numbers = itertools.count(1)
# Frames as JSON text: msgspec's encoder takes about a fifteenth of json.dumps's time a frame, and
# writes a non-finite float as null (json.dumps would write NaN, which is not JSON).
_json_encode = msgspec.json.Encoder().encode


def _json(value) -> str:
    return _json_encode(value).decode()


Frame = dict[str, Any]


class Connection:
    def __init__(self, engine: EngineHandle, send_text: Callable[[str], Awaitable[None]], config: WebConfig | None = None,
                 lifecycle: Lifecycle | None = None, batch: bool = False, send_texts: SendTexts | None = None) -> None:
        """`batch` (the client opened /v1/stream?batch=1): every message is a JSON array of the
        frames that were ready together, in order; one socket write carries many streams' tokens.
        Otherwise each frame is a message, and `send_texts` (web/wswrite.py), where the server
        offers it, writes the messages that were ready together in one socket write."""
        self.engine = engine
        self.batch = batch
        self.config = config or WebConfig()
        self.lifecycle = lifecycle or Lifecycle()
        self.number = next(_connection_numbers)
        self._send_text = send_text
        self._send_texts = send_texts
        buffer = FRAMES_PER_LIVE_GENERATION * self.config.max_live_per_connection
        self._frames, self._frames_out = trio.open_memory_channel[Frame](buffer)
        self._live: dict[str, Any] = {}  # client id -> Generation, until its done frame is queued
        self._text_of = lambda token_id: intake.token_text(engine.tokenizer, token_id)
        self._sent_at: dict[str, float] = {}  # client id -> when its last token frame was sent (writer's)
        self._nursery: trio.Nursery | None = None
        self._streams = OpenCount()  # running _stream tasks
        self._last_frame = trio.current_time()  # last frame either way, for the idle timeout
        self._close: tuple[int, str] | None = None

    async def run(self, receive: Callable[[], Awaitable[str | bytes | None]]) -> tuple[int, str] | None:
        """Serve the socket until the client leaves (leaving cancels every generation it started) or
        the server hangs up; returns the (code, reason) the caller should close with, if any."""
        log.debug("ws_open", conn=self.number)
        try:
            with self.lifecycle.sockets:
                await self._serve(receive)
        finally:
            log.debug("ws_close", conn=self.number, live=len(self._live), close=self._close)
        return self._close

    async def _serve(self, receive: Callable[[], Awaitable[str | bytes | None]]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._write_frames)
            nursery.start_soon(self._close_when_drained)
            if self.config.idle_timeout is not None:
                nursery.start_soon(self._close_when_idle, self.config.idle_timeout)
            while True:
                try:
                    data = await receive()
                except trio.EndOfChannel:  # test harnesses close their channel to hang up
                    break
                self._last_frame = trio.current_time()
                await self._dispatch(data)
            nursery.cancel_scope.cancel()

    async def _close_when_drained(self) -> None:
        """Once the server is closing, hang up (1001) as soon as this socket's generations ended."""
        await self.lifecycle.closing.wait()
        await self._streams.wait_zero()  # every stream has queued its done frame by now
        await self._frames.send(_CLOSE)

    async def _close_when_idle(self, timeout: float) -> None:
        """Hang up (4408) when no frame went either way for `timeout` s and nothing is live."""
        while True:
            await trio.sleep_until(self._last_frame + timeout)
            if self._streams.value:
                self._last_frame = trio.current_time()  # a queued generation is not idleness
            elif trio.current_time() >= self._last_frame + timeout:
                await self._frames.send(_CLOSE | {"code": CLOSE_IDLE})
                return

    async def _dispatch(self, data: str | bytes | None) -> None:
        try:
            command = parse_frame(data, max_tokens=self.config.max_tokens)
            if isinstance(command, Cancel):
                await self._cancel(command)
            else:
                self._start(command)
        except ProtocolError as exc:
            # Errors after a generation started are counted by the engine; these never reach it.
            self.engine.count_error(exc.code)
            await self._frames.send(error_frame(exc.request_id, exc.code, exc.message))

    def _start(self, command: Generate) -> None:
        cid = command.id
        if cid in self._live:
            raise ProtocolError("duplicate_id", f"id {cid!r} is still generating on this connection", cid)
        limit = self.config.max_live_per_connection
        if len(self._live) >= limit:
            raise ProtocolError("overloaded", f"at most {limit} live generations per connection", cid)
        try:
            ids = intake.prompt_ids(self.engine, command.prompt, command.messages)
            # The engine's id must be unique server-wide; client ids are only unique per socket.
            # Under --policy fair, each connection is one client.
            gen = intake.submit(self.engine, self.config, ids, command.params, request_id=f"c{self.number}/{cid}",
                                priority=command.priority, client=f"ws:{self.number}")
        except RequestError as exc:
            raise ProtocolError(exc.code, exc.message, cid) from None
        self._live[cid] = gen
        assert self._nursery is not None
        self._streams.open()  # counted from now, not from when the task first runs
        self._nursery.start_soon(self._stream, cid, gen, len(ids))

    async def _cancel(self, command: Cancel) -> None:
        gen = self._live.get(command.id)
        if gen is None:
            raise ProtocolError("unknown_id", f"no live generation with id {command.id!r}", command.id)
        # The generation's own task sends the done frame (finish_reason "cancelled") when the
        # engine confirms; cancelling twice before that is harmless since engine aborts are idempotent.
        await gen.cancel()

    async def _stream(self, cid: str, gen: Any, prompt_tokens: int) -> None:
        """Forward one generation's events as frames; exactly one done frame ends every accepted id."""
        try:
            await self._forward(cid, gen, prompt_tokens)
        finally:
            self._streams.close()

    async def _forward(self, cid: str, gen: Any, prompt_tokens: int) -> None:
        completion = 0
        try:
            # Leaving this block, normally or by cancellation (client gone), closes the request's
            # outbox, which is the engine's signal to abort the request and free its KV blocks.
            async with gen:
                async for ev in gen:
                    if isinstance(ev, TokenEvent):
                        completion += 1
                        frame = token_frame(cid, ev, self._text_of)
                        try:  # with room, no schedule point here: reading the next event is one
                            self._frames.send_nowait(frame)
                        except trio.WouldBlock:
                            await self._frames.send(frame)
                    elif isinstance(ev, FinishEvent):
                        await self._finish(cid, ev)
                        return
            raise RuntimeError("generation ended without a finish event")
        except Exception as exc:
            # An engine bug must not take the other generations on this socket down with it,
            # and the client gets a code, never a traceback.
            log.exception("ws_generation_failed", conn=self.number, id=cid)
            nan = math.nan
            ev = FinishEvent("error", prompt_tokens, completion, Timing(nan, nan, nan, nan),
                             RequestError("internal", f"internal error: {type(exc).__name__}"))
            if cid in self._live:
                await self._finish(cid, ev)

    async def _finish(self, cid: str, ev: FinishEvent) -> None:
        # Free the id before queueing done: a client may reuse it as soon as it reads the frame.
        del self._live[cid]
        if ev.finish_reason == "error":
            err = ev.error
            code = err.code if isinstance(err, RequestError) else "internal"
            message = err.message if isinstance(err, RequestError) else "internal error"
            await self._frames.send(error_frame(cid, code, message))
        await self._frames.send(done_frame(cid, ev))

    async def _write_frames(self) -> None:
        """The only task that writes to the socket, so frames never interleave. Each wake it takes
        every frame queued by now: in batch mode they go in one message (a JSON array), else one
        frame a message, in one socket write where `send_texts` allows."""
        async with self._frames_out:
            async for frame in self._frames_out:
                frames = [frame]
                while frame.get("type") != "_close":
                    try:
                        frame = self._frames_out.receive_nowait()
                    except trio.WouldBlock:
                        break
                    frames.append(frame)
                close = frames.pop() if frames[-1].get("type") == "_close" else None
                self._last_frame = trio.current_time()
                # One write for them all, except where the server takes one message a write.
                writes = [frames] if self.batch or self._send_texts is not None else [[f] for f in frames]
                for write in writes:
                    try:
                        await self._write(write)
                    except Exception as exc:  # the peer is gone: nothing left to stream to
                        log.debug("ws_send_failed", conn=self.number, error=repr(exc))
                        assert self._nursery is not None
                        self._nursery.cancel_scope.cancel()
                        return
                    self._report_sent(write)
                if close is not None:
                    self._close = close.get("code", CLOSE_GOING_AWAY)
                    assert self._nursery is not None
                    self._nursery.cancel_scope.cancel()
                    return

    async def _write(self, frames: list[Frame]) -> None:
        if not frames:
            return
        if self.batch:
            await self._send_text(_json(frames))
        elif len(frames) == 1:
            await self._send_text(_json(frames[0]))
        else:
            assert self._send_texts is not None
            await self._send_texts([_json(f) for f in frames])

    def _report_sent(self, frames: list[Frame]) -> None:
        """Tell the engine each token frame's gap since its stream's previous one, as sent: what
        the client sees, where the engine's own ITL is when the step loop queued the token."""
        now = time.monotonic()
        gaps = []
        for f in frames:
            kind = f.get("type")
            if kind == "token":
                last = self._sent_at.get(f["id"])
                if last is not None:
                    gaps.append(now - last)
                self._sent_at[f["id"]] = now
            elif kind == "done":
                self._sent_at.pop(f["id"], None)
        if gaps:
            self.engine.delivered(gaps)
