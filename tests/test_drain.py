"""Graceful shutdown: new work is refused with `shutting_down`, live generations finish within the
drain timeout or are cut with `shutting_down` then `done`, sockets close with 1001, nothing leaks;
in-process through web.lifecycle.drain, and once as a real process receiving SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
from netutil import count_tasks, ready_url, running_server, wait_until
from trio_websocket import ConnectionClosed, open_websocket_url

from web.config import WebConfig
from web.lifecycle import drain

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60


async def send(ws, **frame) -> None:
    await ws.send_message(json.dumps(frame))


async def recv(ws) -> dict:
    return json.loads(await ws.get_message())


async def frames_until_close(ws) -> tuple[list[dict], int]:
    frames = []
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            frames.append(await recv(ws))
    return frames, closed.value.reason.code


def long_tokens(engine, prompt: str) -> int:
    return engine.max_context - len(engine.encode_prompt(prompt))


async def test_drain_lets_live_generations_finish():
    # No pings: hypercorn keeps a closed socket's handler task until its next ping tick.
    async with running_server(web=WebConfig(ping_interval=None)) as server:
        await trio.testing.wait_all_tasks_blocked()
        baseline = count_tasks()
        with trio.fail_after(TIMEOUT):
            async with open_websocket_url(server.ws) as busy, open_websocket_url(server.ws) as idle:
                # Long enough to still run when the drain starts, short enough to finish within it.
                await send(busy, type="generate", id="s", prompt="Hello", max_tokens=1500, ignore_eos=True)
                assert (await recv(busy))["type"] == "token"
                async with trio.open_nursery() as nursery:
                    cut = []

                    async def run_drain():
                        cut.append(await drain(server.engine, server.lifecycle, 30))
                    nursery.start_soon(run_drain)
                    await wait_until(lambda: server.lifecycle.closing.is_set())
                    await send(busy, type="generate", id="n", prompt="Hello")
                    frames, code = await frames_until_close(busy)
                    idle_frames, idle_code = await frames_until_close(idle)
                by_id = {f["id"]: f for f in frames if f["type"] in ("error", "done")}
                assert by_id["n"]["code"] == "shutting_down"
                assert by_id["s"]["type"] == "done" and by_id["s"]["finish_reason"] == "length"
                assert by_id["s"]["usage"]["completion_tokens"] == 1500
                assert code == idle_code == 1001 and idle_frames == [] and cut == [0]
            assert server.engine.live_requests == 0 and server.kv_all_free()
            await wait_until(lambda: count_tasks() <= baseline)


async def test_drain_cuts_what_outlives_the_timeout():
    async with running_server() as server:
        with trio.fail_after(TIMEOUT):
            async with open_websocket_url(server.ws) as ws:
                await send(ws, type="generate", id="l", prompt="Story", max_tokens=long_tokens(server.engine, "Story"),
                           ignore_eos=True)
                assert (await recv(ws))["type"] == "token"
                async with trio.open_nursery() as nursery:
                    results = []

                    async def run_drain():
                        results.append(await drain(server.engine, server.lifecycle, 0.3))
                    nursery.start_soon(run_drain)
                    frames, code = await frames_until_close(ws)
            ends = [f for f in frames if f["type"] != "token"]
            assert [f["type"] for f in ends] == ["error", "done"], ends
            assert ends[0]["code"] == "shutting_down" and ends[1]["finish_reason"] == "error"
            assert code == 1001 and results == [1]
            assert server.engine.live_requests == 0 and server.kv_all_free()


async def test_engine_refuses_after_stop_accepting():
    from streamer.types import RequestError, SamplingParams

    async with running_server() as server:
        engine = server.engine
        gen = engine.generate("Hi", SamplingParams(max_tokens=3))
        engine.stop_accepting()
        with pytest.raises(RequestError) as refused:
            engine.generate("Hi")
        assert refused.value.code == "shutting_down"
        with trio.fail_after(TIMEOUT):
            async with gen:
                events = [ev async for ev in gen]
            await engine.wait_drained()
        assert events[-1].finish_reason == "length"


async def test_sigterm_drains_then_exits_0():
    command = [sys.executable, "-m", "streamer", "serve", "--model", "random:tiny-qwen3", "--port", "0",
               "--kv-memory", "0.05", "--drain-timeout", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with trio.fail_after(TIMEOUT):
        proc = await trio.lowlevel.open_process(command, cwd=ROOT, env=env, stdout=subprocess.PIPE)
        try:
            url = await ready_url(proc)
            ws_url = url.replace("http://", "ws://").rstrip("/") + "/v1/stream"
            async with open_websocket_url(ws_url) as ws:
                await send(ws, type="generate", id="short", prompt="Hi", max_tokens=8, ignore_eos=True)
                await send(ws, type="generate", id="long", prompt="Hi", max_tokens=100_000, ignore_eos=True)
                while (await recv(ws))["id"] != "long":
                    pass
                proc.send_signal(signal.SIGTERM)
                frames, code = await frames_until_close(ws)

            async def drain_stdout():  # keep the pipe from filling while the process exits
                while await proc.stdout.receive_some():
                    pass
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain_stdout)
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    ends = {(f["id"], f["type"]): f for f in frames if f["type"] != "token"}
    assert ends[("short", "done")]["finish_reason"] == "length"
    assert ends[("long", "error")]["code"] == "shutting_down"
    assert ends[("long", "done")]["finish_reason"] == "error"
    assert code == 1001
