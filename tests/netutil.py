"""Helpers for tests that drive a real server on 127.0.0.1 port 0: start one, raw HTTP, task counts."""

from __future__ import annotations

import json
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from streamer.config import EngineConfig
from streamer.engine import open_engine
from web.config import WebConfig
from web.lifecycle import Lifecycle
from web.server import serve

TINY = EngineConfig(model="random:tiny-qwen3", kv_memory=0.05, max_batch_tokens=256, max_running=16, max_waiting=64)


@dataclass
class Running:
    engine: object
    lifecycle: Lifecycle
    http: str

    @property
    def ws(self) -> str:
        return self.http.replace("http://", "ws://") + "/v1/stream"

    @property
    def hostport(self) -> str:
        return self.http.removeprefix("http://")

    def kv_all_free(self) -> bool:
        kv = self.engine.kv_statistics()
        return kv.free_blocks == kv.total_blocks


@asynccontextmanager
async def running_server(config: EngineConfig = TINY, web: WebConfig | None = None):
    async with open_engine(config) as engine, trio.open_nursery() as nursery:
        lifecycle = Lifecycle()
        binds = await nursery.start(lambda task_status: serve(engine, "127.0.0.1", 0, config=web,
                                                              lifecycle=lifecycle, task_status=task_status))
        yield Running(engine, lifecycle, binds[0])
        nursery.cancel_scope.cancel()


async def http(url: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
               ) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request over a fresh connection, so the tests need no HTTP client library."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
             f"Content-Length: {len(body)}"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = await stream.receive_some()
            assert chunk, f"connection closed before a response: {raw!r}"
            raw += chunk
        head, _, rest = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        out = {k.lower(): v for k, v in (line.split(": ", 1) for line in header_lines)}
        length = int(out.get("content-length", 0))
        while len(rest) < length:
            chunk = await stream.receive_some()
            if not chunk:
                break
            rest += chunk
    return int(status_line.split()[1]), out, rest


def json_body(body: bytes) -> dict:
    return json.loads(body.decode())


def count_tasks() -> int:
    """Tasks alive in this trio run, found by walking the task tree from the root; trio's own
    system tasks (named "<...>", such as the one it starts lazily for run_sync_soon) do not count."""
    return sum(not name.startswith("<") for name in task_names())


async def wait_until(predicate, interval: float = 0.02) -> None:
    while not predicate():
        await trio.sleep(interval)


def task_names() -> list[str]:
    stack, names = [trio.lowlevel.current_root_task()], []
    while stack:
        task = stack.pop()
        names.append(task.name)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return names


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame (clients must mask), for tests that speak websocket by hand."""
    mask = b"\x01\x02\x03\x04"
    n = len(payload)
    size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big") if n < 65536 \
        else bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return bytes([0x80 | opcode]) + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def raw_websocket(hostport: str, path: str = "/v1/stream") -> tuple[trio.SocketStream, bytes]:
    """A websocket opened by hand over TCP; returns the stream and any bytes after the handshake."""
    host, port = hostport.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(
        f"GET {path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = await stream.receive_some()
        assert chunk, raw
        raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return stream, rest


def open_fds() -> int | None:
    """File descriptors this process holds (Linux), or None where /proc is missing."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return None


async def ready_url(proc: trio.Process) -> str:
    """Read a `python -m streamer serve` child's stdout (a pipe, so JSON log lines) until its
    ready line, and return the URL it announces."""
    buffered = b""
    while b"Streamer ready" not in buffered:
        chunk = await proc.stdout.receive_some()
        assert chunk, f"exited early: {buffered.decode(errors='replace')}"
        buffered += chunk
    return json.loads(next(ln for ln in buffered.decode().splitlines() if "Streamer ready" in ln))["url"]
