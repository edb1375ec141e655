"""Server-sent events as a client reads them (WHATWG HTML, "Parsing an event stream").

The record must hold what the client saw, so the proxy reads an OpenAI-compatible stream the
way a conforming client does, not line by line: lines end at CRLF, LF or CR (a CRLF may be cut
between two reads); a line starting with ``:`` is a comment; a field name is matched exactly
(`` data:`` is a field named " data", which a client ignores); one space after the colon is
dropped; the ``data`` lines of an event are joined with LF; and the event is dispatched at the
blank line that ends it. An event the stream ends before its blank line is never dispatched.
"""

from __future__ import annotations

_BOM = b"\xef\xbb\xbf"


class SSEEvents:
    """Feed a stream's lines in order; each blank line gives the data of the event it ends."""

    __slots__ = ("_after_cr", "_data", "_started")

    def __init__(self) -> None:
        self._data: list[bytes] | None = None
        self._after_cr = False  # the last line ended in a lone CR: an LF next completes it
        self._started = False

    def line(self, line: bytes) -> bytes | None:
        """Take one line with its line end; ``None``, or at an event's end its data.

        Lines are what ``bytes.splitlines(keepends=True)`` gives (it splits at CRLF, LF and CR
        alike); a lone LF right after a line that ended in CR is the rest of a CRLF cut
        between two reads, not a blank line. An event's end with no data gives ``b""``.
        """
        if self._after_cr:
            self._after_cr = False
            if line == b"\n":
                return None
        self._after_cr = line.endswith(b"\r")
        if not self._started:
            self._started = True
            if line.startswith(_BOM):
                line = line[len(_BOM) :]
        body = line.rstrip(b"\r\n")
        if not body:
            data, self._data = self._data, None
            return b"" if data is None else b"\n".join(data)
        if body[:1] == b":":
            return None
        name, _, value = body.partition(b":")
        if name == b"data":
            if value[:1] == b" ":
                value = value[1:]
            if self._data is None:
                self._data = [value]
            else:
                self._data.append(value)
        return None

    @property
    def open(self) -> bool:
        """Whether the event being read has data lines (it is not ended yet)."""
        return self._data is not None


def cut_at_line_end(buffer: bytes) -> int:
    """The length of ``buffer``'s complete lines: up to its last CR or LF (0 if none)."""
    return max(buffer.rfind(b"\n"), buffer.rfind(b"\r")) + 1


class SSEReader:
    """An SSE body read in pieces as they arrive: the data of the events each piece completes.

    A line cut between two pieces waits for its end; an event the body ends before its blank
    line is never dispatched (as :class:`SSEEvents`).
    """

    __slots__ = ("_events", "_pending")

    def __init__(self) -> None:
        self._events = SSEEvents()
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Take the next piece; the data of every event it completes, in order."""
        pending = self._pending + data if self._pending else data
        cut = cut_at_line_end(pending)
        self._pending = pending[cut:]
        found: list[bytes] = []
        for line in pending[:cut].splitlines(keepends=True):
            event = self._events.line(line)
            if event is not None:
                found.append(event)
        return found
