"""structlog configuration, done once by streamer/__main__.py: JSON lines when stdout is not a TTY,
coloured console lines otherwise; stdlib loggers (hypercorn, quart, transformers) render the same way.
"""

from __future__ import annotations

import logging
import sys

import structlog

LEVELS = ("debug", "info", "warning", "error")


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog and the stdlib root logger; ``json`` None means "unless stdout is a TTY"."""
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    level_no = getattr(logging, level.upper())
    if json is None:
        json = not sys.stdout.isatty()

    # Run on every line, structlog's own and stdlib's alike; merge_contextvars carries the
    # request_id that the engine binds, so it lands on the canonical per-request line.
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        if json
        else [structlog.dev.ConsoleRenderer()]
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        # Filtering in the bound logger makes a disabled debug call nearly free.
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level_no)
    # Third-party chatter below warning is noise next to our one line per request.
    for name in ("hypercorn.error", "hypercorn.access", "quart", "transformers", "httpx"):
        logging.getLogger(name).setLevel(max(level_no, logging.WARNING))
