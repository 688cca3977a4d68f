"""Structured logging for every DreamFrame process: structlog in front, stdlib logging underneath.

structlog events and plain ``logging`` records (from libraries) go through the same handler and
renderer, so a cluster sees one JSON object per line and a terminal sees one readable line per event.
Per-request context (e.g. the RPC method) is bound with ``structlog.contextvars`` and appears on every
line logged while handling that request.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from dreamframe.config import LogSettings

# Marks the handler we install so reconfiguring replaces it instead of stacking another.
_HANDLER_NAME = "dreamframe"


def _level(name: str) -> int:
    levels = logging.getLevelNamesMapping()
    try:
        return levels[name.upper()]
    except KeyError:
        raise ValueError(
            f"log.level: unknown level {name!r} (use one of DEBUG, INFO, WARNING, ERROR)"
        ) from None


def configure_logging(settings: LogSettings | None = None, *, stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to ``stream`` (stderr) as JSON lines or console lines."""
    settings = settings or LogSettings()
    level = _level(settings.level)
    stream = stream if stream is not None else sys.stderr

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if settings.json_format:
        renderer: list[Any] = [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ]
    else:
        # ConsoleRenderer formats exceptions itself (pretty tracebacks).
        renderer = [structlog.dev.ConsoleRenderer(colors=stream.isatty())]

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached, so a later configure_logging (tests, CLI flags) takes effect everywhere.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def get_logger(name: str | None = None, **initial: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger; ``initial`` key/values are bound to every event it logs."""
    return structlog.stdlib.get_logger(name, **initial)
