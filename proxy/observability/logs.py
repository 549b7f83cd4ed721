"""Log formatting: `plain` for people, `json` (one object per line) for collectors; and the writer.

Both formats carry request_id / session_id / payment_id when a line belongs to a proxied request, and
any structured fields a caller passes as `extra={"fields": {...}}`. Secrets never reach a log call in
the first place; this module adds nothing that could hold one.

Every line goes through one `LineWriter`, in order. Access lines (one per request, built by
`access_log.py` without the logging machinery) are appended to it and written in batches by a thread
of its own, as nginx buffers its access log: the event loop never waits on stderr for them. Every
other record is written at once, after whatever access lines are still waiting, so lines keep their
order and a warning is never held back. A process killed with SIGKILL can lose the access lines of
its last `FLUSH_INTERVAL`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections import deque
from typing import Any, Final, TextIO

from proxy.observability import context

FIELDS_ATTR = "fields"
# Access lines wait at most this long (seconds), or until this many are waiting, before a write.
FLUSH_INTERVAL: Final = 0.1
FLUSH_LINES: Final = 512


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
        pairs = " ".join(f"{key}={plain_value(value)}" for key, value in fields.items())
        if "\n" in text:  # a traceback: keep the fields on the first line
            head, _, tail = text.partition("\n")
            return f"{head} {pairs}\n{tail}"
        return f"{text} {pairs}"


_QUOTED = re.compile('[ "=\n]')


def plain_value(value: Any) -> str:
    """A plain-line field value: as is, or JSON-quoted if empty or holding a space, quote, = or newline."""
    text = str(value)
    return json.dumps(text) if (not text or _QUOTED.search(text)) else text


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


class LineWriter:
    """Finished lines to a stream, in order: `add` (an append, for the access log) waits for a batch
    written by the writer's thread; `write_now` writes what waits and then its own line, at once."""

    def __init__(self, stream: TextIO, interval: float = FLUSH_INTERVAL, batch: int = FLUSH_LINES) -> None:
        self._stream = stream
        self._interval = interval
        self._batch = batch
        self._pending: deque[str] = deque()  # append and popleft are atomic: no lock on the hot path
        self._lock = threading.Lock()  # one writer to the stream at a time
        self._wake = threading.Event()  # something waits
        self._full = threading.Event()  # a batch is full: write before the interval is over
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, line: str) -> None:
        pending = self._pending
        pending.append(line)
        waiting = len(pending)
        if waiting == 1:
            if self._thread is None:
                self._start()
            self._wake.set()
        elif waiting == self._batch:
            self._full.set()

    def write_now(self, line: str) -> None:
        with self._lock:
            self._write(line)

    def flush(self) -> None:
        with self._lock:
            self._write(None)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._full.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)
        self.flush()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="x402-log-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            if not self._pending:
                self._wake.wait()
            self._wake.clear()
            self._full.wait(self._interval)  # gather a batch
            self._full.clear()
            self.flush()

    def _write(self, line: str | None) -> None:
        pending = self._pending
        parts = [pending.popleft() for _ in range(len(pending))]
        if line is not None:
            parts.append(line)
        if not parts:
            return
        try:
            self._stream.write("".join(parts))
            self._stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: the lines are lost, nothing raises
            pass


class WriterHandler(logging.Handler):
    """The root handler: formats a record and writes it through the `LineWriter`, at once."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.writer.write_now(text + "\n")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        super().close()


# The writer and format that `configure_logging` installed (None before: the access log then goes
# through `logging` like any record).
_sink: tuple[LineWriter, str] | None = None


def access_sink() -> tuple[LineWriter, str] | None:
    """(writer, "plain" | "json") for lines built without the logging machinery; None if not configured."""
    return _sink


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    global _sink
    writer = LineWriter(sys.stderr if stream is None else stream)
    handler = WriterHandler(writer)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, WriterHandler):
            old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    _sink = (writer, "json" if fmt == "json" else "plain")
