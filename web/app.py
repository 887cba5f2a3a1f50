"""The quart-trio application: `GET /` chat page, `GET /healthz`, the favicon and the /v1/stream
websocket; observability routes come from web/observe.py, the OpenAI-compatible ones from
web/openai_api.py.

`create_app(engine, config, lifecycle)` is called by web/server.py (and tests); routes hold no state
of their own. web/security.py guards every route (API key, websocket Origin, error pages) and
counts every error answer.
"""

from __future__ import annotations

from pathlib import Path

from quart import Response, send_from_directory, websocket
from quart_trio import QuartTrio

from streamer.handle import EngineHandle
from streamer.types import RequestError
from web import observe, openai_api, security
from web.config import WebConfig
from web.lifecycle import Lifecycle
from web.ws import Connection
from web.wswrite import texts_sender

STATIC = Path(__file__).parent / "static"
# Browsers ask every site for /favicon.ico; three lines of a stream, in the pages' blue.
FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" '
           'fill="#2563eb"/><path d="M4 5h8M4 8h6M4 11h4" stroke="#fff" stroke-width="1.6" '
           'stroke-linecap="round"/></svg>')


ASGI_SEND = "streamer.asgi_send"  # scope key: the server's own send callable of a websocket


def _keep_asgi_send(asgi_app):
    """ASGI middleware that leaves each websocket's server send callable in its scope, where
    /v1/stream finds it for web/wswrite.py."""
    async def app(scope, receive, send):
        if scope["type"] == "websocket":
            scope = {**scope, ASGI_SEND: send}
        return await asgi_app(scope, receive, send)
    return app


def create_app(engine: EngineHandle, config: WebConfig | None = None, lifecycle: Lifecycle | None = None) -> QuartTrio:
    config = config or WebConfig()
    lifecycle = lifecycle or Lifecycle()
    app = QuartTrio(__name__, static_folder=str(STATIC), static_url_path="/static")
    app.asgi_app = _keep_asgi_send(app.asgi_app)
    security.register(app, config, engine)
    # Revalidate the page and its scripts on every load (cheap: ETag), so a browser never pairs
    # a stale app.js with a newer server; quart's default caches them for 12 hours.
    app.config["SEND_FILE_MAX_AGE_DEFAULT"] = 0

    @app.get("/")
    async def index():
        return await send_from_directory(STATIC, "index.html")

    @app.get("/favicon.ico")
    async def favicon():
        return Response(FAVICON, content_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    @app.get("/healthz")
    async def healthz():
        try:
            return {"status": "ok", **await engine.health()}
        except RequestError as exc:  # the engine core is gone: this front end cannot serve
            return {"status": exc.code, "error": exc.message}, 503

    @app.websocket("/v1/stream")
    async def stream():
        # Accept before reading so the handshake never waits on the first client frame.
        await websocket.accept()
        ws = websocket._get_current_object()  # the plain object: Connection knows nothing of quart
        batch = websocket.args.get("batch") in ("1", "true")  # frames batched per message (docs/PROTOCOL.md)
        send_texts = texts_sender(websocket.scope.get(ASGI_SEND))
        close = await Connection(engine, ws.send, config, lifecycle, batch=batch, send_texts=send_texts).run(ws.receive)
        if close is not None:  # the server hangs up: shutting down (1001) or idle (4408)
            await websocket.close(*close)

    observe.register(app, engine)
    openai_api.register(app, engine, config)
    return app
