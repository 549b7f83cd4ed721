"""Log formatting: `plain` for people, `json` (one object per line) for collectors.

Both carry request_id / session_id / payment_id when a line belongs to a proxied request, and any
structured fields a caller passes as `extra={"fields": {...}}` (the access log does). Secrets never
reach a log call in the first place; this module adds nothing that could hold one.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from proxy.observability import context

FIELDS_ATTR = "fields"


class ContextFilter(logging.Filter):
    """Stamps each record with the ids of the request it was logged under."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.x402_context = context.current()
        return True


def _structured(record: logging.LogRecord) -> dict[str, Any]:
    found: dict[str, Any] = dict(getattr(record, "x402_context", None) or {})
    extra = getattr(record, FIELDS_ATTR, None)
    if isinstance(extra, dict):
        found.update(extra)
    return found


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _structured(record)
        if not fields:
            return text
        pairs = " ".join(f"{key}={_plain_value(value)}" for key, value in fields.items())
        if "\n" in text:  # a traceback: keep the fields on the first line
            head, _, tail = text.partition("\n")
            return f"{head} {pairs}\n{tail}"
        return f"{text} {pairs}"


def _plain_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' "=\n')) else text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_structured(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
