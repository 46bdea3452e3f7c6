# Metering of one MCP exchange (a route with `mcp`), for clients and servers of either
# protocol generation: the POST body is read whole before it is forwarded, unchanged;
# its `tools/call` requests count one call per tool once the server accepted the POST
# (a server refusing a batch runs none of it), except a call the server answered
# `input_required` (2026-07-28 multi round-trip: the client's retry is the call). An
# `initialize` answered with a new Mcp-Session-Id counts one agent session; requests
# of protocol 2026-07-28 have no session, so they count none. A body that is not MCP
# is forwarded as it is and flagged.
from __future__ import annotations

from collections import Counter

from proxy.headers import field_value, without_fields
from proxy.mcp_answers import AnswerReader
from proxy.mcp_calls import MCP_PROTOCOL_VERSION_HEADER, MCP_SESSION_ID_HEADER, read_mcp_request, session_started
from proxy.meter_event import MeterEvent, new_event_id

ACCEPTED_BELOW = 400
_CONTENT_TYPE = b"content-type"
_CONTENT_ENCODING = b"content-encoding"
_ENCODINGS = frozenset((b"accept-encoding",))


class McpCall:
    """One exchange on a route whose MCP metering is `metering` (config McpMetering)."""

    __slots__ = ("metering", "request", "status", "session", "answer")

    def __init__(self, metering) -> None:
        self.metering = metering
        self.request = None
        self.status = 0
        self.session = None
        self.answer = None       # an AnswerReader while the response to tool calls passes

    def forwarded(self, body: bytes, headers: list, downgrades: dict | None = None) -> tuple[bytes, list]:
        """What goes upstream: the client's body, unchanged (a POST's JSON-RPC body is
        read here; model downgrades do not apply to MCP), and its fields, without
        Accept-Encoding when the body calls tools (their answer is read as it passes)."""
        if body:
            self.request = read_mcp_request(body, field_value(headers, MCP_SESSION_ID_HEADER),
                                            field_value(headers, MCP_PROTOCOL_VERSION_HEADER))
            if self.request.tool_calls:
                headers = without_fields(headers, _ENCODINGS)
        return body, headers

    def reservations(self) -> tuple[tuple[str, int], ...]:
        """What to count against quotas before forwarding, as (metric, units): the
        tool calls in the body, and 0 agent sessions (finish() settles both)."""
        calls = len(self.request.tool_calls) if self.request is not None else 0
        return (self.metering.tool_metric, calls), (self.metering.session_metric, 0)

    def response_fields(self) -> list:
        """Nothing to add to the client's response."""
        return []

    def missing_feature(self, features: frozenset) -> str | None:
        """Why the call may not go on for a customer whose plan has `features`: a
        sentence naming the first tool called whose required feature is missing;
        None when every tool called is allowed."""
        required = self.metering.tool_features
        if self.request is None or not required:
            return None
        for call in self.request.tool_calls:
            for feature in required.get(call.name, ()):
                if feature not in features:
                    return f"tool `{call.name}` needs feature `{feature}`, which is not in the customer's plan"
        return None

    def response_started(self, status: int, headers: list) -> None:
        """The response head arrived: its `status` and header field parts."""
        self.status = status
        request = self.request
        if request is not None and status < ACCEPTED_BELOW:
            self.session = session_started(request, field_value(headers, MCP_SESSION_ID_HEADER))
            if request.tool_calls:
                self.answer = AnswerReader(field_value(headers, _CONTENT_TYPE),
                                           field_value(headers, _CONTENT_ENCODING))

    def response_chunk(self, chunk: bytes) -> None:
        """A chunk of the response body: read only for tool calls answered
        `input_required`."""
        if self.answer is not None:
            self.answer.feed(chunk)

    def finish(self, customer_id: str, timestamp: float, route: str, status: int, request_bytes: int,
               response_bytes: int, latency_ms: float) -> tuple[dict[str, str] | None, list[MeterEvent]]:
        """The exchange is complete (or cut: what was answered so far counts): the
        dimensions of its own meter event (the `mcp_session`, and `mcp_flags` when the
        body was not all MCP) and one event per tool called (quantity: its calls, less
        those answered `input_required`), plus one for a session it opened."""
        request = self.request
        if request is None:
            return None, []
        dimensions = {}
        if request.session_id is not None:
            dimensions["mcp_session"] = request.session_id
        if request.flagged:
            flags = [name for name in ("malformed", "oversized", "invalid_session_id") if getattr(request, name)]
            flags += [name for name in ("invalid_messages", "nameless_tool_calls") if getattr(request, name)]
            dimensions["mcp_flags"] = ",".join(flags)
        events = []
        if self.status and self.status < ACCEPTED_BELOW:
            deferred = self.answer.input_required_ids() if self.answer is not None else ()
            made = (call.name for call in request.tool_calls if call.request_id not in deferred)
            for tool, calls in Counter(made).items():
                events.append(MeterEvent(new_event_id(), customer_id, self.metering.tool_metric, calls, timestamp,
                                         route, status, request_bytes, response_bytes, latency_ms,
                                         {**dimensions, "tool": tool}))
        if self.session is not None:
            events.append(MeterEvent(new_event_id(), customer_id, self.metering.session_metric, 1, timestamp, route,
                                     status, request_bytes, response_bytes, latency_ms,
                                     {"mcp_session": self.session}))
        return dimensions or None, events
