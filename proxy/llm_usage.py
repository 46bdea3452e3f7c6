# cython: annotation_typing=False
# Token usage of LLM API calls, read from request and response bodies as they pass.
# Rules: no I/O and no exception for anything a client or an upstream sent (a problem
# becomes a flag on the result); response chunks are observed, never changed or held.
# Compiled by Cython at install (llm_usage.pxd types the response reader); the
# annotations here are for readers, not C types, so a bytearray is still accepted.
"""Request facts, two request rewrites and response usage for three LLM wire formats.

Wire formats (`WIRE_FORMATS`): `openai_chat` (POST /v1/chat/completions),
`openai_responses` (POST /v1/responses) and `anthropic_messages` (POST /v1/messages).

Token counts in `TokenUsage` partition the tokens of a call: every token the
upstream billed is counted in exactly one field, so a price per field charges each
token once, whatever the upstream's own convention:

- `input_tokens`: input read at the full input rate (neither read from nor written
  to a prompt cache). OpenAI reports `prompt_tokens` / `input_tokens` *including*
  cached tokens, so this is that figure minus `cached_tokens`; Anthropic reports
  `input_tokens` already *excluding* cache reads and writes, so it is taken as is.
- `cached_tokens`: input read from the prompt cache (OpenAI
  `*_tokens_details.cached_tokens`, Anthropic `cache_read_input_tokens`).
- `cache_write_tokens`: input written to the prompt cache (Anthropic
  `cache_creation_input_tokens`; always 0 for OpenAI, which does not bill writes).
- `output_tokens`: output other than reasoning. OpenAI's `completion_tokens` /
  `output_tokens` *include* reasoning tokens, so this is that figure minus
  `reasoning_tokens`; Anthropic's `output_tokens` is taken as is (it includes
  extended-thinking tokens, which Anthropic does not report apart).
- `reasoning_tokens`: OpenAI `*_tokens_details.reasoning_tokens`; 0 for Anthropic.

Prompt size as the upstream saw it = input + cached + cache_write; output it billed
= output + reasoning; `total_tokens` is the sum of all five.
"""
from __future__ import annotations

import re
from typing import Annotated, Any

import cython
import msgspec

from config.values import MAX_EVENT_QUANTITY

OPENAI_CHAT = "openai_chat"
OPENAI_RESPONSES = "openai_responses"
ANTHROPIC_MESSAGES = "anthropic_messages"
WIRE_FORMATS = frozenset((OPENAI_CHAT, OPENAI_RESPONSES, ANTHROPIC_MESSAGES))

# Beyond this a JSON response body (or one SSE line) is no longer kept: the reader
# stops reading it and flags `too_large`.
MAX_BODY_BYTES = 4 * 1024 * 1024

# Flags. Request side: the body is not a JSON object, the format is unknown, the
# model is missing or not a string, the token limit is not a whole number >= 0.
# Response side: no usage was found, the body (or an event) is not the JSON
# expected, the body or stream ended early, the body or a line passed the cap, the
# upstream answered with an error, the counts contradict each other (more cached
# than input tokens, more reasoning than output tokens; clamped to 0), a count is
# beyond what one event may carry (config.values.MAX_EVENT_QUANTITY: not metered, so
# it can never stall the meter or a quota counter).
MALFORMED = "malformed"
UNKNOWN_FORMAT = "unknown_format"
NO_MODEL = "no_model"
BAD_MAX_TOKENS = "bad_max_tokens"
NO_USAGE = "no_usage"
TRUNCATED = "truncated"
TOO_LARGE = "too_large"
IMPLAUSIBLE = "implausible_count"
ERROR = "error"
INCONSISTENT = "inconsistent"


class LlmRequest(msgspec.Struct, frozen=True):
    """What a request body says about the call it asks for.

    `model`: the top-level `model` string, None when absent or not a string.
    `max_tokens`: the output limit the client set (`max_completion_tokens`, else
    `max_tokens` for OpenAI chat; `max_output_tokens` for OpenAI responses;
    `max_tokens` for Anthropic), None when absent or invalid. `stream`: the body has
    `"stream": true`. `flags`: sorted names of what was wrong (empty when nothing).
    """

    model: str | None
    max_tokens: int | None
    stream: bool
    flags: tuple[str, ...] = ()


class TokenUsage(msgspec.Struct, frozen=True):
    """Tokens one call used, as partitioned in this module's docstring, and the model
    the upstream says answered (None when it did not say). Counts not reported are 0;
    `flags` (sorted) say why some may be missing."""

    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0
    flags: tuple[str, ...] = ()

    @property
    def total_tokens(self) -> int:
        return (self.input_tokens + self.output_tokens + self.cached_tokens
                + self.reasoning_tokens + self.cache_write_tokens)


# -- request side -------------------------------------------------------------------------

class _RequestFields(msgspec.Struct):
    # Only the fields read here are built; msgspec checks and skips the rest
    # (messages, tools...) without materialising them.
    model: Any = None
    stream: Any = None
    max_tokens: Any = None
    max_completion_tokens: Any = None
    max_output_tokens: Any = None


_REQUEST_DECODER = msgspec.json.Decoder(_RequestFields)


def _token_limit(value: Any) -> int | None:
    if type(value) is int and value >= 0:
        return value
    return None


def read_request(wire_format: str, body: bytes) -> LlmRequest:
    """Model, token limit and stream flag of a request body in `wire_format`.

    Never raises: a body that is not a JSON object gives `LlmRequest(None, None,
    False, ("malformed",))`; an unknown format gives the `unknown_format` flag and
    nothing read; a missing or non-string model flags `no_model`; a token limit that
    is present but not a whole number >= 0 (or null) flags `bad_max_tokens` and reads
    as None.
    """
    if wire_format not in WIRE_FORMATS:
        return LlmRequest(None, None, False, (UNKNOWN_FORMAT,))
    try:
        fields = _REQUEST_DECODER.decode(body)
    except (msgspec.DecodeError, TypeError):
        return LlmRequest(None, None, False, (MALFORMED,))
    flags = []
    model = fields.model if type(fields.model) is str else None
    if model is None:
        flags.append(NO_MODEL)
    if wire_format == OPENAI_CHAT:
        limit = fields.max_completion_tokens
        if limit is None:
            limit = fields.max_tokens
    elif wire_format == OPENAI_RESPONSES:
        limit = fields.max_output_tokens
    else:
        limit = fields.max_tokens
    max_tokens = _token_limit(limit)
    if limit is not None and max_tokens is None:
        flags.append(BAD_MAX_TOKENS)
    return LlmRequest(model, max_tokens, fields.stream is True, tuple(sorted(flags)))


# A scanner for the members of one JSON object, used to splice values in place. It
# runs only on bodies msgspec has already accepted as JSON, so it may assume valid
# syntax; it jumps between interesting bytes with regexes rather than walking bytes.
_WHITESPACE = re.compile(rb"[ \t\r\n]*")
_STRING_STOP = re.compile(rb'["\\]')
_CONTAINER_STOP = re.compile(rb'["\[\]{}]')
_SCALAR = re.compile(rb"[^,}\]\s]*")
_STRING_DECODER = msgspec.json.Decoder(str)


def _skip_ws(body: bytes, at: int) -> int:
    return _WHITESPACE.match(body, at).end()


def _string_end(body: bytes, at: int) -> int:
    """Index just past the string whose opening quote is at `at`."""
    at += 1
    while True:
        stop = _STRING_STOP.search(body, at)
        if body[stop.start()] == 0x22:  # '"'
            return stop.start() + 1
        at = stop.start() + 2  # a backslash escapes the next byte


def _value_end(body: bytes, at: int) -> int:
    """Index just past the JSON value starting at `at` (no leading whitespace)."""
    first = body[at]
    if first == 0x22:
        return _string_end(body, at)
    if first != 0x7B and first != 0x5B:  # neither '{' nor '['
        return _SCALAR.match(body, at).end()
    depth = 0
    while True:
        stop = _CONTAINER_STOP.search(body, at)
        at = stop.start()
        byte = body[at]
        if byte == 0x22:
            at = _string_end(body, at)
            continue
        depth += 1 if byte in b"[{" else -1
        at += 1
        if depth == 0:
            return at


def _members(body: bytes, at: int) -> list[tuple[str, int, int]]:
    """(key, value start, value end) of each member of the object starting at `at`
    (an opening brace), in order, duplicates included."""
    members = []
    at = _skip_ws(body, at + 1)
    if body[at] == 0x7D:  # '}'
        return members
    while True:
        key_end = _string_end(body, at)
        token = body[at:key_end]
        key = _STRING_DECODER.decode(token) if b"\\" in token else token[1:-1].decode()
        value_start = _skip_ws(body, _skip_ws(body, key_end) + 1)  # past ':'
        value_end = _value_end(body, value_start)
        members.append((key, value_start, value_end))
        at = _skip_ws(body, value_end)
        if body[at] == 0x7D:
            return members
        at = _skip_ws(body, at + 1)  # past ','


def _top_level_members(body: bytes) -> list[tuple[str, int, int]] | None:
    """Members of the body's top-level object; None when the body is not a JSON
    object."""
    try:
        fields = _REQUEST_DECODER.decode(body)  # validates the whole body
    except (msgspec.DecodeError, TypeError):
        return None
    del fields
    return _members(body, _skip_ws(body, 0))


def _splice(body: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    parts = []
    last = 0
    for start, end, replacement in sorted(edits):
        parts.append(body[last:start])
        parts.append(replacement)
        last = end
    parts.append(body[last:])
    return b"".join(parts)


def with_model(body: bytes, model: str) -> bytes | None:
    """The body with the top-level `model` string replaced by `model`, every other
    byte unchanged (a `model` key nested in messages or tools is left alone; a key
    spelt with escapes, such as "mod\\u0065l", counts as `model`).

    When the top-level object repeats the key, every occurrence is replaced, so no
    JSON parser (first or last occurrence wins) sees the old model. Returns None when
    the body is not a JSON object, has no top-level `model`, or has one whose value is
    not a string.
    """
    members = _top_level_members(bytes(body))
    if members is None:
        return None
    body = bytes(body)
    spans = [(start, end) for key, start, end in members if key == "model"]
    if not spans or any(body[start] != 0x22 for start, _ in spans):
        return None
    replacement = msgspec.json.encode(model)
    return _splice(body, [(start, end, replacement) for start, end in spans])


_INCLUDE_USAGE = b'"include_usage":true'


class _StreamFields(msgspec.Struct):
    stream: Any = None
    stream_options: Any = msgspec.UNSET  # UNSET: the key is absent (null reads as None)


_STREAM_DECODER = msgspec.json.Decoder(_StreamFields)


def ask_for_usage(wire_format: str, body: bytes) -> bytes:
    """For a streamed OpenAI chat request, the body with
    `stream_options.include_usage = true` set, so that the stream ends with its
    usage; the client's other stream options are kept and every other byte is
    unchanged.

    The client then receives one extra chunk before `data: [DONE]`, with an empty
    `choices` list and the `usage`, and every chunk carries `"usage": null`; the
    OpenAI SDKs accept both (they expose the chunk with `usage` set).

    The body comes back unchanged for other formats, for requests that do not stream
    or already ask for usage, for bodies that are not a JSON object, and when
    `stream_options` is neither an object nor null (the upstream will reject it).
    Only OpenAI chat needs asking: the responses API and Anthropic always stream
    their usage.
    """
    if wire_format != OPENAI_CHAT:
        return body
    data = bytes(body)
    try:
        fields = _STREAM_DECODER.decode(data)  # validates the whole body
    except (msgspec.DecodeError, TypeError):
        return body
    # A repeated key reads as its last occurrence, as a JSON parser takes it.
    if fields.stream is not True:
        return body
    if fields.stream_options is msgspec.UNSET:
        # The usual request: no stream options yet, so no member needs finding.
        opening = _skip_ws(data, 0)
        return _splice(data, [(opening + 1, opening + 1, b'"stream_options":{%s},' % _INCLUDE_USAGE)])
    members = _members(data, _skip_ws(data, 0))
    options = [(start, end) for key, start, end in members if key == "stream_options"]
    edits = []
    for start, end in options:
        value = data[start:end]
        if value == b"null":
            edits.append((start, end, b"{%s}" % _INCLUDE_USAGE))
            continue
        if data[start] != 0x7B:
            return body
        inner = _members(data, start)
        flags = [(s, e) for key, s, e in inner if key == "include_usage"]
        if flags:
            if all(data[s:e] == b"true" for s, e in flags):
                continue
            edits.extend((s, e, b"true") for s, e in flags)
        else:
            edits.append((start + 1, start + 1, _INCLUDE_USAGE + (b"," if inner else b"")))
    if not edits:
        return body
    return _splice(data, edits)


# -- response side ------------------------------------------------------------------------

_Count = Annotated[int, msgspec.Meta(ge=0)]


class _InputDetails(msgspec.Struct):
    cached_tokens: _Count | None = None


class _OutputDetails(msgspec.Struct):
    reasoning_tokens: _Count | None = None


class _ChatUsage(msgspec.Struct):
    prompt_tokens: _Count | None = None
    completion_tokens: _Count | None = None
    prompt_tokens_details: _InputDetails | None = None
    completion_tokens_details: _OutputDetails | None = None


class _ChatBody(msgspec.Struct):
    # A chat completion, a streamed chunk, or an error body.
    model: Any = None
    usage: _ChatUsage | None = None
    error: Any = None


class _ResponsesUsage(msgspec.Struct):
    input_tokens: _Count | None = None
    output_tokens: _Count | None = None
    input_tokens_details: _InputDetails | None = None
    output_tokens_details: _OutputDetails | None = None


class _Response(msgspec.Struct):
    model: Any = None
    status: Any = None
    usage: _ResponsesUsage | None = None
    error: Any = None


class _ResponsesEvent(msgspec.Struct):
    type: Any = None
    response: _Response | None = None


class _AnthropicUsage(msgspec.Struct):
    input_tokens: _Count | None = None
    output_tokens: _Count | None = None
    cache_read_input_tokens: _Count | None = None
    cache_creation_input_tokens: _Count | None = None


class _AnthropicMessage(msgspec.Struct):
    # A message, or an error body ({"type": "error", "error": {...}}).
    type: Any = None
    model: Any = None
    usage: _AnthropicUsage | None = None
    error: Any = None


class _AnthropicEvent(msgspec.Struct):
    type: Any = None
    message: _AnthropicMessage | None = None
    usage: _AnthropicUsage | None = None


_CHAT_DECODER = msgspec.json.Decoder(_ChatBody)
_RESPONSE_DECODER = msgspec.json.Decoder(_Response)
_RESPONSES_EVENT_DECODER = msgspec.json.Decoder(_ResponsesEvent)
_ANTHROPIC_MESSAGE_DECODER = msgspec.json.Decoder(_AnthropicMessage)
_ANTHROPIC_EVENT_DECODER = msgspec.json.Decoder(_AnthropicEvent)

# Responses stream events that end a response and carry its usage.
_RESPONSES_FINAL = frozenset((b"response.completed", b"response.incomplete", b"response.failed"))
_ANTHROPIC_USAGE_EVENTS = frozenset((b"message_start", b"message_delta"))
_EVENT_NAME_MARKER = re.compile(rb'"type"\s*:\s*"([a-z_.]+)"')


# What an SSE event must contain to matter, per format (see UsageReader._markers): an
# event without any of these leaves the reader as it was, so it need not be read.
# OpenAI chat (once the model is known): usage, an error, the end. Responses: the
# final events and errors. Anthropic: the events with usage, the end, errors.
_CHAT_MARKERS = (b'"prompt_tokens"', b'"error"', b"[DONE]")
_RESPONSES_MARKERS = (b"response.completed", b"response.incomplete", b"response.failed", b"error")
_ANTHROPIC_MARKERS = (b"message_start", b"message_delta", b"message_stop", b"error")


def _find(chunk: bytes, marker: bytes, at: int, end: int) -> int:
    """chunk.find(marker, at, end) (compiled: memmem, without boxing the indexes)."""
    if cython.compiled:                                 # C names from llm_usage.pxd
        size = len(marker)
        if end - at < size:
            return -1
        data = PyBytes_AS_STRING(chunk)  # noqa: F821
        found = memmem(data + at, end - at, PyBytes_AS_STRING(marker), size)  # noqa: F821
        return -1 if found == cython.NULL else cython.cast(cython.p_char, found) - data
    return chunk.find(marker, at, end)


def _event_end(chunk: bytes, at: int, end: int) -> int:
    """Index just past the first empty line (the end of an SSE event) found in
    chunk[at:end], else `end`. `at` need not be at a line start."""
    if cython.compiled:
        # Each line end in turn: the first followed by "\n" or "\r\n" ends the event.
        data = PyBytes_AS_STRING(chunk)  # noqa: F821
        while at < end:
            found = memchr(data + at, 10, end - at)  # noqa: F821
            if found == cython.NULL:
                return end
            at = cython.cast(cython.p_char, found) - data
            if at + 1 < end and data[at + 1] == 10:
                return at + 2
            if at + 2 < end and data[at + 1] == 13 and data[at + 2] == 10:
                return at + 3
            at += 1
        return end
    lf = chunk.find(b"\n\n", at, end)
    crlf = chunk.find(b"\n\r\n", at, end)
    if lf < 0:
        return end if crlf < 0 else crlf + 3
    if crlf < 0 or lf < crlf:
        return lf + 2
    return crlf + 3


def _last_event_end(chunk: bytes, at: int, end: int) -> int:
    """Index just past the last empty line found in chunk[at:end], else `at`; `at` is
    at a line start."""
    if cython.compiled:
        # Each line end from the last back: the first that closes "\n\n" or "\n\r\n".
        data = PyBytes_AS_STRING(chunk)  # noqa: F821
        last = end
        while last > at:
            found = memrchr(data + at, 10, last - at)  # noqa: F821
            if found == cython.NULL:
                return at
            last = cython.cast(cython.p_char, found) - data
            if last - 1 >= at and data[last - 1] == 10:
                return last + 1
            if last - 2 >= at and data[last - 1] == 13 and data[last - 2] == 10:
                return last + 1
        return at
    lf = chunk.rfind(b"\n\n", at, end)
    crlf = chunk.rfind(b"\n\r\n", at, end)
    return max(at, lf + 2 if lf >= 0 else at, crlf + 3 if crlf >= 0 else at)


def _is_event_stream(content_type: str | None) -> bool:
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


class UsageReader:
    """Reads the token usage of one response while its body passes to the client.

    `UsageReader(wire_format, content_type, status=None)`: `content_type` is the
    response's Content-Type (`text/event-stream` is read as SSE, anything else as
    one JSON body); a `status` of 400 or more flags `error`. Call `feed(chunk)` with
    each body chunk (decoded from its transfer coding, not compressed) as it goes to
    the client, then `finish()` once at the end of the body.

    `feed` only observes: it never changes a chunk, never raises and keeps little:
    for SSE, at most the current unfinished line and event; for JSON, the body up to
    `MAX_BODY_BYTES` (beyond, it stops keeping and flags `too_large`). SSE events are
    JSON-decoded only when they can carry usage or a model (told by event name or a
    substring), and runs of events that cannot are stepped over whole, so the cost
    per chunk is a few byte searches.
    """

    __slots__ = ("_format", "_sse", "_flags", "_parts", "_kept", "_line", "_line_bytes",
                 "_event", "_data", "_data_bytes", "_model", "_done", "_usage", "_dropped", "_finished")

    def __init__(self, wire_format: str, content_type: str | None, status: int | None = None):
        self._format = wire_format
        self._sse = _is_event_stream(content_type)
        self._flags: set[str] = set()
        if wire_format not in WIRE_FORMATS:
            self._flags.add(UNKNOWN_FORMAT)
        if status is not None and status >= 400:
            self._flags.add(ERROR)
        self._parts: list[bytes] = []  # JSON body kept so far
        self._kept = 0
        self._line: list[bytes] = []  # SSE: the unfinished line, in pieces
        self._line_bytes = 0
        self._event = b""  # SSE: the current event's name
        self._data: list[bytes] = []  # SSE: the current event's data lines
        self._data_bytes = 0
        self._model: str | None = None
        self._done = False  # SSE: the stream's final event has been seen
        # Counts as the upstream reports them, by field name; later reports win.
        self._usage: dict[str, int] = {}
        self._dropped = False  # stopped reading (too large or unknown format)
        self._finished: TokenUsage | None = None

    # -- feeding --------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """Observe the next chunk of the response body. Never raises."""
        if self._dropped or not chunk or self._finished is not None:
            return
        if UNKNOWN_FORMAT in self._flags:
            self._dropped = True
            return
        try:
            if self._sse:
                self._feed_sse(bytes(chunk))
            else:
                self._feed_json(bytes(chunk))
        except Exception:  # noqa: BLE001 - the response must flow whatever happens here
            self._flags.add(MALFORMED)
            self._dropped = True

    def _feed_json(self, chunk: bytes) -> None:
        self._kept += len(chunk)
        if self._kept > MAX_BODY_BYTES:
            self._flags.add(TOO_LARGE)
            self._parts = []
            self._dropped = True
            return
        self._parts.append(chunk)

    def _feed_sse(self, chunk: bytes) -> None:
        # Whole events that cannot change what is read (no marker of this format in
        # them, see _markers) are stepped over with a few bytes.find calls; the rest
        # is read line by line. Only a chunk that starts between events may be
        # stepped over, and never past the event a marker is in, so what is read
        # is exactly what reading every line would give.
        at = 0
        end = len(chunk)
        if end > MAX_BODY_BYTES:  # an event this long must be read to be found too large
            self._feed_lines(chunk, 0, end)
            return
        while at < end:
            if self._line or self._data or self._event:
                # Inside an event: read it to its end first.
                stop = _event_end(chunk, at, end)
                self._feed_lines(chunk, at, stop)
                at = stop
                continue
            markers = self._markers()
            if markers is None:
                # Every event may matter: read the next one.
                stop = _event_end(chunk, at, end)
                self._feed_lines(chunk, at, stop)
                at = stop
                continue
            first = end
            for marker in markers:
                found = _find(chunk, marker, at, first)
                if found >= 0:
                    first = found
            skip = _last_event_end(chunk, at, first)
            if first == end:
                self._feed_lines(chunk, skip, end)
                return
            stop = _event_end(chunk, first, end)
            self._feed_lines(chunk, skip, stop)
            at = stop

    def _markers(self) -> tuple[bytes, ...] | None:
        """Bytes without which an event changes nothing for this reader now (None:
        any event may change something, so each is read)."""
        if self._format == OPENAI_CHAT:
            # As _chat_event: once the model is known, only usage, errors and the end.
            return None if self._model is None else _CHAT_MARKERS
        if self._format == OPENAI_RESPONSES:
            return _RESPONSES_MARKERS
        return _ANTHROPIC_MARKERS

    def _feed_lines(self, chunk: bytes, at: int, end: int) -> None:
        # Reads chunk[at:end] line by line; an unfinished last line is kept.
        while at < end:
            newline = _find(chunk, b"\n", at, end)
            if newline < 0:
                self._line.append(chunk[at:end] if at or end < len(chunk) else chunk)
                self._line_bytes += end - at
                if self._line_bytes > MAX_BODY_BYTES:
                    self._flags.add(TOO_LARGE)
                    self._line = []
                    self._dropped = True
                return
            if self._line:
                self._line.append(chunk[at:newline])
                line = b"".join(self._line)
                self._line = []
                self._line_bytes = 0
            else:
                line = chunk[at:newline]
            self._sse_line(line)
            at = newline + 1

    def _sse_line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            self._dispatch()
        elif line.startswith(b"data:"):
            self._data_bytes += len(line)
            if self._data_bytes > MAX_BODY_BYTES:
                self._flags.add(TOO_LARGE)
                self._data = []
                self._dropped = True
                return
            self._data.append(line[6:] if line.startswith(b"data: ") else line[5:])
        elif line.startswith(b"event:"):
            self._event = line[6:].strip()
        # Comments (":...") and other fields (id, retry) say nothing about usage.

    def _dispatch(self) -> None:
        data = self._data
        event = self._event
        self._data = []
        self._data_bytes = 0
        self._event = b""
        if not data:
            return
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        if self._format == OPENAI_CHAT:
            self._chat_event(payload)
        elif self._format == OPENAI_RESPONSES:
            self._responses_event(event, payload)
        else:
            self._anthropic_event(event, payload)

    # -- one SSE event per format -----------------------------------------------------

    def _chat_event(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            self._done = True
            return
        # The first chunk names the model; after it only a chunk with usage or an
        # error is worth decoding.
        if (self._model is not None and b'"prompt_tokens"' not in payload
                and b'"error"' not in payload):
            return
        chunk = self._decode(_CHAT_DECODER, payload)
        if chunk is not None:
            self._read_chat(chunk)

    def _responses_event(self, event: bytes, payload: bytes) -> None:
        if not event:
            found = _EVENT_NAME_MARKER.search(payload)
            event = found.group(1) if found else b""
        if event == b"error":
            self._flags.add(ERROR)
            return
        if event not in _RESPONSES_FINAL:
            return
        self._done = True
        message = self._decode(_RESPONSES_EVENT_DECODER, payload)
        if message is not None and message.response is not None:
            self._read_response(message.response)

    def _anthropic_event(self, event: bytes, payload: bytes) -> None:
        if not event:
            found = _EVENT_NAME_MARKER.search(payload)
            event = found.group(1) if found else b""
        if event == b"message_stop":
            self._done = True
            return
        if event == b"error":
            self._flags.add(ERROR)
            return
        if event not in _ANTHROPIC_USAGE_EVENTS:
            return
        message = self._decode(_ANTHROPIC_EVENT_DECODER, payload)
        if message is None:
            return
        if message.message is not None:
            self._read_anthropic(message.message)
        if message.usage is not None:
            self._read_anthropic_usage(message.usage)

    # -- whole bodies and the usage blocks inside them ----------------------------------

    def _decode(self, decoder: msgspec.json.Decoder, payload: bytes) -> Any:
        try:
            return decoder.decode(payload)
        except msgspec.DecodeError as error:
            self._flags.add(TRUNCATED if "truncated" in str(error) else MALFORMED)
            return None

    def _set_model(self, model: Any) -> None:
        if type(model) is str and model:
            self._model = model

    def _count(self, field: str, value: int | None) -> None:
        if value is not None:
            if value > MAX_EVENT_QUANTITY:
                self._flags.add(IMPLAUSIBLE)
                return
            self._usage[field] = value

    def _read_chat(self, body: _ChatBody) -> None:
        self._set_model(body.model)
        if body.error is not None:
            self._flags.add(ERROR)
        usage = body.usage
        if usage is not None:
            self._read_openai_usage(usage.prompt_tokens, usage.completion_tokens,
                                    usage.prompt_tokens_details, usage.completion_tokens_details)

    def _read_response(self, response: _Response) -> None:
        self._set_model(response.model)
        if response.error is not None or response.status == "failed":
            self._flags.add(ERROR)
        usage = response.usage
        if usage is not None:
            self._read_openai_usage(usage.input_tokens, usage.output_tokens,
                                    usage.input_tokens_details, usage.output_tokens_details)

    def _read_openai_usage(self, input_tokens: int | None, output_tokens: int | None,
                           input_details: _InputDetails | None,
                           output_details: _OutputDetails | None) -> None:
        # Both OpenAI formats: the same counts under other names.
        self._count("input", input_tokens)
        self._count("output", output_tokens)
        if input_details is not None:
            self._count("cached", input_details.cached_tokens)
        if output_details is not None:
            self._count("reasoning", output_details.reasoning_tokens)

    def _read_anthropic(self, message: _AnthropicMessage) -> None:
        self._set_model(message.model)
        if message.type == "error" or message.error is not None:
            self._flags.add(ERROR)
        if message.usage is not None:
            self._read_anthropic_usage(message.usage)

    def _read_anthropic_usage(self, usage: _AnthropicUsage) -> None:
        self._count("input", usage.input_tokens)
        self._count("output", usage.output_tokens)
        self._count("cached", usage.cache_read_input_tokens)
        self._count("cache_write", usage.cache_creation_input_tokens)

    # -- the end ----------------------------------------------------------------------

    def finish(self) -> TokenUsage:
        """The usage read from the whole body. Never raises; calling it again returns
        the same value. Flags: `no_usage` when no usage block was read, `truncated`
        when a stream ended before its final event (`[DONE]`, `response.completed`
        or another final response event, `message_stop`) or a JSON body was cut
        short, and those set while feeding."""
        if self._finished is not None:
            return self._finished
        try:
            self._finish_reading()
        except Exception:  # noqa: BLE001 - metering must not break the response
            self._flags.add(MALFORMED)
        self._finished = self._usage_so_far()
        return self._finished

    def _finish_reading(self) -> None:
        if self._dropped:
            return
        if self._sse:
            if self._line:
                # An unfinished last line: read it, but the stream was cut.
                self._sse_line(b"".join(self._line))
                self._line = []
            self._dispatch()
            if not self._done:
                self._flags.add(TRUNCATED)
            return
        body = b"".join(self._parts)
        self._parts = []
        if not body.strip():
            return
        if self._format == OPENAI_CHAT:
            chat = self._decode(_CHAT_DECODER, body)
            if chat is not None:
                self._read_chat(chat)
        elif self._format == OPENAI_RESPONSES:
            response = self._decode(_RESPONSE_DECODER, body)
            if response is not None:
                self._read_response(response)
        else:
            message = self._decode(_ANTHROPIC_MESSAGE_DECODER, body)
            if message is not None:
                self._read_anthropic(message)

    def _usage_so_far(self) -> TokenUsage:
        usage = self._usage
        flags = self._flags
        if not usage:
            flags.add(NO_USAGE)
        cached = usage.get("cached", 0)
        reasoning = usage.get("reasoning", 0)
        input_tokens = usage.get("input", 0)
        output_tokens = usage.get("output", 0)
        if self._format != ANTHROPIC_MESSAGES:
            # OpenAI counts cached input in its input and reasoning in its output.
            input_tokens -= cached
            output_tokens -= reasoning
            if input_tokens < 0 or output_tokens < 0:
                flags.add(INCONSISTENT)
                input_tokens = max(input_tokens, 0)
                output_tokens = max(output_tokens, 0)
        return TokenUsage(
            model=self._model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_tokens=cached,
            reasoning_tokens=reasoning,
            cache_write_tokens=usage.get("cache_write", 0),
            flags=tuple(sorted(flags)),
        )
