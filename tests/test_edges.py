"""The HTTP and websocket edges as a third-party client meets them: refusals counted in
`streamer_errors_total`, bodies that are not JSON (or too deep, or not typed JSON), field checks
shared by both doors, `Connection: close` honoured, the favicon, and the dashboard before data.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import trio
from netutil import http, json_body, running_server
from trio_websocket import ConnectionRejected, open_websocket_url

from web.config import WebConfig

TIMEOUT = 30
KEY = "edge-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
STATIC = Path(__file__).resolve().parent.parent / "web" / "static"
CHROMIUM = Path("/usr/bin/chromium")


def error_counts(metrics: str) -> dict[str, float]:
    return {code: float(n) for code, n in re.findall(r'^streamer_errors_total\{code="([^"]+)"\} (\S+)$', metrics, re.M)}


async def post_json(url: str, path: str, body, headers: dict[str, str] | None = None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await http(url, "POST", path, raw, {"Content-Type": "application/json", **(headers or {})})


# --- streamer_errors_total -------------------------------------------------------------------------


async def test_every_refusal_at_the_http_edges_counts_once():
    async with running_server(web=WebConfig(api_key=KEY, max_frame_bytes=2048)) as server:

        async def health_fails():
            raise RuntimeError("a bug")

        with trio.fail_after(TIMEOUT):
            assert (await http(server.http, "GET", "/healthz"))[0] == 401
            with pytest.raises(ConnectionRejected) as refused:
                async with open_websocket_url(server.ws, extra_headers=[
                        (b"authorization", AUTH["Authorization"].encode()), (b"origin", b"https://evil.example")]):
                    pass
            assert refused.value.status_code == 403
            assert (await http(server.http, "GET", "/no/such/page", headers=AUTH))[0] == 404
            assert (await http(server.http, "DELETE", "/healthz", headers=AUTH))[0] == 405
            assert (await post_json(server.http, "/v1/completions", b"{" + b" " * 4096 + b"}", AUTH))[0] == 413
            assert (await post_json(server.http, "/v1/completions", b"{nope", AUTH))[0] == 400
            assert (await post_json(server.http, "/v1/completions", {"model": "gpt-4", "prompt": "x"}, AUTH))[0] == 404
            server.engine.health = health_fails
            assert (await http(server.http, "GET", "/healthz", headers=AUTH))[0] == 500
            status, _, body = await http(server.http, "GET", "/metrics", headers=AUTH)
    assert status == 200
    assert error_counts(body.decode()) == {
        "unauthorized": 1, "forbidden": 1, "not_found": 1, "method_not_allowed": 1, "payload_too_large": 1,
        "invalid_json": 1, "model_not_found": 1, "internal": 1}


# --- bodies --------------------------------------------------------------------------------------


async def test_bodies_that_are_not_json_are_invalid_json(tiny_server):
    engine, url = tiny_server
    deep = b"[" * 100_000 + b"]" * 100_000
    with trio.fail_after(TIMEOUT):
        for body in (deep, b"{nope", b"", b'{"model": "\xff"}'):
            status, headers, reply = await post_json(url, "/v1/chat/completions", body)
            assert status == 400 and headers["content-type"] == "application/json", (body[:20], reply)
            error = json_body(reply)["error"]
            assert error["code"] == "invalid_json" and error["type"] == "invalid_request_error", error
            assert "Traceback" not in error["message"]
        # JSON, but not an object: a different refusal
        status, _, reply = await post_json(url, "/v1/completions", [1, 2])
        assert status == 400 and json_body(reply)["error"]["code"] == "invalid_request"
        # a deep value in a field: refused by the field's check, no 500
        nested = json.loads(b"[" * 500 + b"]" * 500)
        status, _, reply = await post_json(url, "/v1/completions", {"model": nested, "prompt": "x"})
        assert status == 400 and json_body(reply)["error"]["param"] == "model"


async def test_a_body_that_says_it_is_not_json_is_refused_with_415(tiny_server):
    engine, url = tiny_server
    body = json.dumps({"model": engine.model_name, "prompt": "a", "max_tokens": 1}).encode()
    with trio.fail_after(TIMEOUT):
        status, _, reply = await http(url, "POST", "/v1/completions", body, {"Content-Type": "text/plain"})
        assert status == 415, reply
        error = json_body(reply)["error"]
        assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]
        for headers in ({}, {"Content-Type": "application/json; charset=utf-8"}):  # no type: taken as JSON
            status, _, reply = await http(url, "POST", "/v1/completions", body, headers)
            assert status == 200, (headers, reply)


# --- fields, the same on both doors -----------------------------------------------------------------


async def test_unknown_role_and_temperature_over_2_are_refused_on_both_doors(tiny_server):
    engine, url = tiny_server
    model = engine.model_name
    wizard = [{"role": "wizard", "content": "hi"}]
    user = [{"role": "user", "content": "hi"}]
    with trio.fail_after(TIMEOUT):
        status, _, reply = await post_json(url, "/v1/chat/completions", {"model": model, "messages": wizard})
        error = json_body(reply)["error"]
        assert status == 400 and error["param"] == "messages" and "messages[0].role" in error["message"], error
        status, _, reply = await post_json(url, "/v1/chat/completions",
                                           {"model": model, "messages": user, "temperature": 2.5})
        error = json_body(reply)["error"]
        assert status == 400 and error["param"] == "temperature" and "2" in error["message"], error
        status, _, reply = await post_json(url, "/v1/chat/completions",
                                           {"model": model, "messages": user, "temperature": 2, "max_tokens": 1})
        assert status == 200, reply
        async with open_websocket_url(url.replace("http://", "ws://") + "/v1/stream") as ws:
            for i, frame in enumerate(({"messages": wizard}, {"prompt": "hi", "temperature": 2.5})):
                await ws.send_message(json.dumps({"type": "generate", "id": f"r{i}", **frame}))
                reply = json.loads(await ws.get_message())
                assert reply["type"] == "error" and reply["code"] == "invalid_request", reply
            await ws.send_message(json.dumps({"type": "generate", "id": "ok", "prompt": "hi", "max_tokens": 1,
                                              "temperature": 2}))
            assert json.loads(await ws.get_message())["type"] in ("token", "done")


async def test_value_errors_name_their_field(tiny_server):
    engine, url = tiny_server
    model = engine.model_name
    cases = [({"top_p": 5}, "top_p"), ({"temperature": -1}, "temperature"), ({"seed": "x"}, "seed"),
             ({"stop": [""]}, "stop"), ({"max_tokens": 0}, "max_tokens"), ({"ignore_eos": "yes"}, "ignore_eos"),
             ({"prompt": "hello " * (engine.max_context + 10)}, "prompt"), ({"priority": 99}, "priority")]
    with trio.fail_after(TIMEOUT):
        for fields, param in cases:
            status, _, reply = await post_json(url, "/v1/completions", {"model": model, "prompt": "a", **fields})
            error = json_body(reply)["error"]
            assert status == 400 and error["param"] == param, (fields, error)


# --- the connection --------------------------------------------------------------------------------


async def read_to_eof(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(request)
        raw = b""
        while chunk := await stream.receive_some():
            raw += chunk
    return raw


async def test_connection_close_answers_close_the_socket(tiny_server):
    engine, url = tiny_server
    with trio.fail_after(10):  # the server hangs up once it has answered
        for request in (b"GET /healthz HTTP/1.0\r\n\r\n",
                        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                        b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
            raw = await read_to_eof(url, request)
            head, _, body = raw.partition(b"\r\n\r\n")
            assert b"connection: close" in head.lower(), head
            assert json.loads(body), body


# --- pages -----------------------------------------------------------------------------------------


async def test_favicon_is_served_without_the_key():
    async with running_server(web=WebConfig(api_key=KEY)) as server:
        with trio.fail_after(TIMEOUT):
            status, headers, body = await http(server.http, "GET", "/favicon.ico")
    assert status == 200 and headers["content-type"].startswith("image/svg+xml")
    assert body.startswith(b"<svg") and len(body) < 2048


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")
def test_dashboard_before_any_data_shows_the_last_five_minutes():
    """The page's files straight from web/static, and a /v1/stats websocket that never speaks."""
    from playwright.sync_api import sync_playwright

    files = {"/dashboard": STATIC / "dashboard.html"}

    def serve_file(route):
        path = route.request.url.split("//", 1)[1].partition("/")[2].partition("?")[0]
        file = files.get("/" + path, STATIC / path.removeprefix("static/"))
        kind = {"js": "text/javascript", "css": "text/css"}.get(file.suffix[1:], "text/html")
        route.fulfill(status=200, body=file.read_bytes(), content_type=kind)

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page = chromium.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.route("http://streamer.test/**", serve_file)
            page.route_web_socket("**/v1/stats", lambda ws: None)  # open, silent
            page.goto("http://streamer.test/dashboard")
            page.wait_for_function("typeof charts !== 'undefined' && charts.length > 0")
            now = page.evaluate("Date.now() / 1000")
            ranges = page.evaluate("charts.map((c) => [c.plot.scales.x.min, c.plot.scales.x.max])")
        finally:
            chromium.close()
    assert not errors, errors
    for lo, hi in ranges:
        assert lo is not None and hi is not None and abs(hi - now) < 60 and abs(hi - lo - 300) < 1, ranges
