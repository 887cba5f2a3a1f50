"""The HTTP and websocket edges as a third-party client meets them: refusals counted in
`streamer_errors_total`, bodies that are not JSON (or too deep, or not typed JSON), field checks
shared by both doors, `Connection: close` honoured, the favicon, and the dashboard before data.
"""

from __future__ import annotations

import json

import trio

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
