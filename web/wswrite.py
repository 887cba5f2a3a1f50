"""Several websocket messages in one socket write, where the server is hypercorn.

The /v1/stream protocol sends one frame a message by default, and each message costs hypercorn's
whole send path: an ASGI event, wsproto's framing, its connection's send lock and a syscall, with
trio checkpoints between. When a socket's writer finds several frames queued (its front end fell
behind the step loop), `texts_sender` writes them as that many messages in one `send_all`, so
the path is paid once; a client sees exactly the messages it would have seen one by one.

ASGI has no event for this, so the sender reaches hypercorn's websocket stream behind the ASGI
send callable (`WSStream.app_send`), and does what that method does for a text message. Under
any other server, or a hypercorn whose stream no longer looks like this, it returns None and the
caller sends one message at a time; tests/test_multiprocess.py checks that real serving takes
this path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.protocol.events import Data
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from wsproto.events import TextMessage
from wsproto.utilities import LocalProtocolError

SendTexts = Callable[[list[str]], Awaitable[None]]


def texts_sender(asgi_send: Any) -> SendTexts | None:
    """A function that sends a list of text messages in one write, or None where that is not
    possible under this server."""
    stream = getattr(asgi_send, "__self__", None)
    if not isinstance(stream, WSStream) or getattr(asgi_send, "__func__", None) is not WSStream.app_send:
        return None
    if not all(hasattr(stream, name) for name in ("closed", "state", "connection", "send", "stream_id")):
        return None

    async def send_texts(texts: list[str]) -> None:
        if stream.closed:  # the peer left; app_send drops messages then too
            return
        if stream.state is not ASGIWebsocketState.CONNECTED:
            raise RuntimeError(f"websocket send in state {stream.state.name}")
        try:
            data = b"".join([stream.connection.send(TextMessage(data=text)) for text in texts])
        except LocalProtocolError:  # wsproto is closing: app_send drops the message then too
            return
        await stream.send(Data(stream_id=stream.stream_id, data=data))

    return send_texts
