"""`streamer serve` as processes: a supervisor, the engine core and front ends on one port, started
as a user starts them, with real sockets; what clients see when a process dies or the server stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from netutil import http, ready_url
from trio_websocket import ConnectionClosed, open_websocket_url

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 90


@asynccontextmanager
async def server_process(*flags: str):
    """(process, base URL) of `python -m streamer serve` on port 0; stdout is drained meanwhile."""
    command = [sys.executable, "-m", "streamer", "serve", "--model", "random:tiny-qwen3", "--port", "0",
               "--kv-memory", "0.05", *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await trio.lowlevel.open_process(command, cwd=ROOT, env=env, stdout=subprocess.PIPE)
    try:
        url = (await ready_url(proc)).rstrip("/")
        async with trio.open_nursery() as nursery:
            async def drain_stdout():
                while await proc.stdout.receive_some():
                    pass
            nursery.start_soon(drain_stdout)
            yield proc, url
            nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(20) as stopping:
                stopping.shield = True
                async def drain_stdout():
                    while await proc.stdout.receive_some():
                        pass
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(drain_stdout)
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def get_json(url: str, path: str) -> tuple[int, dict]:
    status, _, body = await http(url, "GET", path)
    return status, json.loads(body)


async def processes(url: str) -> dict:
    return (await get_json(url, "/stats"))[1]["processes"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead, just not reaped by its (dead or busy) parent yet
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def stream(ws_url: str, rid: str, max_tokens: int, record: dict) -> None:
    """One chat user: a websocket of its own, one generation, every frame recorded."""
    frames = record.setdefault(rid, [])
    try:
        async with open_websocket_url(ws_url) as ws:
            await ws.send_message(json.dumps({"type": "generate", "id": rid, "prompt": f"hello {rid}",
                                              "max_tokens": max_tokens, "ignore_eos": True}))
            while True:
                frame = json.loads(await ws.get_message())
                frames.append(frame)
                if frame["type"] == "done":
                    return
    except ConnectionClosed as exc:
        frames.append({"type": "closed", "code": exc.reason.code})


async def until(predicate, what: str, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.1)


async def test_two_front_ends_share_one_engine_and_its_figures():
    with trio.fail_after(TIMEOUT):
        async with server_process("--frontends", "2") as (_, url):
            await until(lambda: _count_frontends(url, 2), "both front ends joined")
            ws_url = url.replace("http://", "ws://") + "/v1/stream"
            record: dict = {}
            async with trio.open_nursery() as nursery:
                for i in range(12):
                    nursery.start_soon(stream, ws_url, f"u{i}", 16, record)
            assert all(f[-1]["type"] == "done" and f[-1]["finish_reason"] == "length" for f in record.values())
            assert all(sum(x["type"] == "token" for x in f) == 16 for f in record.values())
            # Every front end answers for the whole server: both count all 12 requests.
            seen: dict[int, int] = {}
            for _ in range(200):
                status, stats = await get_json(url, "/stats")
                assert status == 200
                seen[stats["answered_by"]["pid"]] = stats["requests_finished"]
                if len(seen) == 2:
                    break
            assert len(seen) == 2 and set(seen.values()) == {12}, seen
            status, _, body = await http(url, "GET", "/metrics")
            assert status == 200 and 'streamer_requests_total{finish_reason="length"} 12.0' in body.decode()
            status, health = await get_json(url, "/healthz")
            assert status == 200 and health["kv"]["free_blocks"] == health["kv"]["total_blocks"]


async def _count_frontends(url: str, n: int) -> bool:
    return len((await processes(url))["frontends"]) == n


async def test_a_killed_front_end_loses_only_its_streams_and_comes_back():
    with trio.fail_after(TIMEOUT):
        async with server_process("--frontends", "2") as (_, url):
            await until(lambda: _count_frontends(url, 2), "both front ends joined")
            ws_url = url.replace("http://", "ws://") + "/v1/stream"
            record: dict = {}
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(stream, ws_url, f"u{i}", 4000, record)
                    await trio.sleep(0.05)  # as users arrive: spread over both front ends' accepts

                async def both_busy() -> bool:
                    fes = (await processes(url))["frontends"]
                    return len(fes) == 2 and all((f["live"] or 0) > 0 for f in fes)
                await until(both_busy, "streams on both front ends")
                before = (await processes(url))["frontends"]
                victim = before[0]["pid"]
                os.kill(victim, signal.SIGKILL)

                async def replaced() -> bool:
                    pids = [f["pid"] for f in (await processes(url))["frontends"]]
                    return len(pids) == 2 and victim not in pids
                await until(replaced, "the supervisor started it again")
                now = {f["pid"]: f for f in (await processes(url))["frontends"]}
                assert now[before[1]["pid"]]["live"] > 0  # the survivor's streams go on
                nursery.cancel_scope.cancel()  # enough: the survivors' streams were still live
            lost = [rid for rid, f in record.items() if f and f[-1]["type"] == "closed"]
            assert lost and len(lost) < 8, record.keys()

            async def kv_back() -> bool:
                status, health = await get_json(url, "/healthz")
                return status == 200 and health["kv"]["free_blocks"] == health["kv"]["total_blocks"]
            await until(kv_back, "KV back to total")


async def test_sigterm_drains_every_front_end_and_leaves_no_process():
    with trio.fail_after(TIMEOUT):
        async with server_process("--frontends", "2", "--drain-timeout", "20") as (proc, url):
            await until(lambda: _count_frontends(url, 2), "both front ends joined")
            procs = await processes(url)
            pids = [procs["core"]["pid"], *(f["pid"] for f in procs["frontends"])]
            ws_url = url.replace("http://", "ws://") + "/v1/stream"
            record: dict = {}
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(stream, ws_url, f"u{i}", 40, record)
                await until(lambda: _live(url), "streams live")
                proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    assert all(f[-1]["type"] == "done" and f[-1]["finish_reason"] == "length" for f in record.values()), record
    assert not any(alive(pid) for pid in pids)


async def _live(url: str) -> bool:
    return (await get_json(url, "/stats"))[1]["running"] > 0


async def test_when_the_core_dies_streams_end_unavailable_and_the_server_exits_1():
    with trio.fail_after(TIMEOUT):
        async with server_process("--frontends", "1") as (proc, url):
            procs = await processes(url)
            fe_pid = procs["frontends"][0]["pid"]
            ws_url = url.replace("http://", "ws://") + "/v1/stream"
            record: dict = {}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream, ws_url, "u", 100_000, record)
                await until(lambda: _live(url), "the stream is live")
                os.kill(procs["core"]["pid"], signal.SIGKILL)
            assert await proc.wait() == 1
    frames = record["u"]
    errors = [f for f in frames if f["type"] == "error"]
    assert errors and errors[0]["code"] == "unavailable", frames[-3:]
    assert frames[-1]["type"] in ("done", "closed")
    assert not alive(fe_pid)


async def test_children_stop_when_the_supervisor_is_killed():
    with trio.fail_after(TIMEOUT):
        async with server_process("--frontends", "1") as (proc, url):
            procs = await processes(url)
            pids = [procs["core"]["pid"], procs["frontends"][0]["pid"]]
            proc.kill()
            await proc.wait()
            await until(lambda: _none_alive(pids), "children gone", timeout=30)


async def _none_alive(pids: list[int]) -> bool:
    return not any(alive(pid) for pid in pids)


def test_a_busy_port_fails_at_once_in_one_line():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "streamer", "serve", "--model", "random:tiny-qwen3",
                                 "--port", str(port), "--frontends", "1"], cwd=ROOT, capture_output=True,
                                text=True, timeout=30)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "address already in use" in result.stderr.strip().splitlines()[-1].lower()


async def test_each_finished_request_logs_one_json_line_with_its_figures():
    """Off a TTY every line is JSON: the engine's canonical line per request, and the stdlib's too."""
    command = [sys.executable, "-m", "streamer", "serve", "--model", "random:tiny-qwen3", "--port", "0",
               "--kv-memory", "0.05", "--frontends", "0"]
    proc = await trio.lowlevel.open_process(command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                            stdout=subprocess.PIPE)
    try:
        with trio.fail_after(TIMEOUT):
            url = (await ready_url(proc)).rstrip("/")
            record: dict = {}
            await stream(url.replace("http://", "ws://") + "/v1/stream", "u", 5, record)
            buffered = b""
            while b'"request_finished"' not in buffered:
                buffered += await proc.stdout.receive_some()
            proc.send_signal(signal.SIGTERM)
            while chunk := await proc.stdout.receive_some():
                buffered += chunk
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
    lines = [json.loads(line) for line in buffered.decode().splitlines() if line.strip()]  # every line parses
    [done] = [line for line in lines if line["event"] == "request_finished"]
    assert done["completion_tokens"] == 5 and done["finish_reason"] == "length" and done["ttft_ms"] > 0
    assert done["level"] == "info" and done["logger"] == "streamer" and done["timestamp"].endswith("Z")
    assert any(line["event"] == "shutting_down" and line["signal"] == "SIGTERM" for line in lines)
