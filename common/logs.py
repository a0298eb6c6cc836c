"""Logging set-up shared by every process.

``json`` (the default for services): one JSON object per line, with the service, the request
id and the trace and span ids of the request being handled, so a log search can jump to the
trace and back. ``text``: the same facts in a line for reading by eye.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from opentelemetry import trace

from inferline.common.errors import ConfigError
from inferline.common.telemetry.context import REQUEST_ID, SERVICE

FORMATS = ("json", "text")
# Attributes every LogRecord has; anything else was passed with ``extra=`` and is kept.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def request_fields() -> dict[str, str]:
    """trace_id, span_id (empty when tracing is off) and request_id of the current request."""
    context = trace.get_current_span().get_span_context()
    return {
        "trace_id": format(context.trace_id, "032x") if context.is_valid else "",
        "span_id": format(context.span_id, "016x") if context.is_valid else "",
        "request_id": REQUEST_ID.get(),
    }


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": SERVICE.get() or self.service,
            "logger": record.name,
            "message": record.getMessage(),
            **request_fields(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and k not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__(f"%(asctime)s %(levelname)s [{service}] %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = request_fields()
        if ids["request_id"]:
            line += f" (request {ids['request_id']}" + (f", trace {ids['trace_id']})" if ids["trace_id"] else ")")
        return line


def configure_logging(level: str, service: str, fmt: str = "text") -> None:
    """One line per record on stderr, tagged with the service so `inferline up` output reads."""
    if fmt not in FORMATS:
        raise ConfigError(f"INFERLINE_LOG_FORMAT={fmt!r} is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
