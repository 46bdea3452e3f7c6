# The admin port as an operator's tools see it: a real HTTP client against a running
# admin server on 127.0.0.1. /metrics renders this proxy's own registry (live gauges read
# at scrape time), /healthz and /readyz answer probes, other paths and methods are refused.
import asyncio
import http.client
import socket
import types

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from proxy.admin import start_admin_server
from proxy.metering import MeterBuffer, MeterEvent
from proxy.metrics import DECISION_LABELS, new_proxy_metrics
from proxy.upstream import UpstreamPool


def http_request(port, method, target):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, target)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def raw_exchange(port, data):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(data)
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def serve(scenario, metrics=None, ready=lambda: (True, "edge state loaded")):
    """Run `scenario(port, metrics)` (a coroutine function) against a running admin server."""
    metrics = metrics or new_proxy_metrics()

    async def main():
        server = await start_admin_server("127.0.0.1", 0, metrics, ready)
        port = server.sockets[0].getsockname()[1]
        try:
            return await scenario(port, metrics)
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


def get(port, target, method="GET"):
    return asyncio.to_thread(http_request, port, method, target)


def samples(body):
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples}


def test_metrics_shows_counted_requests_in_prometheus_text_format():
    async def scenario(port, metrics):
        metrics.count_request("chat", "allowed")
        metrics.count_request("chat", "allowed")
        metrics.count_request("chat", "margin_blocked")
        metrics.observe_decision(3e-6)
        metrics.observe_upstream("llm", 0.2)
        metrics.count_reload_error("guards.yaml")
        return await get(port, "/metrics")

    status, headers, body = serve(scenario)
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert b"aforo_requests_total" in body
    found = samples(body)
    assert found[("aforo_requests_total", (("decision", "allowed"), ("route", "chat")))] == 2
    assert found[("aforo_requests_total", (("decision", "margin_blocked"), ("route", "chat")))] == 1
    assert found[("aforo_decision_seconds_bucket", (("le", "5e-06"),))] == 1
    assert found[("aforo_decision_seconds_bucket", (("le", "2.5e-06"),))] == 0
    assert found[("aforo_upstream_seconds_bucket", (("le", "0.25"), ("upstream", "llm")))] == 1
    assert found[("aforo_config_reload_errors_total", (("file", "guards.yaml"),))] == 1


def test_live_gauges_are_read_at_scrape_time(tmp_path):
    async def scenario(port, metrics):
        buffer = MeterBuffer(_NeverSink(), capacity_events=2, batch_events=2, flush_interval_s=1.0,
                             spool_dir=tmp_path, loop=asyncio.get_running_loop(), clock=lambda: 0.0,
                             spill_chunk_events=1)
        metrics.watch_meter_buffer(buffer)
        pools = {"llm": {"idle": 3, "busy": 1}}
        metrics.watch_upstream_pools(lambda: ((name, state, count) for name, counts in pools.items()
                                              for state, count in counts.items()))
        metrics.watch_edge_state_age(lambda: 4.5)
        for n in range(3):
            buffer.record(MeterEvent(f"{n:032x}", "cus_1", "api_calls", 1, 0.0, "chat", 200, 0, 0, 1.0))
        first = samples((await get(port, "/metrics"))[2])
        pools["llm"]["busy"] = 2
        buffer.record(MeterEvent(f"{3:032x}", "cus_1", "api_calls", 1, 0.0, "chat", 200, 0, 0, 1.0))
        second = samples((await get(port, "/metrics"))[2])
        await buffer.close(timeout_s=0.0)
        return first, second

    first, second = serve(scenario)
    assert first[("aforo_meter_buffer_depth", ())] == 2
    assert first[("aforo_meter_spooled_events", ())] == 1
    assert first[("aforo_meter_events_total", (("outcome", "recorded"),))] == 3
    assert first[("aforo_meter_events_total", (("outcome", "spilled"),))] == 1
    assert first[("aforo_meter_events_total", (("outcome", "lost"),))] == 0
    assert first[("aforo_upstream_pool_connections", (("state", "busy"), ("upstream", "llm")))] == 1
    assert first[("aforo_upstream_pool_connections", (("state", "idle"), ("upstream", "llm")))] == 3
    assert first[("aforo_edge_state_age_seconds", ())] == 4.5
    assert second[("aforo_meter_events_total", (("outcome", "recorded"),))] == 4
    assert second[("aforo_meter_spooled_events", ())] == 2
    assert second[("aforo_upstream_pool_connections", (("state", "busy"), ("upstream", "llm")))] == 2


class _NeverSink:
    async def write_batch(self, events):
        raise ConnectionError("not used")

    async def close(self):
        pass


def test_watch_reads_a_workers_pools_buffer_and_edge_state(tmp_path):
    class EdgeState:
        def age_s(self):
            return 12.0

    async def scenario(port, metrics):
        loop = asyncio.get_running_loop()
        app = types.SimpleNamespace(pools={"llm": UpstreamPool(
            "llm", "127.0.0.1", 9, size=4, connect_timeout_s=1.0, read_timeout_s=1.0, loop=loop, clock=lambda: 0.0)})
        buffer = MeterBuffer(_NeverSink(), spool_dir=tmp_path, loop=loop, clock=lambda: 0.0)
        metrics.watch(app, buffer, EdgeState())
        buffer.record(MeterEvent(f"{0:032x}", "cus_1", "api_calls", 1, 0.0, "chat", 200, 0, 0, 1.0))
        metrics.count_reload_error("edge_state.yaml", ValueError("line 3: bad"))   # a reload-error callback
        body = (await get(port, "/metrics"))[2]
        await buffer.close(timeout_s=0.0)
        return samples(body)

    found = serve(scenario)
    assert found[("aforo_upstream_pool_connections", (("state", "idle"), ("upstream", "llm")))] == 0
    assert found[("aforo_upstream_pool_connections", (("state", "busy"), ("upstream", "llm")))] == 0
    assert found[("aforo_meter_buffer_depth", ())] == 1
    assert found[("aforo_edge_state_age_seconds", ())] == 12.0
    assert found[("aforo_config_reload_errors_total", (("file", "edge_state.yaml"),))] == 1


def test_a_failing_gauge_source_does_not_break_the_scrape():
    def broken():
        raise RuntimeError("pool registry gone")

    async def scenario(port, metrics):
        metrics.watch_upstream_pools(broken)
        metrics.count_request("chat", "allowed")
        return await get(port, "/metrics")

    status, _, body = serve(scenario)
    assert status == 200
    assert b'aforo_requests_total{decision="allowed",route="chat"} 1.0' in body


def test_two_proxies_in_one_process_keep_separate_metrics():
    first, second = new_proxy_metrics(), new_proxy_metrics()
    first.count_request("chat", "allowed")
    assert first.request_count("chat", "allowed") == 1
    assert second.request_count("chat", "allowed") == 0


def test_decision_labels_cover_core_reasons_and_proxy_outcomes():
    assert {"allowed", "throttle", "throttled", "quota_exceeded", "margin_blocked"} <= set(DECISION_LABELS)
    assert {"error_502", "error_504", "bad_request", "unrouted", "unauthorized"} <= set(DECISION_LABELS)


def test_healthz_answers_ok():
    status, headers, body = serve(lambda port, metrics: get(port, "/healthz"))
    assert (status, body) == (200, b"ok\n")
    assert headers["Connection"] == "close"


@pytest.mark.parametrize(
    "ready, expected_status, expected_body",
    [
        (lambda: (True, "edge state loaded"), 200, b"edge state loaded\n"),
        (lambda: (True, ""), 200, b"ready\n"),
        (lambda: (False, "edge state not loaded yet"), 503, b"edge state not loaded yet\n"),
        (lambda: 1 / 0, 503, b"readiness check failed: ZeroDivisionError('division by zero')\n"),
    ],
)
def test_readyz_follows_the_ready_callback(ready, expected_status, expected_body):
    status, _, body = serve(lambda port, metrics: get(port, "/readyz"), ready=ready)
    assert (status, body) == (expected_status, expected_body)


@pytest.mark.parametrize(
    "method, target, expected_status",
    [
        ("GET", "/nope", 404),
        ("GET", "/", 404),
        ("POST", "/metrics", 405),
        ("DELETE", "/readyz", 405),
        ("GET", "/healthz?verbose=1", 200),
    ],
)
def test_unknown_paths_and_other_methods_are_refused(method, target, expected_status):
    status, headers, _ = serve(lambda port, metrics: get(port, target, method))
    assert status == expected_status
    if expected_status == 405:
        assert headers["Allow"] == "GET"


@pytest.mark.parametrize(
    "request_bytes, expected_status_line",
    [
        (b"NOT AN HTTP REQUEST\r\n\r\n", b"HTTP/1.1 400 Bad Request\r\n"),
        (b"GET /healthz HTTP/1.1\r\nX-Filler: " + b"x" * 20_000 + b"\r\n\r\n",
         b"HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /nope HTTP/1.1\r\nHost: a\r\n\r\n",
         b"HTTP/1.1 200 OK\r\n"),
    ],
)
def test_malformed_oversized_and_pipelined_requests_get_one_answer(request_bytes, expected_status_line):
    response = serve(lambda port, metrics: asyncio.to_thread(raw_exchange, port, request_bytes))
    assert response.startswith(expected_status_line)
    assert response.count(b"HTTP/1.1 ") == 1
