"""Hostile input, property-based: random websocket frames and HTTP bodies against a real server.
Every frame gets an answer with a documented code (or a documented close), nothing crashes, and
after each example no generation is live and every KV block is free.

The server runs in its own thread and trio run for the whole module (one engine load); each
hypothesis example is a fresh client in a fresh trio run.
"""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netutil import count_tasks, http, running_server
from trio_websocket import ConnectionClosed, open_websocket_url

from web.config import WebConfig
from web.protocol import GENERATE_FIELDS

MAX_FRAME = 16 * 1024
# No pings: hypercorn keeps a closed socket's handler task until its next ping tick, and
# trio-websocket clients can fail answering a ping while they close.
WEB = WebConfig(max_frame_bytes=MAX_FRAME, max_tokens=64, ping_interval=None)
# Every code a websocket error frame may carry (docs/PROTOCOL.md).
WS_CODES = {"invalid_json", "unknown_type", "invalid_request", "duplicate_id", "unknown_id", "prompt_too_long",
            "overloaded", "shutting_down", "internal", "slow_consumer"}
HTTP_STATUSES = {200, 400, 404, 405, 413, 429}
EXAMPLE = settings(max_examples=100, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TIMEOUT = 20


class ThreadedServer:
    """A server in a thread of its own, driven from sync tests through its trio token."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        assert self._ready.wait(120), "the server did not start"

    async def _main(self) -> None:
        async with running_server(web=WEB) as running:
            self.running = running
            self.token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            await trio.testing.wait_all_tasks_blocked()  # the server's own tasks have all started
            self.baseline_tasks = count_tasks()
            self._ready.set()
            await self._stop.wait()

    def call(self, fn):
        return trio.from_thread.run_sync(fn, trio_token=self.token)

    def clean(self) -> tuple[int, int, int]:
        """(live requests, used KV blocks, tasks above the baseline), read on the server's thread."""
        def snapshot():
            kv = self.running.engine.kv_statistics()
            return self.running.engine.live_requests, kv.used_blocks, max(0, count_tasks() - self.baseline_tasks)
        return self.call(snapshot)

    def assert_clean(self, tasks: bool = False) -> None:
        """Aborts reach the step loop asynchronously (and sockets close so): allow a moment."""
        n = 3 if tasks else 2
        deadline = time.monotonic() + 10
        while any(self.clean()[:n]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.clean()[:n] == (0,) * n

    def stop(self) -> None:
        self.call(self._stop.set)
        self._thread.join(30)


@pytest.fixture(scope="module")
def server():
    srv = ThreadedServer()
    yield srv
    # After every example and every socket closed, the task tree is back where it started.
    srv.assert_clean(tasks=True)
    srv.stop()


# --- strategies ----------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.sampled_from([0, 1, -1, 2**63, 1e308, "", "generate", "cancel", "user", "\x00", "\ud7ff"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
field_values = {
    "id": st.text(min_size=1, max_size=8) | json_values,
    "prompt": st.text(min_size=1, max_size=40) | json_values,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                                "content": st.text(max_size=30)}), max_size=3) | json_values,
    "max_tokens": st.integers(min_value=-2, max_value=100) | json_values,
    "temperature": st.floats(allow_nan=True, allow_infinity=True) | json_values,
    "top_p": st.floats(allow_nan=True) | json_values,
    "top_k": st.integers(min_value=-5, max_value=400) | json_values,
    "seed": st.integers(min_value=-5, max_value=2**64) | json_values,
    "stop": st.lists(st.text(max_size=5), max_size=20) | json_values,
    "ignore_eos": st.booleans() | json_values,
    "priority": st.integers(min_value=-12, max_value=12) | json_values,
}


@st.composite
def generate_frames(draw) -> dict:
    """Mostly plausible generate frames, each field sometimes of the wrong type, or unknown."""
    frame = {"type": draw(st.sampled_from(["generate"] * 6 + ["cancel", "Generate", ""]))}
    names = draw(st.sets(st.sampled_from(sorted(GENERATE_FIELDS - {"type"}) + ["max_token", "extra"]), max_size=6))
    for name in ["id", "prompt", *sorted(names)]:
        frame[name] = draw(field_values.get(name, json_values))
    return frame


def encode(obj) -> str:
    return json.dumps(obj, allow_nan=True)  # NaN and Infinity go out as the non-JSON literals


texts = st.one_of(
    generate_frames().map(encode),
    json_values.map(encode),
    st.text(max_size=200),
    st.integers(min_value=1, max_value=3000).map(lambda n: "[" * n + "]" * n),  # deep nesting
    st.integers(min_value=1, max_value=3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(min_value=MAX_FRAME - 64, max_value=MAX_FRAME * 2).map(
        lambda n: encode({"type": "generate", "id": "big", "prompt": "x" * n})),  # around the frame limit
    st.sampled_from(["1e999999", "-0", "NaN", "[1e400]", '{"type":"generate","id":"n","prompt":"a","temperature":NaN}',
                     '{"type":"generate","id":"n","prompt":"a","max_tokens":' + "9" * 5000 + "}"]),
)
frames = st.one_of(texts, st.binary(max_size=100))


# --- websocket -----------------------------------------------------------------------------------


async def exchange(url: str, sent: list[str | bytes]) -> list[str]:
    """Send each frame, wait for its outcome; returns what happened, one word per frame."""
    outcomes = []
    async with open_websocket_url(url) as ws:
        for frame in sent:
            try:
                await ws.send_message(frame)
                outcomes.append(await outcome(ws, frame))
            except ConnectionClosed as closed:
                # The one close a frame may cause: too big for --max-frame-bytes.
                size = len(frame.encode() if isinstance(frame, str) else frame)
                assert closed.reason.code == 1009 and size > MAX_FRAME, (closed.reason, size)
                outcomes.append("closed")
                break
    return outcomes


async def outcome(ws, frame: str | bytes) -> str:
    reply = json.loads(await ws.get_message())
    check_reply(reply)
    if reply["type"] == "error":
        return "error"
    # A generation started: cancel it and read to its done; then sync on a cancel of an unknown id,
    # so a cancel that crossed the done frame (answered unknown_id) is consumed too.
    rid = reply["id"]
    await ws.send_message(json.dumps({"type": "cancel", "id": rid}))
    while reply["type"] != "done":
        reply = json.loads(await ws.get_message())
        check_reply(reply)
        assert reply["id"] == rid, reply
    await ws.send_message(json.dumps({"type": "cancel", "id": "__sync__"}))
    while (reply := json.loads(await ws.get_message()))["id"] != "__sync__":
        assert (reply["id"], reply["type"], reply.get("code")) == (rid, "error", "unknown_id"), reply
    assert reply["code"] == "unknown_id"
    return "generated"


def check_reply(reply: dict) -> None:
    assert reply["type"] in ("token", "done", "error"), reply
    if reply["type"] == "error":
        assert reply["code"] in WS_CODES, reply
        assert isinstance(reply["message"], str) and "Traceback" not in reply["message"]


@EXAMPLE
@given(sent=st.lists(frames, min_size=1, max_size=3))
def test_websocket_frames(server, sent):
    trio.run(_with_timeout, exchange, server.running.ws, sent)
    server.assert_clean()


async def _with_timeout(fn, *args):
    with trio.fail_after(TIMEOUT):
        return await fn(*args)


# --- HTTP ----------------------------------------------------------------------------------------


@st.composite
def openai_bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["chat", "completion", "wild", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200) | st.just(b'{"model": "\xff\xfe"}'))
    if kind == "wild":
        return encode(draw(json_values)).encode()
    body = {"model": draw(st.sampled_from(["random:tiny-qwen3", "gpt-4", ""]) | json_values),
            "max_tokens": draw(st.integers(min_value=-1, max_value=8) | json_values),
            "stream": draw(st.booleans() | json_values)}
    if kind == "chat":
        body["messages"] = draw(field_values["messages"])
    else:
        body["prompt"] = draw(st.text(max_size=30) | st.lists(st.integers(min_value=-1, max_value=400), max_size=5)
                              | json_values)
    for name in draw(st.sets(st.sampled_from(["temperature", "top_p", "seed", "stop", "n", "logprobs", "zzz"]),
                             max_size=3)):
        body[name] = draw(json_values)
    return encode(body).encode()


@EXAMPLE
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/healthz", "/v1/stream"]),
       body=openai_bodies())
def test_http_bodies(server, path, body):
    status, headers, reply = trio.run(_with_timeout, http, server.running.http, "POST", path, body,
                                      {"Content-Type": "application/json"})
    assert status in HTTP_STATUSES, (status, reply[:300])
    assert b"Traceback" not in reply
    if status != 200:
        error = json.loads(reply)["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str)
    server.assert_clean()


def test_nan_is_refused_not_propagated():
    """A sanity check of the strategy's NaN literal: Python's json reads it, the edge refuses it."""
    from web.protocol import ProtocolError, parse_frame

    with pytest.raises(ProtocolError) as refused:
        parse_frame('{"type":"generate","id":"n","prompt":"a","temperature":NaN}')
    assert refused.value.code == "invalid_request" and math.isnan(json.loads("NaN"))
