# MCP metering through a running proxy, with the real `mcp` client and an MCP server
# from the `mcp` package behind it (streamable HTTP, SSE and JSON answers): each tool
# call is metered once with its tool as a dimension, exactly as many as the client
# made, and each agent session once; a batch the server refuses meters no call.
import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter

import httpx
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from threaded_proxy import ThreadedProxy

from bench.mcp_server import running_mcp_server

TIMEOUT_S = 20
ARGUMENTS = {"search": {"query": "tools"}, "fetch": {"doc_id": "doc-1"}, "add": {"a": 2, "b": 3}}


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


@pytest.fixture(params=[False, True], ids=["sse", "json"])
def proxy(request, tmp_path):
    with running_mcp_server(json_response=request.param) as server_url:
        running = mcp_proxy(tmp_path, server_url)
        yield running
        running.close()


async def agent(url, plan):
    """One client session through the proxy calling each tool in `plan`, concurrently;
    returns its session id."""
    async with httpx.AsyncClient(headers={"Authorization": "Bearer k-agent"}, timeout=TIMEOUT_S) as http:
        async with streamable_http_client(url, http_client=http) as (read_stream, write_stream, session_id):
            async with ClientSession(read_stream, write_stream) as session:
                await session.initialize()
                results = await asyncio.gather(*(session.call_tool(name, ARGUMENTS[name]) for name in plan))
                assert not any(result.isError for result in results)
                return session_id()


def test_tool_calls_and_agent_sessions_are_metered_exactly(proxy):
    plans = [["search"] * 5 + ["fetch"] * 3 + ["add"] * 7, ["add"] * 4 + ["search"]]

    async def agents():
        return await asyncio.gather(*(agent(proxy.mcp_url, plan) for plan in plans))
    sessions = asyncio.run(asyncio.wait_for(agents(), TIMEOUT_S))
    events = proxy.metered()
    calls = Counter()
    for event in events:
        if event["metric"] == "mcp_tool_calls":
            calls[(event["dimensions"]["mcp_session"], event["dimensions"]["tool"])] += event["quantity"]
    expected = Counter()
    for session, plan in zip(sessions, plans):
        for name in plan:
            expected[(session, name)] += 1
    assert calls == expected
    started = [event["dimensions"]["mcp_session"] for event in events if event["metric"] == "agent_sessions"]
    assert sorted(started) == sorted(sessions) and len(set(sessions)) == 2


def test_a_batch_the_server_refuses_meters_no_call(proxy):
    batch = json.dumps([{"jsonrpc": "2.0", "id": n, "method": "tools/call",
                         "params": {"name": "add", "arguments": {"a": 1, "b": n}}} for n in range(3)]).encode()
    call = urllib.request.Request(proxy.mcp_url, data=batch, method="POST", headers={
        "Authorization": "Bearer k-agent", "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream"})
    try:
        with urllib.request.urlopen(call, timeout=TIMEOUT_S) as answer:
            status = answer.status
    except urllib.error.HTTPError as error:
        status = error.code
    assert status == 400
    events = proxy.metered()
    assert [event["metric"] for event in events] == ["api_calls"]


def test_a_tool_that_needs_a_feature_the_plan_lacks_is_refused_and_not_metered(tmp_path):
    call_add = {"jsonrpc": "2.0", "id": 99, "method": "tools/call",
                "params": {"name": "add", "arguments": ARGUMENTS["add"]}}
    with running_mcp_server() as server_url:
        running = mcp_proxy(tmp_path, server_url, "{tool_features: {search: [lookups], add: [arithmetic]}}")
        try:
            async def calls():
                async with httpx.AsyncClient(headers={"Authorization": "Bearer k-agent"}, timeout=TIMEOUT_S) as http:
                    async with streamable_http_client(running.mcp_url, http_client=http) as (read, write, session_id):
                        async with ClientSession(read, write) as session:
                            await session.initialize()
                            assert not (await session.call_tool("search", ARGUMENTS["search"])).isError
                            # The same agent calls a tool its plan does not allow.
                            return await http.post(running.mcp_url, json=call_add, headers={
                                "Mcp-Session-Id": session_id(), "Accept": "application/json, text/event-stream"})
            refusal = asyncio.run(asyncio.wait_for(calls(), TIMEOUT_S))
            events = running.metered()
        finally:
            running.close()
    assert refusal.status_code == 403
    assert refusal.json()["detail"] == "tool `add` needs feature `arithmetic`, which is not in the customer's plan"
    tools = [event["dimensions"]["tool"] for event in events if event["metric"] == "mcp_tool_calls"]
    assert tools == ["search"]


def test_tool_calls_count_against_a_hard_quota_as_they_are_made(tmp_path):
    # A batch the server refuses gives back the calls it reserved; an agent then
    # makes exactly what is left, and one more call is refused before the server.
    batch = [{"jsonrpc": "2.0", "id": n, "method": "tools/call",
              "params": {"name": "add", "arguments": {"a": 1, "b": n}}} for n in range(3)]
    with running_mcp_server() as server_url:
        running = mcp_proxy(tmp_path, server_url, quotas="{mcp_tool_calls: {limit: 4, hard: true}}")
        try:
            async def calls():
                async with httpx.AsyncClient(headers={"Authorization": "Bearer k-agent"}, timeout=TIMEOUT_S) as http:
                    accept = {"Accept": "application/json, text/event-stream"}
                    refused_batch = await http.post(running.mcp_url, json=batch, headers=accept)
                    async with streamable_http_client(running.mcp_url, http_client=http) as (read, write, session_id):
                        async with ClientSession(read, write) as session:
                            await session.initialize()
                            for name in ("search", "fetch", "add", "add"):
                                assert not (await session.call_tool(name, ARGUMENTS[name])).isError
                            over = await http.post(running.mcp_url, json=batch[0],
                                                   headers={"Mcp-Session-Id": session_id(), **accept})
                    return refused_batch, over
            refused_batch, over = asyncio.run(asyncio.wait_for(calls(), TIMEOUT_S))
            events = running.metered()
        finally:
            running.close()
    assert refused_batch.status_code == 400
    assert over.status_code == 429 and over.json()["title"] == "Quota Exceeded"
    assert over.headers["ratelimit"].startswith('"mcp_tool_calls";r=0;')
    tools = [event["dimensions"]["tool"] for event in events if event["metric"] == "mcp_tool_calls"]
    assert sorted(tools) == ["add", "add", "fetch", "search"]
