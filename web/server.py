"""Serve the app with hypercorn from the caller's nursery (never from the framework's lifespan).

`serve` is started by streamer/__main__.py and by tests with `await nursery.start(serve, ...)`,
which returns the bound URLs once the socket listens.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import hypercorn.trio
import trio
from hypercorn.config import Config
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio.tcp_server import TCPServer

from streamer.handle import EngineHandle
from web.app import create_app
from web.config import WebConfig
from web.lifecycle import Lifecycle


def _guard_pings() -> None:
    """hypercorn 0.18 bug: a websocket's ping task can send while the connection's close runs
    send_eof; trio raises BusyResourceError, which escapes the connection's task group and stops the
    whole server. A client could time a bad frame to hit it (tests/test_limits.py found it), so the
    ping task ends quietly instead: the connection is closing anyway."""
    if getattr(WSStream._send_pings, "_guarded", False):
        return
    send_pings = WSStream._send_pings

    async def guarded(self) -> None:
        try:
            await send_pings(self)
        except (trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    guarded._guarded = True
    WSStream._send_pings = guarded


_guard_pings()


def _shield_close() -> None:
    """hypercorn 0.18 on trio: after an answer with `Connection: close` (any HTTP/1.0 answer too)
    the connection's close runs in quart-trio's request task, whose scope is cancelled by then, so
    `send_eof` raises Cancelled and the socket stays open until the client hangs up (a descriptor
    any client can pin); a server cancelled on shutdown leaves its connections so too (hypercorn
    issue 106). Shutting down and closing a plain socket never blocks, so the close runs shielded."""
    if getattr(TCPServer._close, "_shielded", False):
        return
    close = TCPServer._close

    async def shielded(self) -> None:
        with trio.CancelScope(shield=True):
            await close(self)

    shielded._shielded = True
    TCPServer._close = shielded


_shield_close()


def hypercorn_config(host: str, port: int, web: WebConfig | None = None, fd: int | None = None) -> Config:
    web = web or WebConfig()
    config = Config()
    if fd is not None:  # a socket the supervisor bound and shares among the front ends
        config.bind = [f"fd://{fd}"]
    else:  # IPv6 literals need brackets in a bind string.
        config.bind = [f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"]
    # Route hypercorn's messages through the root logger that streamer.logging configured.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = None
    # Chats are long-lived websockets: on shutdown, wait briefly for them, then cancel.
    config.graceful_timeout = 2.0
    # A prompt is at most a few hundred KiB of text; the default 16 MiB invites memory abuse.
    # hypercorn's default listen backlog (100) drops SYNs when many clients connect at once, and
    # each dropped one retries only after 1, 3, 7... s; the kernel caps this at net.core.somaxconn.
    config.backlog = 2048
    # Larger messages close the socket with 1009 (--max-frame-bytes).
    config.websocket_max_message_size = web.max_frame_bytes
    # Pings find clients that vanished without a close frame, so their KV is freed.
    config.websocket_ping_interval = web.ping_interval
    return config


async def serve(
    engine: EngineHandle,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    config: WebConfig | None = None,
    lifecycle: Lifecycle | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    fd: int | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until cancelled or until `shutdown_trigger` returns; reports the bound URLs as started.
    `fd`: serve on that listening socket instead of binding `host`:`port`."""
    await hypercorn.trio.serve(
        create_app(engine, config, lifecycle),
        hypercorn_config(host, port, config, fd),
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
    )
