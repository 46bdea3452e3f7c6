# Which requests of one MCP POST the server answered `input_required` (multi
# round-trip requests, protocol 2026-07-28): such a `tools/call` has not run yet, the
# client retries it as a new request, and only the round that completes is a call.
# The answer is read as it passes (JSON or SSE), never held back or changed; nothing
# here raises on what a server sends, and what cannot be read defers no call.
from __future__ import annotations

from typing import Any

import msgspec

# Only answers that mention this are decoded; every other byte is only scanned.
INPUT_REQUIRED = b'"input_required"'
# A JSON answer, or one SSE event, longer than this is not read (an InputRequiredResult
# is small; the SDKs' own clients refuse SSE events over 1 MiB).
ANSWER_READ_MAX_BYTES = 1024 * 1024
_JSON = b"application/json"
_EVENT_STREAM = b"text/event-stream"
_CR = b"\r"
_LF = b"\n"


class _Result(msgspec.Struct):
    resultType: Any = None


class _Answer(msgspec.Struct):
    # Only what tells an answer deferred; the rest of the result is skipped unread.
    id: Any = None
    result: _Result | None = None


_ANSWERS = msgspec.json.Decoder(list[msgspec.Raw] | _Answer)
_ANSWER = msgspec.json.Decoder(_Answer)


class AnswerReader:
    """Reads one response to an MCP POST, chunk by chunk, for the ids of the requests
    answered `input_required`.

    `content_type` and `content_encoding` are the response's field values (None when
    absent). A JSON body is kept up to ANSWER_READ_MAX_BYTES and decoded at the end
    when it mentions INPUT_REQUIRED; an SSE stream is read event by event, keeping only
    the event in progress. A body in any other type or encoded (gzip...) is not read.
    """

    __slots__ = ("sse", "readable", "parts", "size", "line", "line_size", "data", "data_size", "event",
                 "cr_pending", "deferred")

    def __init__(self, content_type: bytes | None, content_encoding: bytes | None) -> None:
        media = (content_type or b"").split(b";", 1)[0].strip().lower()
        encoded = content_encoding is not None and content_encoding.strip().lower() not in (b"", b"identity")
        self.sse = media == _EVENT_STREAM
        self.readable = not encoded and (self.sse or media == _JSON)
        self.parts: list[bytes] = []     # JSON: the body so far
        self.size = 0
        self.line: list[bytes] = []      # SSE: the line in progress
        self.line_size = 0
        self.data: list[bytes] = []      # SSE: the data lines of the event in progress
        self.data_size = 0
        self.event = b""
        self.cr_pending = False          # the last chunk ended in CR: a LF next ends no new line
        self.deferred: set = set()

    def feed(self, chunk: bytes) -> None:
        """One more chunk of the response body, as it arrived."""
        if not self.readable or not chunk:
            return
        if self.sse:
            self._feed_sse(chunk)
            return
        self.size += len(chunk)
        if self.size > ANSWER_READ_MAX_BYTES:
            self.readable = False
            self.parts = []
        else:
            self.parts.append(chunk)

    def input_required_ids(self) -> frozenset:
        """The JSON-RPC ids answered `input_required` in the response read so far (a
        stream cut mid-event has its complete events read). Empty when the body was not
        readable, too long, or not JSON-RPC."""
        if self.readable and not self.sse and self.parts:
            body = b"".join(self.parts)
            self.parts = []
            if INPUT_REQUIRED in body:
                self._read_json(body)
        return frozenset(self.deferred)

    def _read_json(self, body: bytes) -> None:
        try:
            decoded = _ANSWERS.decode(body)
        except (msgspec.DecodeError, RecursionError):
            return
        if not isinstance(decoded, list):
            self._answered(decoded)
            return
        for message in decoded:         # a batch's answers (handshake-era servers)
            self._read_message(message)

    def _read_message(self, message: bytes) -> None:
        try:
            self._answered(_ANSWER.decode(message))
        except (msgspec.DecodeError, RecursionError):
            pass

    def _answered(self, answer: _Answer) -> None:
        result = answer.result
        if result is not None and result.resultType == "input_required" and _valid_id(answer.id):
            self.deferred.add(answer.id)

    # -- SSE: lines end in CRLF, LF or CR; a blank line ends an event -------------------
    def _feed_sse(self, chunk: bytes) -> None:
        start = 0
        if self.cr_pending:
            self.cr_pending = False
            if chunk[:1] == _LF:
                start = 1
        end = len(chunk)
        while start < end:
            cr = chunk.find(_CR, start)
            lf = chunk.find(_LF, start)
            if cr < 0 and lf < 0:
                self._line_part(chunk, start, end)
                return
            stop = lf if cr < 0 or (0 <= lf < cr) else cr
            self._line_part(chunk, start, stop)
            self._line_done()
            start = stop + 1
            if stop == cr:
                if start == end:
                    self.cr_pending = True
                elif chunk[start:start + 1] == _LF:
                    start += 1

    def _line_part(self, chunk: bytes, start: int, stop: int) -> None:
        if stop <= start:
            return
        self.line_size += stop - start
        if self.line_size <= ANSWER_READ_MAX_BYTES:
            self.line.append(chunk[start:stop] if start or stop < len(chunk) else chunk)

    def _line_done(self) -> None:
        too_long = self.line_size > ANSWER_READ_MAX_BYTES
        line = b"".join(self.line)
        self.line = []
        self.line_size = 0
        if not line and not too_long:
            self._event_done()
            return
        field, colon, value = line.partition(b":")
        if not colon:
            value = b""
        elif value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self.data_size += len(value) + 1 if not too_long else ANSWER_READ_MAX_BYTES + 1
            if self.data_size <= ANSWER_READ_MAX_BYTES:
                self.data.append(value)
            else:
                self.data = []
        elif field == b"event":
            self.event = value

    def _event_done(self) -> None:
        data, size, event = self.data, self.data_size, self.event
        self.data, self.data_size, self.event = [], 0, b""
        if not data or size > ANSWER_READ_MAX_BYTES or event not in (b"", b"message"):
            return
        message = b"\n".join(data)
        if INPUT_REQUIRED in message:
            self._read_message(message)


def _valid_id(request_id: Any) -> bool:
    return isinstance(request_id, str) or (isinstance(request_id, int) and not isinstance(request_id, bool))
