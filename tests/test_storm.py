"""Crowds on loopback: 200 clients that drop mid-stream at once, and a 1,000-client soak (small
enough for CI); afterwards no request is live, every KV block is free, and no task or socket is left.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio
import trio.testing
from netutil import count_tasks, masked_frame, open_fds, raw_websocket, rss_mib, running_server, wait_until
from trio_websocket import open_websocket_url

from streamer.config import EngineConfig
from web.config import WebConfig

ROOT = Path(__file__).resolve().parent.parent
CROWD = EngineConfig(model="random:tiny-qwen3", kv_memory=0.05, max_batch_tokens=1024, max_running=256,
                     max_waiting=1024)
# No pings: hypercorn keeps a closed socket's handler task until its next ping tick, and
# trio-websocket clients can fail answering a ping while they close.
WEB = WebConfig(ping_interval=None)


async def settled(server, baseline_tasks: int, baseline_fds: int | None) -> None:
    """Everything the clients started is gone: requests, KV blocks, sockets, tasks, descriptors."""
    await wait_until(lambda: server.engine.live_requests == 0 and server.kv_all_free())
    await wait_until(lambda: server.lifecycle.sockets.value == 0)
    await wait_until(lambda: count_tasks() <= baseline_tasks, 0.1)
    if baseline_fds is not None:
        await wait_until(lambda: open_fds() <= baseline_fds, 0.1)


async def test_disconnect_storm():
    n = 200
    async with running_server(CROWD, WEB) as server:
        await trio.testing.wait_all_tasks_blocked()  # the server's own tasks have all started
        baseline_tasks, baseline_fds = count_tasks(), open_fds()
        streaming = trio.Semaphore(0)  # released once per client that got a token
        leave = trio.Event()
        long = server.engine.max_context - 8

        async def graceful(i: int) -> None:  # a websocket close handshake
            # A queue deep enough for every token: trio-websocket's reader must keep reading to see
            # the server's close reply, and it blocks on a full queue (the default holds one message).
            async with open_websocket_url(server.ws, message_queue_size=4096) as ws:
                await ws.send_message(json.dumps({"type": "generate", "id": f"g{i}", "prompt": "Tell me",
                                                  "max_tokens": long, "ignore_eos": True}))
                await ws.get_message()
                streaming.release()
                await leave.wait()

        async def abrupt(i: int) -> None:  # the TCP connection just closes, no close frame
            stream, _ = await raw_websocket(server.hostport)
            generate = json.dumps({"type": "generate", "id": f"a{i}", "prompt": "Tell me", "max_tokens": long,
                                   "ignore_eos": True})
            await stream.send_all(masked_frame(0x1, generate.encode()))
            while b'"token"' not in await stream.receive_some():
                pass
            streaming.release()
            await leave.wait()
            await stream.aclose()

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i in range(n // 2):
                    nursery.start_soon(graceful, i)
                    nursery.start_soon(abrupt, i)
                for _ in range(n):
                    await streaming.acquire()
                assert server.engine.live_requests == n
                assert server.engine.kv_statistics().used_blocks > 0
                leave.set()  # all at once
            await settled(server, baseline_tasks, baseline_fds)


async def test_soak_1000_clients():
    """1,000 clients at once, from tools/soak.py in a process of its own (so they do not share this
    event loop and GIL with the server); each request ends in done or an explicit error."""
    async with running_server(CROWD, WEB) as server:
        await trio.testing.wait_all_tasks_blocked()
        baseline_tasks, baseline_fds, rss_before = count_tasks(), open_fds(), rss_mib()
        command = [sys.executable, str(ROOT / "tools" / "soak.py"), "--url", server.ws, "--clients", "1000",
                   "--requests", "1", "--max-tokens", "8", "--limit", "100"]
        with trio.fail_after(120):
            done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
            assert done.returncode == 0, done.stderr.decode()[-2000:]
            summary = json.loads(done.stdout)
            await settled(server, baseline_tasks, baseline_fds)
        rss_after = rss_mib()
    outcomes = summary["outcomes"]
    assert not summary["timed_out"], summary
    assert outcomes["requests"] == 1000, summary
    ended = {k: v for k, v in outcomes.items() if k.startswith(("done:", "error:"))}
    assert sum(ended.values()) + outcomes.get("dropped_mid_stream", 0) == 1000, summary
    assert set(ended) <= {"done:length", "done:cancelled", "error:overloaded"}, summary
    if rss_before is not None:
        # The server alone is in this process: a leak of even 100 KiB per client would show.
        assert rss_after - rss_before < 100, (rss_before, rss_after)
