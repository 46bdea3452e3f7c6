# What an MCP client asks for in one streamable-HTTP POST: JSON-RPC 2.0, a single
# message or (before protocol 2026-07-28) a batch array. Each `tools/call` request is
# one billable call of its tool; every other message is counted by method, never billed.
# Nothing here raises on what a client sends: bad input becomes flags on the result,
# and the body is forwarded as is. Sessions exist only in the handshake protocols (up
# to 2025-11-25): an `initialize` answered with an Mcp-Session-Id.
from __future__ import annotations

from typing import Any

import msgspec

# Bodies beyond this are not parsed (the proxy's own body limit still applies); the
# request is flagged `oversized` and metered with what is known: nothing.
MCP_BODY_MAX_BYTES = 4 * 1024 * 1024
# Tool names are 1 to 128 characters (MCP tool naming); a longer one would make a
# metering dimension out of whatever the client chose to send.
TOOL_NAME_MAX_CHARS = 128
# Session ids are visible ASCII (0x21-0x7E); a UUID or a signed token fits easily.
SESSION_ID_MAX_BYTES = 1024
MCP_SESSION_ID_HEADER = b"mcp-session-id"
MCP_PROTOCOL_VERSION_HEADER = b"mcp-protocol-version"
# The revisions with the `initialize` handshake and sessions. A request naming any other
# in MCP-Protocol-Version (2026-07-28 on) has no session: servers ignore its
# Mcp-Session-Id, and so does metering (servers route on this field, as here).
HANDSHAKE_PROTOCOL_VERSIONS = frozenset((b"2024-11-05", b"2025-03-26", b"2025-06-18", b"2025-11-25"))

TOOLS_CALL = "tools/call"
INITIALIZE = "initialize"
# `responses` counts JSON-RPC responses a client posts back (to a server's sampling,
# elicitation or roots request): messages with no method.
RESPONSE = ""


class ToolCall(msgspec.Struct, frozen=True, gc=False):
    """One `tools/call` request: the tool's name and the JSON-RPC id the server's
    answer will carry (a string or an integer, as the client sent it)."""

    name: str
    request_id: int | str


class McpRequest(msgspec.Struct, frozen=True):
    """Everything metering needs from one POST body.

    `tool_calls`: each well-formed `tools/call` request, in body order.
    `method_counts`: every other message by method (`initialize`, `tools/list`,
    `notifications/initialized`, ...; client responses under RESPONSE, "").
    `session_id`: the request's Mcp-Session-Id, None when absent, not a valid id, or
    the request is `sessionless`.
    `sessionless`: the request names a protocol without sessions (2026-07-28 on).
    Flags: `malformed` (not UTF-8 JSON), `oversized` (over MCP_BODY_MAX_BYTES, not
    parsed), `batch` (the body was an array), `invalid_messages` (messages that are no
    JSON-RPC 2.0 request, notification or response, e.g. a `tools/call` without an
    id), `nameless_tool_calls` (`tools/call` requests whose `params.name` is not a
    string of 1 to TOOL_NAME_MAX_CHARS characters), `invalid_session_id`.
    """

    tool_calls: tuple[ToolCall, ...] = ()
    method_counts: dict[str, int] = {}
    session_id: str | None = None
    sessionless: bool = False
    malformed: bool = False
    oversized: bool = False
    batch: bool = False
    invalid_messages: int = 0
    nameless_tool_calls: int = 0
    invalid_session_id: bool = False

    @property
    def flagged(self) -> bool:
        """True when anything in the request could not be read as MCP."""
        return (self.malformed or self.oversized or self.invalid_messages > 0
                or self.nameless_tool_calls > 0 or self.invalid_session_id)

    @property
    def initializes(self) -> bool:
        """True when the body holds an `initialize` request (a session may start)."""
        return INITIALIZE in self.method_counts


class _Message(msgspec.Struct):
    # Only what metering reads; `params` stays raw so tool arguments (often the bulk of
    # the body) are skipped, not built into Python objects.
    jsonrpc: Any = None
    method: Any = None
    id: Any = msgspec.UNSET
    params: msgspec.Raw = msgspec.Raw(b"")
    result: msgspec.Raw = msgspec.Raw(b"")
    error: msgspec.Raw = msgspec.Raw(b"")


class _ToolCallParams(msgspec.Struct):
    name: Any = None


_BODY = msgspec.json.Decoder(list[msgspec.Raw] | _Message)
_MESSAGE = msgspec.json.Decoder(_Message)
_TOOL_CALL_PARAMS = msgspec.json.Decoder(_ToolCallParams)


def read_mcp_request(body: bytes, session_id: bytes | None, protocol_version: bytes | None = None) -> McpRequest:
    """The calls in one MCP POST body, with `session_id` and `protocol_version` the raw
    Mcp-Session-Id and MCP-Protocol-Version header values (None when absent).

    Edge cases: an empty body or anything not UTF-8 JSON is `malformed`; valid JSON that is
    not an object or array (`"x"`, `3`) is one invalid message; an empty batch `[]` is
    one invalid message (JSON-RPC 2.0 answers it with a single error); in a batch each
    element stands alone, so one bad element never hides the others' tool calls; an
    id of null, true or 1.5 is invalid (MCP ids are strings or integers), which makes
    a `tools/call` with such an id invalid rather than a call; a body over
    MCP_BODY_MAX_BYTES is `oversized` and not parsed; nesting too deep to follow is
    `malformed`; a protocol version other than HANDSHAKE_PROTOCOL_VERSIONS (2026-07-28,
    or one unknown) makes the request `sessionless`, its session id ignored; no protocol
    version is the handshake era's (2025-03-26 defined none). Never raises.
    """
    sessionless = protocol_version is not None and protocol_version.strip() not in HANDSHAKE_PROTOCOL_VERSIONS
    session, session_invalid = _session_id(None if sessionless else session_id)
    if len(body) > MCP_BODY_MAX_BYTES:
        return McpRequest(session_id=session, sessionless=sessionless, oversized=True,
                          invalid_session_id=session_invalid)
    try:
        # Validated up front: msgspec skips what it does not read (tool arguments)
        # without checking its UTF-8, and a server rejects such a body whole.
        decoded = _BODY.decode(body.decode("utf-8"))
    except (UnicodeDecodeError, RecursionError):
        # RecursionError: nesting deeper than msgspec follows, e.g. 100,000 `[`.
        return McpRequest(session_id=session, sessionless=sessionless, malformed=True,
                          invalid_session_id=session_invalid)
    except msgspec.ValidationError:
        # JSON, but neither an object nor an array at the top.
        return McpRequest(session_id=session, sessionless=sessionless, invalid_messages=1,
                          invalid_session_id=session_invalid)
    except msgspec.DecodeError:
        return McpRequest(session_id=session, sessionless=sessionless, malformed=True,
                          invalid_session_id=session_invalid)

    tally = _Tally()
    if isinstance(decoded, list):
        if not decoded:
            tally.invalid_messages = 1
        for element in decoded:
            try:
                tally.add(_MESSAGE.decode(element))
            except (msgspec.DecodeError, RecursionError):
                tally.invalid_messages += 1
    else:
        tally.add(decoded)
    return McpRequest(
        tool_calls=tuple(tally.tool_calls), method_counts=tally.method_counts,
        session_id=session, sessionless=sessionless, batch=isinstance(decoded, list),
        invalid_messages=tally.invalid_messages, nameless_tool_calls=tally.nameless_tool_calls,
        invalid_session_id=session_invalid,
    )


def session_started(request: McpRequest, response_session_id: bytes | None) -> str | None:
    """The agent session an `initialize` exchange just opened, to be metered once:
    the response's Mcp-Session-Id when `request` held an `initialize` request and the
    id differs from the one the request carried; None otherwise.

    Edge cases: a response to anything but `initialize` never starts a session (servers
    echo the id on every response); an initialize answered without the header (a
    stateless server) starts none; an invalid id in the response starts none; a
    `sessionless` request (2026-07-28 on, which has no `initialize`) starts none.
    """
    if not request.initializes or request.sessionless or response_session_id is None:
        return None
    session, invalid = _session_id(response_session_id)
    if invalid or session == request.session_id:
        return None
    return session


def session_id_header(headers) -> bytes | None:
    """The Mcp-Session-Id value among `headers`, an iterable of (name, value) byte
    pairs in any case; the first one wins, None when there is none."""
    for name, value in headers:
        if len(name) == len(MCP_SESSION_ID_HEADER) and name.lower() == MCP_SESSION_ID_HEADER:
            return value
    return None


class _Tally:
    __slots__ = ("tool_calls", "method_counts", "invalid_messages", "nameless_tool_calls")

    def __init__(self) -> None:
        self.tool_calls: list[ToolCall] = []
        self.method_counts: dict[str, int] = {}
        self.invalid_messages = 0
        self.nameless_tool_calls = 0

    def add(self, message: _Message) -> None:
        if message.jsonrpc != "2.0":
            self.invalid_messages += 1
            return
        method = message.method
        has_id = _valid_id(message.id)
        if method is None:
            # A response: an id and exactly one of result / error (an error may carry
            # a null id when the request's id could not be read).
            answered = bool(message.result) != bool(message.error)
            if answered and (has_id or (bool(message.error) and message.id is None)):
                self._count(RESPONSE)
            else:
                self.invalid_messages += 1
            return
        if not isinstance(method, str) or not method or (message.id is not msgspec.UNSET and not has_id):
            self.invalid_messages += 1
            return
        if method != TOOLS_CALL:
            self._count(method)
            return
        if not has_id:
            self.invalid_messages += 1     # a notification: no server runs or answers it
            return
        name = _tool_name(message.params)
        if name is None:
            self.nameless_tool_calls += 1
        else:
            self.tool_calls.append(ToolCall(name, message.id))

    def _count(self, method: str) -> None:
        self.method_counts[method] = self.method_counts.get(method, 0) + 1


def _valid_id(request_id: Any) -> bool:
    return isinstance(request_id, str) or (isinstance(request_id, int) and not isinstance(request_id, bool))


def _tool_name(params: msgspec.Raw) -> str | None:
    if not params:
        return None
    try:
        name = _TOOL_CALL_PARAMS.decode(params).name
    except (msgspec.DecodeError, RecursionError):
        return None     # params not an object
    if isinstance(name, str) and 0 < len(name) <= TOOL_NAME_MAX_CHARS:
        return name
    return None


def _session_id(value: bytes | None) -> tuple[str | None, bool]:
    # (the id, whether a header was there but unusable)
    if value is None:
        return None, False
    if not value or len(value) > SESSION_ID_MAX_BYTES or not _visible_ascii(value):
        return None, True
    return value.decode("ascii"), False


_VISIBLE_ASCII = bytes(range(0x21, 0x7F))


def _visible_ascii(value: bytes) -> bool:
    return not value.translate(None, _VISIBLE_ASCII)
