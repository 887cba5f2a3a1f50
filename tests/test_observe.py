"""Observability over a real server (random:tiny-qwen3 on 127.0.0.1 port 0): /metrics, /stats,
the /v1/stats push websocket and the dashboard page with its vendored chart library.
"""

from __future__ import annotations

import json

import httpx
import trio
from trio_websocket import open_websocket_url

TIMEOUT = 30


async def generate(ws_url: str, n: int, max_tokens: int) -> None:
    """n generations on one socket, plus one bad frame; returns when all are done."""
    async with open_websocket_url(ws_url) as ws:
        for i in range(n):
            await ws.send_message(json.dumps({"type": "generate", "id": str(i), "prompt": f"count {i}",
                                              "max_tokens": max_tokens, "ignore_eos": True}))
        await ws.send_message("not json")
        done = errors = 0
        while done < n or errors < 1:
            frame = json.loads(await ws.get_message())
            done += frame["type"] == "done"
            errors += frame["type"] == "error"


async def test_metrics_and_stats_after_traffic(tiny_server):
    engine, url = tiny_server
    with trio.fail_after(TIMEOUT):
        await generate(url.replace("http://", "ws://") + "/v1/stream", n=3, max_tokens=10)
        async with httpx.AsyncClient(base_url=url) as http:
            prom = await http.get("/metrics")
            stats = (await http.get("/stats")).json()
    assert prom.status_code == 200 and prom.headers["content-type"].startswith("text/plain")
    text = prom.text
    for series in ("ttft", "itl", "e2e", "queue"):
        name = engine.metrics.prom[series].name
        assert f'{name}_bucket{{le="0.001"}}' in text and f"{name}_count" in text
    assert 'streamer_requests_total{finish_reason="length"} 3.0' in text
    assert 'streamer_errors_total{code="invalid_json"} 1.0' in text  # counted at the websocket edge
    assert "streamer_generated_tokens_total 30.0" in text
    assert "streamer_step_token_budget 256.0" in text and "streamer_running_cap 8.0" in text  # uncapped: max_running
    # per-step figures: the step's own time, its decode tokens, the device's idle time between steps
    assert "streamer_step_seconds_count" in text and "streamer_device_idle_seconds_total" in text
    assert "streamer_decode_tokens " in text
    # live gauges, not the last busy step's: an idle server shows nothing running and its KV free
    kv_total = engine.allocator.num_blocks
    assert "streamer_running_requests 0.0" in text and "streamer_waiting_requests 0.0" in text
    assert "streamer_kv_used_blocks 0.0" in text and f"streamer_kv_free_blocks {float(kv_total)}" in text
    assert stats["step_ms"] > 0 and 0 <= stats["device_idle"] <= 1 and stats["decode_tokens"] >= 0
    assert {"device_s", "device_idle_s"} <= stats["recent_steps"].keys()
    assert stats["model"] == engine.model_name
    assert stats["since_start"]["ttft"]["count"] == 3 and stats["since_start"]["itl"]["count"] == 27
    assert stats["window"]["e2e"]["count"] == 3
    p = stats["since_start"]["itl"]
    assert 0 < p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"] <= p["max_ms"]
    assert stats["tokens_generated"] == 30 and stats["requests_finished"] == 3
    assert stats["running"] == stats["waiting"] == 0
    assert stats["batching"] == {"max_batch_tokens": 256, "running_cap": None, "source": "config", "auto_tune": None,
                                 "controller": None}
    kv = stats["kv"]
    assert kv["used_blocks"] == 0 and kv["free_blocks"] == kv["total_blocks"] > 0 and kv["usage"] == 0


async def test_stats_websocket_pushes_live_figures(tiny_server):
    """A long generation shows up as running in the pushes; once cancelled, as finished."""
    engine, url = tiny_server
    ws_url = url.replace("http://", "ws://")
    long = engine.max_context - 8  # runs far longer than a push interval on any machine
    with trio.fail_after(TIMEOUT):
        async with open_websocket_url(ws_url + "/v1/stats?interval_ms=100") as stats, \
                open_websocket_url(ws_url + "/v1/stream") as ws:
            first = json.loads(await stats.get_message())
            await ws.send_message(json.dumps({"type": "generate", "id": "a", "prompt": "go",
                                              "max_tokens": long, "ignore_eos": True}))
            while (snap := json.loads(await stats.get_message()))["running"] == 0:
                pass
            running = snap
            await ws.send_message(json.dumps({"type": "cancel", "id": "a"}))
            while json.loads(await ws.get_message())["type"] != "done":
                pass
            while (snap := json.loads(await stats.get_message()))["requests_finished"] < 1:
                pass
    assert first["requests_finished"] == 0 and first["uptime_s"] < running["uptime_s"] < snap["uptime_s"]
    assert running["running"] == 1 and running["kv"]["used_blocks"] > 0
    assert snap["running"] == 0 and snap["tokens_generated"] >= running["tokens_generated"]


async def test_dashboard_page_and_vendored_chart_library(tiny_server):
    _, url = tiny_server
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=url) as http:
            page = await http.get("/dashboard")
            chat = await http.get("/")
            lib = await http.get("/static/vendor/uplot.min.js")
            script = await http.get("/static/dashboard.js")
    assert page.status_code == 200 and "/static/vendor/uplot.min.js" in page.text
    assert "://" not in page.text  # no CDN: everything is served from here
    assert 'href="/dashboard"' in chat.text
    assert lib.status_code == 200 and "uPlot" in lib.text
    assert script.status_code == 200 and "/v1/stats" in script.text


def test_percentiles_agree_with_the_hdr_library():
    """/stats computes its percentiles from one cumulative sum; they are the library's own values."""
    import random

    from streamer.metrics import _hdr, values_at_percentiles

    rng = random.Random(7)
    for _ in range(50):
        h = _hdr()
        for _ in range(rng.randint(1, 2000)):
            h.record_value(max(1, int(rng.lognormvariate(rng.uniform(3, 12), rng.uniform(0.1, 3)))), rng.randint(1, 5))
        pcts = (50, 95, 99, 99.9, 0.001, 100)
        assert values_at_percentiles(h, pcts) == [h.get_value_at_percentile(p) for p in pcts]


async def test_gauges_are_live_after_clients_leave(tiny_server):
    """Clients that leave mid-stream end their requests outside any step: the gauges must still
    say nothing runs and every KV block is free, as /stats and /healthz do."""
    engine, url = tiny_server
    with trio.fail_after(TIMEOUT):
        async with open_websocket_url(url.replace("http://", "ws://") + "/v1/stream") as ws:
            for i in range(3):
                await ws.send_message(json.dumps({"type": "generate", "id": str(i), "prompt": "x",
                                                  "max_tokens": 1000, "ignore_eos": True}))
            while engine.statistics().running < 3:
                await ws.get_message()
        while engine.live_requests:
            await trio.sleep(0.01)
        async with httpx.AsyncClient(base_url=url) as http:
            text = (await http.get("/metrics")).text
    assert "streamer_running_requests 0.0" in text and "streamer_waiting_requests 0.0" in text
    assert "streamer_kv_used_blocks 0.0" in text
