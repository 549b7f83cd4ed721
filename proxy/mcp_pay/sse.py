"""An incremental `text/event-stream` parser that keeps every event's exact bytes.

Feed it bytes as they arrive; it returns each event as soon as its terminating blank line has arrived,
with the bytes it was made of (`raw`), so an event that is not ours is forwarded byte for byte and
without delay. Lines end in CRLF, LF or CR (a CR at the end of a chunk waits for the next byte, which
may be its LF). Field parsing follows the WHATWG rules (`data`, `event`, `id`; `retry` and unknown
fields are kept in `raw` only; a line starting with ":" is a comment; one space after the colon is
dropped; a leading UTF-8 BOM is ignored).

Memory is bounded: an event growing past `max_event_bytes` before it ends is not parsed; its bytes
come out as `SseRaw` pieces as they arrive (`overflow=True`) until it ends, after which parsing
resumes with the next event. No sockets, no asyncio.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
_BOM = "\ufeff"


@dataclass(frozen=True)
class SseEvent:
    """One complete event. `raw` is exactly the bytes it arrived as, its blank line included."""

    raw: bytes
    data: str | None  # the data lines joined with "\n"; None when the event had no data field
    event: str | None = None  # the `event:` field (None: the default type, "message")
    id: str | None = None  # the `id:` field


@dataclass(frozen=True)
class SseRaw:
    """Bytes to forward untouched that are not a parsed event: part of an event too large to parse
    (`overflow`), or an incomplete event left at the end of the stream (`SseParser.close`)."""

    raw: bytes
    overflow: bool = False
    end_of_event: bool = False  # the overflowed event ended with these bytes


SsePiece = SseEvent | SseRaw


class SseParser:
    """Bytes in, `SseEvent`/`SseRaw` pieces out; the concatenated `raw` of the pieces is the input."""

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        if max_event_bytes < 1:
            raise ValueError("max_event_bytes must be positive")
        self.max_event_bytes = max_event_bytes
        self._buf = bytearray()  # bytes of the current event not yet handed out
        self._scan = 0  # bytes of _buf already split into lines
        self._data: list[str] = []
        self._has_data = False
        self._event: str | None = None
        self._id: str | None = None
        self._first_line = True
        self._overflow = False
        self._line_started = False  # overflow only: the current line's first bytes were handed out already

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the end of an event (at most about max_event_bytes)."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[SsePiece]:
        out: list[SsePiece] = []
        if not chunk:
            return out
        self._buf += chunk
        self._lines(out, final=False)
        if self._overflow:
            self._hand_out_overflow(out)
        elif len(self._buf) > self.max_event_bytes:
            self._overflow = True
            self._line_started = False
            self._reset_fields()
            self._hand_out_overflow(out)
        return out

    def close(self) -> list[SsePiece]:
        """The stream ended: whatever is left (an event without its blank line) comes out raw."""
        out: list[SsePiece] = []
        self._lines(out, final=True)  # a CR held back at the very end is a line end after all
        if self._buf:
            out.append(SseRaw(bytes(self._buf), overflow=self._overflow))
        self._buf = bytearray()
        self._scan = 0
        self._overflow = False
        self._reset_fields()
        return out

    # -- internals ---------------------------------------------------------------------------

    def _lines(self, out: list[SsePiece], *, final: bool) -> None:
        buf = self._buf
        while True:
            scan = self._scan
            lf = buf.find(b"\n", scan)
            cr = buf.find(b"\r", scan, lf if lf >= 0 else len(buf))
            if cr >= 0:
                if cr + 1 == len(buf) and not final:
                    return  # a CR at the end: wait to see whether an LF follows
                end = cr + 2 if cr + 1 < len(buf) and buf[cr + 1] == 0x0A else cr + 1
                at = cr
            elif lf >= 0:
                at, end = lf, lf + 1
            else:
                return
            empty = at == scan and not (self._overflow and self._line_started)
            line = bytes(buf[scan:at])
            self._scan = end
            self._line_started = False
            if empty:
                raw = bytes(buf[:end])
                del buf[:end]
                self._scan = 0
                if self._overflow:
                    out.append(SseRaw(raw, overflow=True, end_of_event=True))
                    self._overflow = False
                else:
                    data = "\n".join(self._data) if self._has_data else None
                    out.append(SseEvent(raw, data, self._event, self._id))
                self._reset_fields()
            elif not self._overflow:
                self._field(line)

    def _hand_out_overflow(self, out: list[SsePiece]) -> None:
        """Overflow: hand out everything but a trailing CR (it may pair with the next chunk's LF)."""
        keep = 1 if self._buf.endswith(b"\r") else 0
        upto = len(self._buf) - keep
        if upto <= 0:
            return
        if upto > self._scan:
            self._line_started = True
        out.append(SseRaw(bytes(self._buf[:upto]), overflow=True))
        del self._buf[:upto]
        self._scan = 0

    def _field(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if self._first_line:
            self._first_line = False
            text = text.removeprefix(_BOM)
        if not text or text.startswith(":"):
            return
        name, sep, value = text.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self._id = value

    def _reset_fields(self) -> None:
        self._data = []
        self._has_data = False
        self._event = None
        self._id = None
