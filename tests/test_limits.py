"""Limits at the web edge, each with its stable code: live generations per socket, prompt tokens,
max_tokens, frame size (close 1009), invalid UTF-8 (connection dropped), and the idle timeout (close 4408).
"""

from __future__ import annotations

import json

import pytest
import trio
from netutil import masked_frame, raw_websocket, running_server, wait_until
from trio_websocket import ConnectionClosed, open_websocket_url

from streamer.types import FinishEvent, Timing, TokenEvent
from tests.conftest import FakeGeneration
from web.config import WebConfig
from web.ws import Connection

TIMEOUT = 30
LIMITS = WebConfig(max_live_per_connection=2, max_prompt_tokens=16, max_tokens=40, max_frame_bytes=64 * 1024)


async def send(ws, **frame) -> None:
    await ws.send_message(json.dumps(frame))


async def recv(ws) -> dict:
    return json.loads(await ws.get_message())


async def error_for(ws, **frame) -> dict:
    """Send one generate that must be refused; skip other ids' frames until its error."""
    await send(ws, type="generate", **frame)
    while (reply := await recv(ws))["id"] != frame["id"]:
        pass
    assert reply["type"] == "error", reply
    return reply


@pytest.fixture
async def server():
    async with running_server(web=LIMITS) as running:
        yield running


async def test_limits_answer_their_codes(server):
    with trio.fail_after(TIMEOUT):
        async with open_websocket_url(server.ws) as ws:
            for rid in ("a", "b"):
                await send(ws, type="generate", id=rid, prompt="Go on", max_tokens=40, ignore_eos=True)
            third = await error_for(ws, id="c", prompt="Go on")
            assert third["code"] == "overloaded" and "2 live" in third["message"]
            too_many = await error_for(ws, id="d", prompt="Hi", max_tokens=41)
            assert too_many["code"] == "invalid_request" and "40" in too_many["message"]
            for rid in ("a", "b"):
                await send(ws, type="cancel", id=rid)
            done = set()
            while len(done) < 2:
                frame = await recv(ws)
                if frame["type"] == "done":
                    done.add(frame["id"])
            long_prompt = "word " * 40
            assert len(server.engine.encode_prompt(long_prompt)) > 16
            refused = await error_for(ws, id="e", prompt=long_prompt)
            assert refused["code"] == "prompt_too_long" and "16" in refused["message"]
            # Without max_tokens the default (256) is lowered to the server's cap instead of refused.
            await send(ws, type="generate", id="f", prompt="Hi", ignore_eos=True)
            frames = []
            while (frame := await recv(ws))["type"] != "done":
                frames.append(frame)
            assert frame["finish_reason"] == "length" and len(frames) == 40
        await wait_until(server.kv_all_free)


async def test_oversized_frame_closes_1009(server):
    with trio.fail_after(TIMEOUT):
        async with open_websocket_url(server.ws) as ws:
            await ws.send_message("x" * (64 * 1024 + 1))
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    assert closed.value.reason.code == 1009
    # The server lives on.
    with trio.fail_after(TIMEOUT):
        async with open_websocket_url(server.ws) as ws:
            await send(ws, type="generate", id="ok", prompt="Hi", max_tokens=2)
            while (await recv(ws))["type"] != "done":
                pass


async def test_invalid_utf8_text_frame_drops_the_connection(server):
    """A text frame must be UTF-8 (RFC 6455); no client library sends a bad one, so we hand-craft it.
    hypercorn drops the TCP connection without a close frame (clients report 1006); the server lives on."""
    with trio.fail_after(TIMEOUT):
        stream, raw = await raw_websocket(server.hostport)
        async with stream:
            await stream.send_all(masked_frame(0x1, b'{"type": "\xff\xfe"}'))
            try:
                while chunk := await stream.receive_some():
                    raw += chunk
            except trio.BrokenResourceError:  # a reset is a drop too
                pass
    while raw[:2] == b"\x89\x00":  # the server's first ping
        raw = raw[2:]
    # Nothing came back but, at most, a close frame with 1007 (should hypercorn start sending one).
    assert raw == b"" or (raw[0] & 0x0F == 0x8 and int.from_bytes(raw[2:4], "big") == 1007), raw
    with trio.fail_after(TIMEOUT):
        async with open_websocket_url(server.ws) as ws:
            await send(ws, type="generate", id="ok", prompt="Hi", max_tokens=2)
            while (await recv(ws))["type"] != "done":
                pass


# --- the idle timeout, on virtual time -----------------------------------------------------------


class SlowGeneration(FakeGeneration):
    """Finishes after `delay` virtual seconds, without tokens."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def _events(self):
        await trio.sleep(self.delay)
        yield FinishEvent("length", 1, 0, Timing(0, 0, 0, 0))


class SlowEngine:
    def encode_prompt(self, text: str) -> list[int]:
        return [1]

    def submit(self, ids, params, request_id, **scheduling):
        return SlowGeneration(1000.0)

    def count_error(self, code):
        pass

    def delivered(self, gaps):  # sent-frame gaps the connection reports
        pass


async def serve_fake(config: WebConfig, frames_in: list[str]) -> tuple[tuple[int, str] | None, float, list[dict]]:
    """Run a Connection on memory channels; returns its close, the virtual time it took, its frames."""
    to_server, from_client = trio.open_memory_channel(8)
    sent: list[dict] = []

    async def send_text(text: str) -> None:
        sent.append(json.loads(text))

    start = trio.current_time()
    for frame in frames_in:
        to_server.send_nowait(frame)
    close = await Connection(SlowEngine(), send_text, config).run(from_client.receive)
    return close, trio.current_time() - start, sent


async def test_idle_socket_is_closed_4408(autojump_clock):
    close, took, _ = await serve_fake(WebConfig(idle_timeout=300), [])
    assert close == (4408, "idle timeout") and took == pytest.approx(300)


async def test_a_live_generation_is_not_idleness(autojump_clock):
    generate = json.dumps({"type": "generate", "id": "g", "prompt": "x"})
    close, took, sent = await serve_fake(WebConfig(idle_timeout=300), [generate])
    assert [f["type"] for f in sent] == ["done"]
    # Idle from the done frame on (t=1000), not from the generate frame.
    assert close[0] == 4408 and took == pytest.approx(1300)


async def test_no_idle_timeout_when_off(autojump_clock):
    with trio.move_on_after(10_000) as scope:
        await serve_fake(WebConfig(idle_timeout=None), [])
    assert scope.cancelled_caught


# --- a stalled client: bounded frames, only its own generations wait ---------------------------


class EndlessGeneration(FakeGeneration):
    """Yields tokens as fast as they are read, counting them in `yielded[request_id]`."""

    def __init__(self, yielded: dict[str, int], request_id: str) -> None:
        self.yielded, self.request_id = yielded, request_id

    async def _events(self):
        for i in range(10_000):
            self.yielded[self.request_id] = i + 1
            yield TokenEvent(i, 7, "x")
            await trio.lowlevel.checkpoint()


class EndlessEngine:
    def __init__(self) -> None:
        self.yielded: dict[str, int] = {}  # tokens each generation yielded

    def encode_prompt(self, text: str) -> list[int]:
        return [1]

    def submit(self, ids, params, request_id, **scheduling):
        return EndlessGeneration(self.yielded, request_id)

    def count_error(self, code):
        pass

    def delivered(self, gaps):  # sent-frame gaps the connection reports
        pass


async def test_a_stalled_client_holds_a_bounded_number_of_frames():
    """The client reads nothing: the socket's generations stop being read once the frame buffer
    (2 frames a live generation the socket may hold) is full, instead of queueing without end."""
    engine = EndlessEngine()
    config = WebConfig(max_live_per_connection=2, idle_timeout=None)
    to_server, from_client = trio.open_memory_channel(8)

    async def stalled_send(text: str) -> None:
        await trio.sleep_forever()

    for i in range(2):
        to_server.send_nowait(json.dumps({"type": "generate", "id": f"g{i}", "prompt": "x"}))
    with trio.move_on_after(1):
        await Connection(engine, stalled_send, config).run(from_client.receive)
    # In the writer's hands: what was queued when it woke, at most the buffer (4 frames) and one
    # frame a blocked generation moved in; then the buffer again, and one frame a generation waiting.
    assert sum(engine.yielded.values()) <= (2 * 2 + 2) + 2 * 2 + 2
    assert len(engine.yielded) == 2
