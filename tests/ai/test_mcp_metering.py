# MCP metering through a running proxy, with the real `mcp` client and an MCP server
# from the `mcp` package behind it (streamable HTTP, SSE and JSON answers), in both
# protocol generations: 2026-07-28 (the client's default: no handshake, no session)
# and 2025-11-25 (`initialize` and an Mcp-Session-Id, as every client before it).
# Each tool call is metered once with its tool as a dimension, exactly as many as the
# client made, also when the server asks the user first (one call, two POSTs at
# 2026-07-28); each agent session once where the protocol has sessions, none where it
# has not; a batch the server refuses meters no call.
import asyncio
import json
import urllib.parse
from collections import Counter

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import ElicitResult
from threaded_proxy import ThreadedProxy

from bench.mcp_server import CONFIRMED_TOOL, running_mcp_server

TIMEOUT_S = 20
ARGUMENTS = {"search": {"query": "tools"}, "fetch": {"doc_id": "doc-1"}, "add": {"a": 2, "b": 3},
             CONFIRMED_TOOL: {"doc_id": "doc-2"}}
MODERN = "2026-07-28"
HANDSHAKE = "2025-11-25"
# The client's `mode` for each protocol: "auto" asks the server which it speaks (the
# test server speaks both and picks the newest), "legacy" makes the handshake.
CLIENT_MODES = {MODERN: "auto", HANDSHAKE: "legacy"}
ACCEPT = {"Accept": "application/json, text/event-stream"}


def mcp_proxy(folder, server_url, mcp="{}", quotas="{}"):
    """A started proxy with an `mcp` route in front of the MCP server at
    `server_url` (its `url` is the MCP endpoint through the proxy), the plan's
    `quotas` as ThreadedProxy takes them."""
    server = urllib.parse.urlsplit(server_url)
    proxy = ThreadedProxy(folder, (f'tools: {{url: "http://{server.netloc}"}}',),
                          (f"{{name: mcp, upstream: tools, path_prefix: {server.path}, mcp: {mcp}}}",),
                          key="k-agent", features=("lookups",), quotas=quotas).start()
    proxy.mcp_url = proxy.url + server.path
    return proxy


@pytest.fixture(params=[(MODERN, False), (MODERN, True), (HANDSHAKE, False), (HANDSHAKE, True)],
                ids=["2026-sse", "2026-json", "2025-sse", "2025-json"])
def proxy(request, tmp_path):
    protocol, json_response = request.param
    with running_mcp_server(json_response=json_response) as server_url:
        running = mcp_proxy(tmp_path, server_url)
        running.protocol = protocol
        # A handshake-era server asks the user mid-call on the POST's SSE stream: a
        # server answering JSON has nowhere to ask.
        running.can_ask = protocol == MODERN or not json_response
        yield running
        running.close()


async def confirm(context, params):
    """The user says yes to whatever the server asks."""
    return ElicitResult(action="accept", content={"confirm": True})


async def on_progress(progress, total, message):
    """Asking for progress makes the server stream its answers as SSE."""


class Agent:
    """An SDK client through the proxy speaking `protocol`; `sessions` are the
    Mcp-Session-Id values the server gave it."""

    def __init__(self, url, protocol):
        self.url, self.protocol = url, protocol
        self.sessions = set()

    async def _record_session(self, response):
        if "mcp-session-id" in response.headers:
            self.sessions.add(response.headers["mcp-session-id"])

    def http(self):
        return httpx2.AsyncClient(headers={"Authorization": "Bearer k-agent"}, timeout=TIMEOUT_S,
                                  event_hooks={"response": [self._record_session]})

    def client(self, http):
        return Client(streamable_http_client(self.url, http_client=http), mode=CLIENT_MODES[self.protocol],
                      elicitation_callback=confirm)

    async def run(self, plan):
        """Calls each tool in `plan`, concurrently; returns the agent."""
        async with self.http() as http, self.client(http) as client:
            assert client.protocol_version == self.protocol
            results = await asyncio.gather(*(client.call_tool(name, ARGUMENTS[name], progress_callback=on_progress)
                                             for name in plan))
            assert not any(result.is_error for result in results)
            assert all(result.structured_content == {"result": "archived doc-2"}
                       for name, result in zip(plan, results) if name == CONFIRMED_TOOL)
        return self


def tool_calls(events):
    """(mcp_session or None, tool) -> calls metered."""
    calls = Counter()
    for event in events:
        if event["metric"] == "mcp_tool_calls":
            calls[(event["dimensions"].get("mcp_session"), event["dimensions"]["tool"])] += event["quantity"]
    return calls


def test_tool_calls_and_agent_sessions_are_metered_exactly(proxy):
    plans = [["search"] * 5 + ["fetch"] * 3 + ["add"] * 7 + [CONFIRMED_TOOL] * 2 * proxy.can_ask,
             ["add"] * 4 + ["search"]]

    async def agents():
        return await asyncio.gather(*(Agent(proxy.mcp_url, proxy.protocol).run(plan) for plan in plans))
    agents = asyncio.run(asyncio.wait_for(agents(), TIMEOUT_S))
    events = proxy.metered()
    started = sorted(event["dimensions"]["mcp_session"] for event in events if event["metric"] == "agent_sessions")
    expected = Counter()
    if proxy.protocol == MODERN:
        # No session in this protocol: nothing to count, no session on the calls.
        assert all(not agent.sessions for agent in agents)
        assert started == []
        for plan in plans:
            expected.update((None, name) for name in plan)
    else:
        assert all(len(agent.sessions) == 1 for agent in agents)
        sessions = [next(iter(agent.sessions)) for agent in agents]
        assert started == sorted(sessions) and len(set(sessions)) == 2
        for session, plan in zip(sessions, plans):
            expected.update((session, name) for name in plan)
    assert tool_calls(events) == expected


def _raw_call(request_id, name, arguments, protocol, **params):
    """A `tools/call` POST as a client of `protocol` sends it: (body, header fields)."""
    body = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": name, "arguments": arguments, **params}}
    headers = dict(ACCEPT)
    if protocol == MODERN:
        body["params"]["_meta"] = {"io.modelcontextprotocol/protocolVersion": MODERN,
                                   "io.modelcontextprotocol/clientCapabilities": {"elicitation": {"form": {}}}}
        headers.update({"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": name})
    return body, headers


def _with_session(headers, session):
    """`headers` with an Mcp-Session-Id, as a client that sends one anyway would."""
    return {**headers, "Mcp-Session-Id": session}


@pytest.mark.parametrize("protocol", [MODERN, HANDSHAKE])
def test_a_batch_the_server_refuses_meters_no_call(tmp_path, protocol):
    with running_mcp_server() as server_url:
        running = mcp_proxy(tmp_path, server_url)
        try:
            async def post():
                calls = [_raw_call(n, "add", {"a": 1, "b": n}, protocol) for n in range(3)]
                async with httpx2.AsyncClient(headers={"Authorization": "Bearer k-agent"}, timeout=TIMEOUT_S) as http:
                    answer = await http.post(running.mcp_url, json=[body for body, _ in calls], headers=calls[0][1])
                    return answer.status_code
            status = asyncio.run(asyncio.wait_for(post(), TIMEOUT_S))
            events = running.metered()
        finally:
            running.close()
    assert status == 400
    assert [event["metric"] for event in events] == ["api_calls"]


@pytest.mark.parametrize("protocol", [MODERN, HANDSHAKE])
def test_a_tool_that_needs_a_feature_the_plan_lacks_is_refused_and_not_metered(tmp_path, protocol):
    with running_mcp_server() as server_url:
        running = mcp_proxy(tmp_path, server_url, "{tool_features: {search: [lookups], add: [arithmetic]}}")
        try:
            async def calls():
                agent = Agent(running.mcp_url, protocol)
                async with agent.http() as http, agent.client(http) as client:
                    assert not (await client.call_tool("search", ARGUMENTS["search"])).is_error
                    # The same agent calls a tool its plan does not allow.
                    body, headers = _raw_call(99, "add", ARGUMENTS["add"], protocol)
                    if agent.sessions:
                        headers["Mcp-Session-Id"] = next(iter(agent.sessions))
                    return await http.post(running.mcp_url, json=body, headers=headers)
            refusal = asyncio.run(asyncio.wait_for(calls(), TIMEOUT_S))
            events = running.metered()
        finally:
            running.close()
    assert refusal.status_code == 403
    assert refusal.json()["detail"] == "tool `add` needs feature `arithmetic`, which is not in the customer's plan"
    tools = [event["dimensions"]["tool"] for event in events if event["metric"] == "mcp_tool_calls"]
    assert tools == ["search"]


@pytest.mark.parametrize("protocol", [MODERN, HANDSHAKE])
def test_tool_calls_count_against_a_hard_quota_as_they_are_made(tmp_path, protocol):
    # A batch the server refuses, and at 2026-07-28 a call the server answers
    # `input_required` that the client never completes, give back what they
    # reserved; an agent then makes exactly what is left (one of its calls asks the
    # user first), and one more call is refused before the server.
    with running_mcp_server() as server_url:
        running = mcp_proxy(tmp_path, server_url, quotas="{mcp_tool_calls: {limit: 4, hard: true}}")
        try:
            async def calls():
                async with httpx2.AsyncClient(headers={"Authorization": "Bearer k-agent"}, timeout=TIMEOUT_S) as http:
                    batch = [_raw_call(n, "add", {"a": 1, "b": n}, protocol) for n in range(3)]
                    refused_batch = await http.post(running.mcp_url, json=[body for body, _ in batch],
                                                    headers=batch[0][1])
                    unanswered = []
                    if protocol == MODERN:
                        for n in range(5):
                            body, headers = _raw_call(10 + n, CONFIRMED_TOOL, ARGUMENTS[CONFIRMED_TOOL], protocol)
                            unanswered.append(await http.post(running.mcp_url, json=body, headers=headers))
                agent = Agent(running.mcp_url, protocol)
                async with agent.http() as http, agent.client(http) as client:
                    for name in ("search", CONFIRMED_TOOL, "add", "add"):
                        assert not (await client.call_tool(name, ARGUMENTS[name])).is_error
                    body, headers = _raw_call(99, "add", ARGUMENTS["add"], protocol)
                    if agent.sessions:
                        headers["Mcp-Session-Id"] = next(iter(agent.sessions))
                    over = await http.post(running.mcp_url, json=body, headers=headers)
                return refused_batch, unanswered, over
            refused_batch, unanswered, over = asyncio.run(asyncio.wait_for(calls(), TIMEOUT_S))
            events = running.metered()
        finally:
            running.close()
    assert refused_batch.status_code == 400
    assert all(answer.status_code == 200 and answer.json()["result"]["resultType"] == "input_required"
               for answer in unanswered)
    assert over.status_code == 429 and over.json()["title"] == "Quota Exceeded"
    assert over.headers["ratelimit"].startswith('"mcp_tool_calls";r=0;')
    tools = [event["dimensions"]["tool"] for event in events if event["metric"] == "mcp_tool_calls"]
    assert sorted(tools) == sorted(["add", "add", CONFIRMED_TOOL, "search"])


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip-server"])
def test_a_call_answered_input_required_is_metered_when_the_client_calls_again(tmp_path, compress):
    # What the SDK client does, by hand: the first POST is answered `input_required`
    # (no call yet), the second carries the user's answer and the server's state. A
    # server that compresses what its clients accept is not asked to for tool calls,
    # so the proxy can read the answer.
    with running_mcp_server(json_response=True, compress=compress) as server_url:
        running = mcp_proxy(tmp_path, server_url)
        try:
            async def rounds():
                async with httpx2.AsyncClient(headers={"Authorization": "Bearer k-agent"}, timeout=TIMEOUT_S) as http:
                    body, headers = _raw_call(1, CONFIRMED_TOOL, ARGUMENTS[CONFIRMED_TOOL], MODERN)
                    # A session id means nothing at 2026-07-28: the server ignores it,
                    # and it is not put on the call.
                    first = (await http.post(running.mcp_url, json=body,
                                             headers=_with_session(headers, "made-up"))).json()["result"]
                    [key] = first["inputRequests"]
                    body, headers = _raw_call(2, CONFIRMED_TOOL, ARGUMENTS[CONFIRMED_TOOL], MODERN,
                                              inputResponses={key: {"action": "accept", "content": {"confirm": True}}},
                                              requestState=first["requestState"])
                    second = (await http.post(running.mcp_url, json=body,
                                              headers=_with_session(headers, "made-up"))).json()["result"]
                    return first, second
            first, second = asyncio.run(asyncio.wait_for(rounds(), TIMEOUT_S))
            events = running.metered()
        finally:
            running.close()
    assert first["resultType"] == "input_required"
    assert second["resultType"] == "complete" and second["structuredContent"] == {"result": "archived doc-2"}
    assert tool_calls(events) == {(None, CONFIRMED_TOOL): 1}
    assert [event["status"] for event in events if event["metric"] == "api_calls"] == [200, 200]
    assert json.dumps(events).count('"mcp_session"') == 0
