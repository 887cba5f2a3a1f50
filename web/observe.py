"""Observability routes: `GET /metrics` (Prometheus), `GET /stats` (JSON), the `/dashboard` page
and the `/v1/stats` websocket that pushes the same JSON about once a second.

Registered by web/app.py; every figure comes from the engine handle (`stats()`, `metrics_text()`):
in a multi-process server, the engine core's figures for the whole server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Response, request, send_from_directory, websocket

from streamer.handle import EngineHandle
from streamer.types import RequestError

STATIC = Path(__file__).parent / "static"
PUSH_INTERVAL_S = 1.0
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.1, 10.0


def _interval(raw: str | None) -> float:
    try:
        seconds = float(raw) / 1000 if raw is not None else PUSH_INTERVAL_S
    except ValueError:
        return PUSH_INTERVAL_S
    return min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, seconds)) if seconds == seconds else PUSH_INTERVAL_S


def register(app: Any, engine: EngineHandle) -> None:
    @app.get("/metrics")
    async def metrics():
        try:
            return Response(await engine.metrics_text(), content_type=CONTENT_TYPE_LATEST)
        except RequestError as exc:  # the engine core is gone
            return {"error": {"code": exc.code, "message": exc.message}}, 503

    @app.get("/stats")
    async def stats_json():
        try:
            return await engine.stats(hdr=request.args.get("hdr") == "1")
        except RequestError as exc:
            return {"error": {"code": exc.code, "message": exc.message}}, 503

    @app.get("/dashboard")
    async def dashboard():
        return await send_from_directory(STATIC, "dashboard.html")

    @app.websocket("/v1/stats")
    async def stats_stream():
        # Push only; the client never speaks. `?interval_ms=` tunes the rate (tests use it).
        # When the client leaves, quart-trio cancels this task, which ends the loop.
        interval = _interval(websocket.args.get("interval_ms"))
        await websocket.accept()
        while True:
            await websocket.send(json.dumps(await engine.stats()))
            await trio.sleep(interval)
