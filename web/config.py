"""The web edge's configuration: limits, credentials and timeouts, as one frozen dataclass.

Built from flags by streamer/__main__.py (or by tests) and handed to `create_app` and `serve`;
validated here so a bad value is refused before the server starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WebConfig:
    api_key: str | None = None  # when set, a bearer token every API route and the websocket need
    allowed_origins: tuple[str, ...] = ()  # websocket Origins allowed besides the server's own; "*": any
    max_live_per_connection: int = 256  # live generations one socket may hold ("overloaded" beyond)
    max_prompt_tokens: int | None = None  # None: only the context and the KV arena bound a prompt
    max_tokens: int | None = None  # largest max_tokens a request may ask; None: only the context bounds it
    max_frame_bytes: int = 4 * 1024 * 1024  # larger websocket messages close with 1009; HTTP bodies get 413
    ping_interval: float | None = 20.0  # websocket pings, so NATs keep the socket and dead peers show up
    idle_timeout: float | None = 300.0  # close a socket with no frames either way and nothing live (4408)
    drain_timeout: float = 30.0  # on SIGTERM, how long running generations may take to finish

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        if self.max_live_per_connection < 1:
            raise ValueError("max_live_per_connection must be >= 1")
        for name in ("max_prompt_tokens", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_frame_bytes < 1024:
            raise ValueError("max_frame_bytes must be >= 1024")
        for name in ("ping_interval", "idle_timeout"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds")
        if not (self.drain_timeout >= 0 and math.isfinite(self.drain_timeout)):
            raise ValueError("drain_timeout must be >= 0 seconds")
        for origin in self.allowed_origins:
            if origin != "*" and "://" not in origin:
                raise ValueError(f"allowed origin {origin!r} must look like https://host[:port] or be '*'")
