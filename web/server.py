"""Serve the app with hypercorn from the caller's nursery (never from the framework's lifespan).

`serve` is started by streamer/__main__.py and by tests with `await nursery.start(serve, ...)`,
which returns the bound URLs once the socket listens.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import hypercorn.trio
import trio
from hypercorn.config import Config

from web.app import create_app


def hypercorn_config(host: str, port: int) -> Config:
    config = Config()
    # IPv6 literals need brackets in a bind string.
    config.bind = [f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"]
    # Route hypercorn's messages through the root logger that streamer.logging configured.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = None
    # Chats are long-lived websockets: on shutdown, wait briefly for them, then cancel.
    config.graceful_timeout = 2.0
    # A prompt is at most a few hundred KiB of text; the default 16 MiB invites memory abuse.
    config.websocket_max_message_size = 4 * 1024 * 1024
    # Pings find clients that vanished without a close frame, so their KV is freed.
    config.websocket_ping_interval = 20.0
    return config


async def serve(
    engine: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until cancelled or until `shutdown_trigger` returns; reports the bound URLs as started."""
    await hypercorn.trio.serve(
        create_app(engine),
        hypercorn_config(host, port),
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
    )
