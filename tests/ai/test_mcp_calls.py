# MCP metering reads tool calls and sessions from what clients POST, and which calls
# the server answered `input_required` from what it sends back. First the rules on
# hand-written bodies, then the real `mcp` SDK client against a real MCP server through
# a pass-through that records every exchange, in both protocol generations: the bodies
# and answers it saw must give exactly the per-tool counts the client made, and one
# session per client session where the protocol has sessions (2025-11-25), none where
# it has not (2026-07-28).
import asyncio
import collections
import dataclasses
import json

import aiohttp
import pytest
from aiohttp import web
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import ElicitResult

from bench.mcp_server import CONFIRMED_TOOL, TOOL_NAMES, running_mcp_server
from proxy.mcp_answers import AnswerReader
from proxy.mcp_calls import (
    MCP_BODY_MAX_BYTES,
    RESPONSE,
    TOOL_NAME_MAX_CHARS,
    McpRequest,
    ToolCall,
    read_mcp_request,
    session_id_header,
    session_started,
)

TEST_TIMEOUT_S = 30.0


def _msg(method=None, request_id=None, params=None, **extra):
    message = {"jsonrpc": "2.0", **extra}
    if method is not None:
        message["method"] = method
    if request_id is not None:
        message["id"] = request_id
    if params is not None:
        message["params"] = params
    return message


def _call(name, request_id, arguments=None):
    return _msg("tools/call", request_id, {"name": name, "arguments": arguments or {}})


def _body(value):
    return json.dumps(value).encode()


# -- the rules, on hand-written bodies ---------------------------------------------------

@pytest.mark.parametrize("body, tool_calls, method_counts, flags", [
    # single messages
    (_body(_call("search", 1, {"query": "x" * 1000})), [("search", 1)], {}, {}),
    (_body(_call("fetch", "req-7")), [("fetch", "req-7")], {}, {}),
    (_body(_msg("initialize", 0, {"protocolVersion": "2025-06-18"})), [], {"initialize": 1}, {}),
    # 2026-07-28: each request carries its protocol in `_meta`; a call sent again with
    # the user's answers and the server's state is a request like any other
    (_body(_msg("tools/call", 1, {"name": "add", "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}})),
     [("add", 1)], {}, {}),
    (_body(_msg("tools/call", "r2", {"name": "archive", "inputResponses": {"k": {"action": "accept"}},
                                     "requestState": "v1.x"})), [("archive", "r2")], {}, {}),
    (_body(_msg("server/discover", 1, {"_meta": {}})), [], {"server/discover": 1}, {}),
    (_body(_msg("tools/list", 2)), [], {"tools/list": 1}, {}),
    (_body(_msg("notifications/initialized")), [], {"notifications/initialized": 1}, {}),
    (_body(_msg(request_id=5, result={"content": []})), [], {RESPONSE: 1}, {}),
    (_body(_msg(request_id=None, error={"code": -32700, "message": "x"}, id=None)), [], {RESPONSE: 1}, {}),
    # batches: each element stands alone
    (_body([_call("add", 1), _call("add", 2), _call("search", 3), _msg("notifications/progress")]),
     [("add", 1), ("add", 2), ("search", 3)], {"notifications/progress": 1}, {"batch": True}),
    (_body([_call("add", 1), 7, {"id": 2, "method": "tools/call"}, _call("fetch", 3)]),
     [("add", 1), ("fetch", 3)], {}, {"batch": True, "invalid_messages": 2}),
    (b"[]", [], {}, {"batch": True, "invalid_messages": 1}),
    # tools/call that is no call
    (_body(_msg("tools/call", 1, {"arguments": {}})), [], {}, {"nameless_tool_calls": 1}),
    (_body(_msg("tools/call", 1, {"name": 42})), [], {}, {"nameless_tool_calls": 1}),
    (_body(_msg("tools/call", 1, {"name": ""})), [], {}, {"nameless_tool_calls": 1}),
    (_body(_msg("tools/call", 1, {"name": "t" * (TOOL_NAME_MAX_CHARS + 1)})), [], {}, {"nameless_tool_calls": 1}),
    (_body(_msg("tools/call", 1)), [], {}, {"nameless_tool_calls": 1}),
    (_body(_msg("tools/call", 1, ["add"])), [], {}, {"nameless_tool_calls": 1}),
    (_body(_msg("tools/call", params={"name": "add"})), [], {}, {"invalid_messages": 1}),
    (_body({**_call("add", 1), "id": None}), [], {}, {"invalid_messages": 1}),
    (_body({**_call("add", 1), "id": True}), [], {}, {"invalid_messages": 1}),
    (_body({**_call("add", 1), "id": 1.5}), [], {}, {"invalid_messages": 1}),
    (_body({**_call("add", 1), "jsonrpc": "1.0"}), [], {}, {"invalid_messages": 1}),
    # not JSON-RPC at all
    (_body({"method": "tools/call", "id": 1, "params": {"name": "add"}}), [], {}, {"invalid_messages": 1}),
    (_body(_msg(request_id=1)), [], {}, {"invalid_messages": 1}),
    (_body(_msg(request_id=1, result={}, error={"code": 1})), [], {}, {"invalid_messages": 1}),
    (_body(_msg(123, 1)), [], {}, {"invalid_messages": 1}),
    (b'"tools/call"', [], {}, {"invalid_messages": 1}),
    (b"3", [], {}, {"invalid_messages": 1}),
    (b"null", [], {}, {"invalid_messages": 1}),
    # not JSON
    (b"", [], {}, {"malformed": True}),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call"', [], {}, {"malformed": True}),
    (b'{"jsonrpc": "2.0", "method": "tools/call", "id": 1, "params": {"name": "\xff"}}', [], {}, {"malformed": True}),
    (b'[{"jsonrpc": "2.0", "method": "tools/call", "id": 1, "params": {"name": "add", "arguments": {"a": "\xc3("}}}]',
     [], {}, {"malformed": True}),
    (b"<html>", [], {}, {"malformed": True}),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, [], {}, {"malformed": True}, id="deep-batch"),
    pytest.param(b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "add", "arguments": '
                 + b"[" * 100_000 + b"]" * 100_000 + b"}}", [], {}, {"malformed": True}, id="deep-arguments"),
])
def test_a_body_gives_its_tool_calls_methods_and_flags(body, tool_calls, method_counts, flags):
    request = read_mcp_request(body, b"session-1")
    assert [(call.name, call.request_id) for call in request.tool_calls] == tool_calls
    assert request.method_counts == method_counts
    expected_flags = {"malformed": False, "oversized": False, "batch": False, "invalid_messages": 0,
                      "nameless_tool_calls": 0, "invalid_session_id": False, **flags}
    assert {name: getattr(request, name) for name in expected_flags} == expected_flags
    assert request.flagged == any(value for name, value in flags.items() if name != "batch")
    assert request.session_id == "session-1"


def test_an_oversized_body_is_flagged_and_not_read():
    call = _body(_call("add", 1))
    body = b"[" + b",".join([call] * (MCP_BODY_MAX_BYTES // len(call) + 1)) + b"]"
    assert len(body) > MCP_BODY_MAX_BYTES
    request = read_mcp_request(body, None)
    assert request == McpRequest(oversized=True)
    assert request.flagged


def test_a_batch_of_many_calls_is_counted_call_by_call():
    calls = [_call(TOOL_NAMES[i % 3], i) for i in range(3000)]
    request = read_mcp_request(_body(calls), None)
    assert collections.Counter(call.name for call in request.tool_calls) == {"search": 1000, "fetch": 1000, "add": 1000}
    assert request.tool_calls[-1] == ToolCall("add", 2999)


@pytest.mark.parametrize("header, session_id, invalid", [
    (None, None, False),
    (b"4f1c9a8e2b7d4e0f9a6b3c2d1e0f9a8b", "4f1c9a8e2b7d4e0f9a6b3c2d1e0f9a8b", False),
    (b"a.b-c_d~!", "a.b-c_d~!", False),
    (b"", None, True),
    (b"with space", None, True),
    (b"tab\there", None, True),
    (b"caf\xc3\xa9", None, True),
    (b"x" * 1025, None, True),
])
def test_the_session_id_is_visible_ascii_or_flagged(header, session_id, invalid):
    request = read_mcp_request(_body(_call("add", 1)), header)
    assert (request.session_id, request.invalid_session_id) == (session_id, invalid)
    assert request.tool_calls == (ToolCall("add", 1),)


@pytest.mark.parametrize("protocol_version, sessionless", [
    (None, False),                    # 2025-03-26 and earlier send no version
    (b"2024-11-05", False),
    (b"2025-03-26", False),
    (b"2025-06-18", False),
    (b"2025-11-25", False),
    (b"2026-07-28", True),
    (b"2027-01-01", True),            # unknown: servers answer it as a newer protocol
    (b"nonsense", True),
])
def test_a_request_of_a_protocol_without_sessions_has_none(protocol_version, sessionless):
    initialize = _body(_msg("initialize", 0, {"protocolVersion": "2025-11-25"}))
    request = read_mcp_request(initialize, b"s-1", protocol_version)
    assert request.sessionless == sessionless
    assert request.session_id == (None if sessionless else "s-1")
    assert not request.flagged
    assert session_started(request, b"s-2") == (None if sessionless else "s-2")
    bad = read_mcp_request(_body(_call("add", 1)), b"bad id", protocol_version)
    assert (bad.invalid_session_id, bad.tool_calls) == (not sessionless, (ToolCall("add", 1),))


_INITIALIZE = _body(_msg("initialize", 0, {"protocolVersion": "2025-06-18"}))


@pytest.mark.parametrize("body, request_session, response_session, started", [
    (_INITIALIZE, None, b"s-new", "s-new"),
    (_body([_msg("initialize", 0), _msg("tools/list", 1)]), None, b"s-new", "s-new"),
    (_INITIALIZE, None, None, None),                      # a stateless server
    (_INITIALIZE, b"s-old", b"s-old", None),              # the same session, not a new one
    (_INITIALIZE, b"s-old", b"s-new", "s-new"),           # the server replaced it
    (_INITIALIZE, None, b"bad id", None),
    (_body(_call("add", 1)), b"s-1", b"s-1", None),       # servers echo the id on every response
    (_body(_call("add", 1)), None, b"s-2", None),
    (b"{", None, b"s-3", None),
])
def test_a_session_starts_only_when_an_initialize_is_given_a_new_id(body, request_session, response_session, started):
    assert session_started(read_mcp_request(body, request_session), response_session) == started


@pytest.mark.parametrize("headers, value", [
    ([(b"Content-Type", b"application/json"), (b"Mcp-Session-Id", b"abc")], b"abc"),
    ([(b"MCP-SESSION-ID", b"x"), (b"mcp-session-id", b"y")], b"x"),
    ([(b"Mcp-Session", b"abc"), (b"X-Mcp-Session-Id", b"abc")], None),
    ([], None),
])
def test_the_session_header_is_found_in_any_case(headers, value):
    assert session_id_header(headers) == value


# -- the real SDK client through a recording pass-through --------------------------------

_NOT_FORWARDED = frozenset(("host", "content-length", "transfer-encoding", "connection", "keep-alive"))
MODERN = "2026-07-28"
HANDSHAKE = "2025-11-25"
CLIENT_MODES = {MODERN: "auto", HANDSHAKE: "legacy"}
ARGUMENTS = {"search": {"query": "tools"}, "fetch": {"doc_id": "doc-1"}, "add": {"a": 2, "b": 3},
             CONFIRMED_TOOL: {"doc_id": "doc-2"}}


@dataclasses.dataclass
class Exchange:
    method: str
    body: bytes
    request_session: bytes | None
    response_session: bytes | None = None
    status: int | None = None
    content_type: str = ""
    response_chunks: list[bytes] = dataclasses.field(default_factory=list)

    def tool_calls_made(self):
        """The tool calls of this POST the server did not answer `input_required`."""
        request = read_mcp_request(self.body, self.request_session)
        answer = AnswerReader(self.content_type.encode(), None)
        for chunk in self.response_chunks:
            answer.feed(chunk)
        deferred = answer.input_required_ids()
        return [call for call in request.tool_calls if call.request_id not in deferred]


class RecordingForwarder:
    """Forwards every request to `upstream_url` unchanged and streams each response
    back chunk by chunk as it arrives (SSE included), recording the exchange."""

    def __init__(self, upstream_url):
        self.upstream_url = upstream_url
        self.exchanges = []
        self.url = ""

    async def __aenter__(self):
        self._client = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._forward)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/mcp"
        return self

    async def __aexit__(self, *exc):
        await self._runner.cleanup()
        await self._client.close()

    async def _forward(self, request):
        body = await request.read()
        exchange = Exchange(request.method, body, session_id_header(
            (name.encode(), value.encode()) for name, value in request.headers.items()))
        self.exchanges.append(exchange)
        headers = {name: value for name, value in request.headers.items() if name.lower() not in _NOT_FORWARDED}
        async with self._client.request(request.method, self.upstream_url, headers=headers, data=body,
                                        allow_redirects=False) as upstream:
            exchange.status = upstream.status
            exchange.content_type = upstream.headers.get("Content-Type", "")
            exchange.response_session = session_id_header(
                (name.encode(), value.encode()) for name, value in upstream.headers.items())
            response = web.StreamResponse(status=upstream.status, headers={
                name: value for name, value in upstream.headers.items() if name.lower() not in _NOT_FORWARDED})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                exchange.response_chunks.append(chunk)
                await response.write(chunk)
            await response.write_eof()
            return response


async def _confirm(context, params):
    return ElicitResult(action="accept", content={"confirm": True})


async def _on_progress(progress, total, message):
    """Asking for progress makes the server stream its answers as SSE."""


async def _client_session_calls(url, tool_plan, protocol, *, concurrent):
    """Runs one SDK client session speaking `protocol` that calls each tool of
    `tool_plan` (a list of names); returns the session ids the server gave it."""
    sessions = set()

    async def record_session(response):
        if "mcp-session-id" in response.headers:
            sessions.add(response.headers["mcp-session-id"])

    async with httpx2.AsyncClient(event_hooks={"response": [record_session]}) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=CLIENT_MODES[protocol],
                          elicitation_callback=_confirm) as client:
            assert client.protocol_version == protocol
            calls = [client.call_tool(name, ARGUMENTS[name], progress_callback=_on_progress) for name in tool_plan]
            if concurrent:
                results = await asyncio.gather(*calls)
            else:
                results = [await call for call in calls]
            assert not any(result.is_error for result in results)
    return sessions


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, TEST_TIMEOUT_S))


def _read_posts(exchanges):
    return [(exchange, read_mcp_request(exchange.body, exchange.request_session))
            for exchange in exchanges if exchange.method == "POST"]


@pytest.mark.parametrize("protocol, json_response", [(MODERN, False), (MODERN, True), (HANDSHAKE, False),
                                                     (HANDSHAKE, True)],
                         ids=["2026-sse", "2026-json", "2025-sse", "2025-json"])
@pytest.mark.parametrize("concurrent", [False, True], ids=["one-by-one", "concurrent"])
def test_sdk_tool_calls_through_the_pass_through_are_counted_exactly(protocol, json_response, concurrent):
    # A handshake-era server answering JSON cannot ask the user mid-call.
    asks = protocol == MODERN or not json_response
    plan = ["search"] * 5 + ["fetch"] * 3 + ["add"] * 7 + [CONFIRMED_TOOL] * 2 * asks

    async def scenario():
        with running_mcp_server(json_response=json_response) as server_url:
            async with RecordingForwarder(server_url) as forwarder:
                sessions = await _client_session_calls(forwarder.url, plan, protocol, concurrent=concurrent)
                return sessions, list(forwarder.exchanges)

    sessions, exchanges = _run(scenario())
    posts = _read_posts(exchanges)
    assert not any(request.flagged for _, request in posts)
    posted = [call for _, request in posts for call in request.tool_calls]
    made = [call for exchange, _ in posts for call in exchange.tool_calls_made()]
    assert collections.Counter(call.name for call in made) == collections.Counter(plan)
    assert len({call.request_id for call in posted}) == len(posted)
    started = [s for s in (session_started(request, exchange.response_session) for exchange, request in posts) if s]

    if protocol == MODERN:
        # Each call the server asks about is posted twice: first answered
        # `input_required`, then again with the user's answer.
        asked = [CONFIRMED_TOOL] * 2 * asks
        assert collections.Counter(call.name for call in posted) == collections.Counter(plan + asked)
        assert sessions == set() and started == []
        assert all(exchange.request_session is None and exchange.response_session is None for exchange in exchanges)
        assert all(exchange.method == "POST" for exchange in exchanges)
        assert not any(request.initializes for _, request in posts)
        assert posts[0][1].method_counts == {"server/discover": 1}
    else:
        assert posted == made
        [session_id] = sessions
        assert started == [session_id]
        initialize, *rest = posts
        assert initialize[1].method_counts == {"initialize": 1} and initialize[0].request_session is None
        assert all(request.session_id == session_id for _, request in rest)
        assert all(exchange.request_session == session_id.encode()
                   for exchange in exchanges if exchange.method in ("GET", "DELETE"))

    # An SSE server streams each answer; at 2026-07-28 it streams only an answer that
    # has something to send first (the progress of a call that asks the user).
    streamed = [request.tool_calls[0].name == CONFIRMED_TOOL or protocol == HANDSHAKE
                for _, request in posts if request.tool_calls]
    tool_posts = [exchange for exchange, request in posts if request.tool_calls]
    for exchange, is_streamed in zip(tool_posts, streamed):
        if json_response or not is_streamed:
            assert exchange.content_type.startswith("application/json")
        else:
            assert exchange.content_type.startswith("text/event-stream")
            assert b"event: message" in b"".join(exchange.response_chunks)


def test_concurrent_sdk_sessions_are_counted_per_session():
    plans = [["add"] * 4 + ["search"], ["fetch"] * 6, ["search", "fetch", "add", CONFIRMED_TOOL] * 3]

    async def scenario():
        with running_mcp_server() as server_url:
            async with RecordingForwarder(server_url) as forwarder:
                sessions = await asyncio.gather(*(
                    _client_session_calls(forwarder.url, plan, HANDSHAKE, concurrent=True) for plan in plans))
                return [session for [session] in map(list, sessions)], list(forwarder.exchanges)

    session_ids, exchanges = _run(scenario())
    posts = _read_posts(exchanges)
    started = [s for s in (session_started(request, exchange.response_session) for exchange, request in posts) if s]
    assert sorted(started) == sorted(session_ids) and len(set(session_ids)) == len(plans)
    for session_id, plan in zip(session_ids, plans):
        calls = [call.name for exchange, request in posts if request.session_id == session_id
                 for call in exchange.tool_calls_made()]
        assert collections.Counter(calls) == collections.Counter(plan)


_META = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}


@pytest.mark.parametrize("protocol", [MODERN, HANDSHAKE])
def test_the_sdk_server_refuses_a_batch_that_the_reader_still_counts(protocol):
    # The SDK (protocol 2025-06-18 on) sends one message per POST and its server answers
    # a batch with 400, no tool run: metering must settle on the response, not the body.
    calls = [_call("add", 1, {"a": 1, "b": 2}), _call("search", 2, {"query": "x"})]
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    if protocol == MODERN:
        for call in calls:
            call["params"]["_meta"] = _META
        headers.update({"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "add"})

    async def scenario():
        with running_mcp_server(json_response=True) as server_url:
            async with RecordingForwarder(server_url) as forwarder, aiohttp.ClientSession() as client:
                if protocol == HANDSHAKE:
                    async with client.post(forwarder.url, data=_INITIALIZE, headers=headers) as response:
                        assert response.status == 200
                        headers["Mcp-Session-Id"] = response.headers["Mcp-Session-Id"]
                async with client.post(forwarder.url, data=_body(calls), headers=headers) as response:
                    return response.status, forwarder.exchanges[-1]

    status, exchange = _run(scenario())
    assert status == 400
    request = read_mcp_request(exchange.body, exchange.request_session)
    assert request.batch and [call.name for call in request.tool_calls] == ["add", "search"]
    assert request.session_id == (exchange.request_session.decode() if protocol == HANDSHAKE else None)


def test_a_2026_server_ignores_a_session_header_and_opens_no_session():
    # A client that sends Mcp-Session-Id at 2026-07-28 has its call answered and is
    # given no session, so none is counted.
    call = _call("add", 7, {"a": 1, "b": 2})
    call["params"]["_meta"] = _META
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "add",
               "Mcp-Session-Id": "made-up"}

    async def scenario():
        with running_mcp_server(json_response=True) as server_url:
            async with RecordingForwarder(server_url) as forwarder, aiohttp.ClientSession() as client:
                async with client.post(forwarder.url, data=_body(call), headers=headers) as response:
                    return response.status, await response.json(), forwarder.exchanges[-1]

    status, answer, exchange = _run(scenario())
    assert status == 200 and answer["result"]["structuredContent"] == {"result": 3}
    assert exchange.response_session is None
    request = read_mcp_request(exchange.body, exchange.request_session, MODERN.encode())
    assert request.sessionless and request.session_id is None
    assert [call.name for call in exchange.tool_calls_made()] == ["add"]
