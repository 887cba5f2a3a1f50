"""Observability routes: `GET /metrics` (Prometheus), `GET /stats` (JSON), the `/dashboard` page
and the `/v1/stats` websocket that pushes the same JSON about once a second.

Registered by web/app.py; every figure is read from `engine.metrics`, `engine.statistics()` and
`engine.batching()`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Response, request, send_from_directory, websocket

STATIC = Path(__file__).parent / "static"
PUSH_INTERVAL_S = 1.0
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.1, 10.0


def stats(engine: Any, step_window_s: float = 1.0, hdr: bool = False) -> dict:
    """The metrics snapshot plus live scheduler and KV figures.

    `running` and `waiting` come from the scheduler now, not from the last step (which goes stale
    when the server is idle); `recent_steps` sums the steps that ended in the last second.
    `hdr` adds the since-start HDR histograms, encoded, so a client (tools/loadgen.py) can diff two
    snapshots taken around a run and read exact server-side percentiles of just that run.
    """
    now = time.monotonic()
    snap = engine.metrics.snapshot(now)
    s = engine.statistics()
    recent = [r for r in engine.metrics.steps if r.t_end > now - step_window_s]
    tokens = [r.tokens for r in recent]
    snap.update(
        model=engine.model_name,
        running=s.running,
        waiting=s.waiting,
        steps=s.steps,
        preemptions=s.preemptions,
        batching=engine.batching(),
        recomputed_tokens=s.recomputed_tokens,
        swap={
            "swaps_out": s.swaps_out,
            "swaps_in": s.swaps_in,
            "swapped_out_blocks": s.swapped_out_blocks,
            "swapped_in_blocks": s.swapped_in_blocks,
            "host_slots": s.swap_slots,
            "host_slots_free": s.swap_slots_free,
        },
        kv={
            "total_blocks": s.kv.total_blocks,
            "used_blocks": s.kv.used_blocks,
            "free_blocks": s.kv.free_blocks,
            "usage": round(s.kv.used_blocks / s.kv.total_blocks, 4) if s.kv.total_blocks else 0.0,
        },
        recent_steps={
            "window_s": step_window_s,
            "steps": len(recent),
            "batch_tokens_mean": round(sum(tokens) / len(tokens), 2) if tokens else 0.0,
            "batch_tokens_max": max(tokens, default=0),
            "prefill_tokens": sum(r.prefill_tokens for r in recent),
            "decode_tokens": sum(r.decode_tokens for r in recent),
            # the device's time in those steps, and idle between them waiting for the host
            "device_s": round(sum(r.seconds for r in recent), 6),
            "device_idle_s": round(sum(r.idle_gap for r in recent), 6),
        },
    )
    if hdr:
        snap["hdr"] = {name: h.encode().decode("ascii") for name, h in engine.metrics.total.items()}
    return snap


def _interval(raw: str | None) -> float:
    try:
        seconds = float(raw) / 1000 if raw is not None else PUSH_INTERVAL_S
    except ValueError:
        return PUSH_INTERVAL_S
    return min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, seconds)) if seconds == seconds else PUSH_INTERVAL_S


def register(app: Any, engine: Any) -> None:
    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(engine.metrics.registry), content_type=CONTENT_TYPE_LATEST)

    @app.get("/stats")
    async def stats_json():
        return stats(engine, hdr=request.args.get("hdr") == "1")

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
            await websocket.send(json.dumps(stats(engine)))
            await trio.sleep(interval)
