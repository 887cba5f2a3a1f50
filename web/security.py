"""The edge's guards: the API key on HTTP routes and websocket upgrades, the websocket Origin check,
error handlers that answer JSON with a stable code and never a stack trace, and the one place that
counts every HTTP error answer in `streamer_errors_total`.

`register(app, config, engine)` is called once by web/app.py; nothing here keeps state.
"""

from __future__ import annotations

import hmac
import json
from typing import Any
from urllib.parse import urlsplit

import structlog
from quart import Response, has_request_context, request, websocket
from werkzeug.exceptions import HTTPException

from streamer.handle import EngineHandle
from web.config import WebConfig

log = structlog.get_logger(__name__)

# Pages and their static files carry no data and must load in a browser, which cannot send an
# Authorization header on navigation; they read the key from the URL fragment instead.
PUBLIC_PATHS = frozenset({"/", "/dashboard", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)
# HTTP status -> our error code (docs/PROTOCOL.md).
CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
         405: "method_not_allowed", 413: "payload_too_large", 429: "overloaded", 503: "shutting_down"}


def error_response(status: int, code: str, message: str) -> Response:
    body = {"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error",
                      "param": None, "code": code}}
    return Response(json.dumps(body), status=status, content_type="application/json")


def key_matches(expected: str, headers: Any, args: Any) -> bool:
    """A bearer token in Authorization, or `?api_key=` (browsers cannot set websocket headers)."""
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        token = args.get("api_key", "")
    # Constant time, so the key cannot be guessed byte by byte from response times.
    return hmac.compare_digest(token.strip().encode(), expected.encode())


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """No Origin header (not a browser) passes; else the server's own origin or a listed one."""
    if origin is None or "*" in allowed:
        return True
    parts = urlsplit(origin)
    if parts.hostname is None:
        return False  # "null" (a sandboxed page or a file://) and other opaque origins
    if host and parts.netloc.lower() == host.lower() and parts.scheme in ("http", "https"):
        return True
    return origin.rstrip("/").lower() in {o.rstrip("/").lower() for o in allowed}


async def count_error(engine: EngineHandle, response: Response) -> None:
    """Count an error answer once, under its JSON body's `code` (else its status's). An answer
    marked `counted` carries an error the engine counted already (a generation that failed)."""
    if response.status_code < 400 or getattr(response, "counted", False):
        return
    try:
        code = json.loads(await response.get_data())["error"]["code"]
    except (ValueError, TypeError, KeyError):
        code = None
    if not isinstance(code, str):
        code = CODES.get(response.status_code, "internal" if response.status_code >= 500 else "invalid_request")
    engine.count_error(code)


def register(app: Any, config: WebConfig, engine: EngineHandle) -> None:
    # Larger bodies get 413 before any route reads them (the same bound as a websocket frame).
    app.config["MAX_CONTENT_LENGTH"] = config.max_frame_bytes

    @app.before_request
    async def check_http():
        if config.api_key and not _public(request.path) and not key_matches(config.api_key, request.headers,
                                                                            request.args):
            return _unauthorized()
        return None

    @app.before_websocket
    async def check_upgrade():
        # Returning a response before accept() refuses the upgrade with that HTTP status.
        if config.api_key and not key_matches(config.api_key, websocket.headers, websocket.args):
            return _unauthorized()
        origin = websocket.headers.get("Origin")
        if not origin_allowed(origin, websocket.headers.get("Host"), config.allowed_origins):
            log.info("ws_origin_refused", origin=origin)
            return error_response(403, "forbidden", "this origin may not open websockets here (--allowed-origins)")
        return None

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException):
        status = exc.code or 500
        return error_response(status, CODES.get(status, "internal" if status >= 500 else "invalid_request"),
                              exc.description or exc.name)

    @app.errorhandler(Exception)
    async def internal_error(exc: Exception):
        # Logged here with its traceback; the client gets a code and nothing of the exception.
        log.exception("http_internal_error", path=request.path if has_request_context() else None)
        return error_response(500, "internal", "internal error")

    @app.after_request
    async def count_http_error(response: Response) -> Response:
        await count_error(engine, response)
        return response

    @app.after_websocket
    async def count_refused_upgrade(response: Response | None) -> Response | None:
        if response is not None:  # None: the socket was accepted
            await count_error(engine, response)
        return response


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _unauthorized() -> Response:
    response = error_response(401, "unauthorized", "a valid API key is required (Authorization: Bearer KEY)")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response

