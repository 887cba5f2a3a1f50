"""Access at the edge: the API key on HTTP and websockets (header or ?api_key=), the websocket
Origin check, and error pages that are JSON with a code and never a stack trace.
"""

from __future__ import annotations

import json

import pytest
import trio
from netutil import http, json_body, running_server
from trio_websocket import ConnectionRejected, open_websocket_url

from web.config import WebConfig
from web.security import origin_allowed
from web.server import serve

TIMEOUT = 30
KEY = "s3cret-key"


@pytest.fixture
async def server():
    async with running_server(web=WebConfig(api_key=KEY, allowed_origins=("https://chat.example.com",))) as running:
        yield running


async def generate_once(ws) -> dict:
    await ws.send_message(json.dumps({"type": "generate", "id": "a", "prompt": "Hi", "max_tokens": 2}))
    while (frame := json.loads(await ws.get_message()))["type"] != "done":
        pass
    return frame


async def test_http_needs_the_key_but_pages_do_not(server):
    with trio.fail_after(TIMEOUT):
        status, headers, body = await http(server.http, "GET", "/healthz")
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert json_body(body)["error"]["code"] == "unauthorized"
        status, _, _ = await http(server.http, "GET", "/healthz", headers={"Authorization": "Bearer wrong"})
        assert status == 401
        status, _, body = await http(server.http, "GET", "/healthz", headers={"Authorization": f"Bearer {KEY}"})
        assert status == 200 and json_body(body)["status"] == "ok"
        status, _, _ = await http(server.http, "GET", f"/healthz?api_key={KEY}")
        assert status == 200
        status, _, _ = await http(server.http, "POST", "/v1/completions", b"{}")
        assert status == 401
        for page in ("/", "/static/app.js"):
            status, _, _ = await http(server.http, "GET", page)
            assert status == 200, page


async def test_websocket_needs_the_key(server):
    with trio.fail_after(TIMEOUT):
        with pytest.raises(ConnectionRejected) as refused:
            async with open_websocket_url(server.ws):
                pass
        assert refused.value.status_code == 401
        assert json.loads(refused.value.body)["error"]["code"] == "unauthorized"
        async with open_websocket_url(server.ws, extra_headers=[(b"authorization", f"Bearer {KEY}".encode())]) as ws:
            assert (await generate_once(ws))["finish_reason"] in ("length", "stop")
        async with open_websocket_url(f"{server.ws}?api_key={KEY}") as ws:  # what browsers do
            assert (await generate_once(ws))["type"] == "done"


async def test_websocket_origin_check(server):
    auth = (b"authorization", f"Bearer {KEY}".encode())
    with trio.fail_after(TIMEOUT):
        for origin in ("https://evil.example.org", "null", f"http://{server.hostport}.evil.org"):
            with pytest.raises(ConnectionRejected) as refused:
                async with open_websocket_url(server.ws, extra_headers=[auth, (b"origin", origin.encode())]):
                    pass
            assert refused.value.status_code == 403, origin
        for origin in (f"http://{server.hostport}", "https://chat.example.com"):
            async with open_websocket_url(server.ws, extra_headers=[auth, (b"origin", origin.encode())]) as ws:
                assert (await generate_once(ws))["type"] == "done"


def test_origin_rules():
    assert origin_allowed(None, "h:1", ())  # not a browser
    assert origin_allowed("http://h:1", "h:1", ())
    assert origin_allowed("https://H:1", "h:1", ())
    assert not origin_allowed("http://h:2", "h:1", ())
    assert not origin_allowed("http://h:1", None, ())
    assert origin_allowed("https://a.b", "h:1", ("https://a.b/",))
    assert origin_allowed("https://anything", "h:1", ("*",))
    assert not origin_allowed("null", "h:1", ("https://a.b",))


class FailingEngine:
    """Enough of an engine to serve the app; its health check raises."""

    model_name = "fake"
    max_context = 16

    async def health(self):
        raise RuntimeError("secret internal detail")

    def count_error(self, code):
        pass

    def __getattr__(self, name):
        raise AttributeError(name)


async def test_errors_are_json_without_tracebacks():
    engine = FailingEngine()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            url = (await nursery.start(serve, engine, "127.0.0.1", 0))[0]
            status, headers, body = await http(url, "GET", "/healthz")
            assert status == 500 and headers["content-type"].startswith("application/json")
            assert json_body(body)["error"]["code"] == "internal"
            assert b"secret" not in body and b"Traceback" not in body and b"RuntimeError" not in body
            status, _, body = await http(url, "GET", "/no/such/page")
            assert status == 404 and json_body(body)["error"]["code"] == "not_found"
            status, _, body = await http(url, "DELETE", "/healthz")
            assert status == 405 and json_body(body)["error"]["code"] == "method_not_allowed"
            nursery.cancel_scope.cancel()


async def test_bodies_over_the_limit_get_413():
    async with running_server(web=WebConfig(max_frame_bytes=2048)) as server:
        with trio.fail_after(TIMEOUT):
            status, _, body = await http(server.http, "POST", "/v1/completions", b"{" + b" " * 4096 + b"}",
                                         headers={"Content-Type": "application/json"})
    assert status == 413 and json_body(body)["error"]["code"] == "payload_too_large"
