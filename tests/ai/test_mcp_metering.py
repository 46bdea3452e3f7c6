# MCP metering through a running proxy, with the real `mcp` client and an MCP server
# from the `mcp` package behind it (streamable HTTP, SSE and JSON answers): each tool
# call is metered once with its tool as a dimension, exactly as many as the client
# made, and each agent session once; a batch the server refuses meters no call.
import asyncio
import hashlib
import json
import textwrap
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter

import httpx
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from bench.mcp_server import running_mcp_server
from config.proxy_settings import load_proxy_settings
from proxy.server import ProxyWorker

TIMEOUT_S = 20
ARGUMENTS = {"search": {"query": "tools"}, "fetch": {"doc_id": "doc-1"}, "add": {"a": 2, "b": 3}}


class Proxy:
    """A proxy with an `mcp` route in front of the MCP server at `server_url`, on an
    event loop in a thread of its own."""

    def __init__(self, folder, server_url, mcp="{}"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        server = urllib.parse.urlsplit(server_url)
        digest = hashlib.sha256(b"k-agent").hexdigest()
        (folder / "edge_state.yaml").write_text(textwrap.dedent(f"""\
            period: {{start: "2026-01-01T00:00:00+00:00", end: "2099-01-01T00:00:00+00:00"}}
            plans:
              pro: {{tier: pro, features: [lookups]}}
            customers:
              - {{id: cus_agent, plan: pro, status: active, api_keys: [{digest}]}}
            """))
        (folder / "proxy.yaml").write_text(textwrap.dedent(f"""\
            listen: 127.0.0.1:0
            admin: 127.0.0.1:0
            upstreams:
              tools: {{url: "http://{server.netloc}"}}
            routes:
              - {{name: mcp, upstream: tools, path_prefix: {server.path}, mcp: {mcp}}}
            edge_state: {{file: edge_state.yaml, reload_interval_s: 3600}}
            metering: {{path: meter-events.ndjson, spool_dir: meter-spool, flush_interval_s: 3600}}
            """))
        self.meter_path = folder / "meter-events.ndjson"
        self.worker = ProxyWorker(load_proxy_settings(folder / "proxy.yaml"), loop=self.loop)
        self.run(self.worker.start())
        self.url = f"http://127.0.0.1:{self.worker.port}{server.path}"

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT_S)

    def metered(self):
        """Stop the proxy (delivering every meter event) and read what it metered."""
        self.run(self.worker.stop(1.0))
        return [json.loads(line) for line in self.meter_path.read_text().splitlines() if line.strip()]

    def close(self):
        if not self.worker.stopped.is_set():
            self.run(self.worker.stop(1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT_S)


@pytest.fixture(params=[False, True], ids=["sse", "json"])
def proxy(request, tmp_path):
    with running_mcp_server(json_response=request.param) as server_url:
        running = Proxy(tmp_path, server_url, getattr(request, "mcp", "{}"))
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
        return await asyncio.gather(*(agent(proxy.url, plan) for plan in plans))
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
    call = urllib.request.Request(proxy.url, data=batch, method="POST", headers={
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
        running = Proxy(tmp_path, server_url, "{tool_features: {search: [lookups], add: [arithmetic]}}")
        try:
            async def calls():
                async with httpx.AsyncClient(headers={"Authorization": "Bearer k-agent"}, timeout=TIMEOUT_S) as http:
                    async with streamable_http_client(running.url, http_client=http) as (read, write, session_id):
                        async with ClientSession(read, write) as session:
                            await session.initialize()
                            assert not (await session.call_tool("search", ARGUMENTS["search"])).isError
                            # The same agent calls a tool its plan does not allow.
                            return await http.post(running.url, json=call_add, headers={
                                "Mcp-Session-Id": session_id(), "Accept": "application/json, text/event-stream"})
            refusal = asyncio.run(asyncio.wait_for(calls(), TIMEOUT_S))
            events = running.metered()
        finally:
            running.close()
    assert refusal.status_code == 403
    assert refusal.json()["detail"] == "tool `add` needs feature `arithmetic`, which is not in the customer's plan"
    tools = [event["dimensions"]["tool"] for event in events if event["metric"] == "mcp_tool_calls"]
    assert tools == ["search"]
