"""structlog configuration, done once by streamer/__main__.py: JSON lines when stdout is not a TTY,
coloured console lines otherwise; stdlib loggers (hypercorn, quart, transformers) render the same way.
"""

from __future__ import annotations

import logging
import sys

import msgspec
import structlog

LEVELS = ("debug", "info", "warning", "error")


class _Line(structlog.WriteLogger):
    """Writes a rendered line to stdout, and knows its name (the `logger` field)."""

    def __init__(self, name: str = "") -> None:
        super().__init__(sys.stdout)
        self.name = name


def _add_name(logger, method_name: str, event_dict: dict) -> dict:
    event_dict["logger"] = getattr(logger, "name", "")
    return event_dict


_encode = msgspec.json.Encoder(enc_hook=repr)


def _json(event_dict: dict, **_) -> str:
    return _encode.encode(event_dict).decode()


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog and the stdlib root logger; ``json`` None means "unless stdout is a TTY".

    Our own lines go straight from structlog to stdout, without stdlib `LogRecord`s (the engine
    core writes one per finished request, on the step loop's thread); stdlib loggers (hypercorn,
    quart, transformers) render the same way through the root handler."""
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    level_no = getattr(logging, level.upper())
    if json is None:
        json = not sys.stdout.isatty()

    # merge_contextvars carries the request_id that the engine binds, so it lands on the
    # canonical per-request line.
    stamp = [structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True)]
    renderer = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(serializer=_json)]
        if json
        else [structlog.dev.ConsoleRenderer()]
    )
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *stamp, _add_name, *renderer],
        # Filtering in the bound logger makes a disabled debug call nearly free.
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=_Line,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.contextvars.merge_contextvars, structlog.stdlib.add_log_level,
                               structlog.stdlib.add_logger_name, stamp[1]],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level_no)
    # Third-party chatter below warning is noise next to our one line per request.
    for name in ("hypercorn.error", "hypercorn.access", "quart", "transformers", "httpx"):
        logging.getLogger(name).setLevel(max(level_no, logging.WARNING))
