# When the upstream fails, through the running proxy: unreachable (502), dying
# mid-response (the client sees a broken response, never a clean one), too slow
# (504 via the sweep), a pooled connection the upstream closed (retried only when that
# is safe), and no connection free in time (504). A failed request costs the customer
# nothing: the quota unit counted for it is given back.
import json
import socket
import threading

import pytest
from conftest import (
    DEFAULT_ROUTES,
    HttpReader,
    connect,
    read_until_closed,
    request,
    wait_until,
)

READ_TIMEOUT_S = 5
CONNECT_TIMEOUT_S = 2   # what make_proxy configures


def problem(body):
    return json.loads(body)


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def remaining(headers):
    """Quota units left, from the `RateLimit` header."""
    return int(headers["ratelimit"].split(";r=")[1].split(";")[0])


def in_background(fn, *args):
    """Run fn(*args) on a thread; returns (thread, results list the result lands in)."""
    results = []
    thread = threading.Thread(target=lambda: results.append(fn(*args)))
    thread.start()
    return thread, results


@pytest.fixture
def proxy_for_upstream(upstream, make_proxy):
    return make_proxy(upstream.port, read_timeout_s=READ_TIMEOUT_S)


# -- unreachable --------------------------------------------------------------------------------

def test_an_unreachable_upstream_is_502_problem_json(make_proxy):
    proxy = make_proxy(closed_port())
    with connect(proxy.port) as sock:
        reader = HttpReader(sock)
        for _ in range(2):
            sock.sendall(b"GET /echo HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n")
            status, headers, body, _ = reader.read_response()
            assert status == 502
            assert headers["content-type"] == "application/problem+json"
            assert problem(body)["title"] == "Bad Gateway"
            assert problem(body)["reason"] == "error_502"
            assert "unreachable" in problem(body)["detail"]
            # The client's connection is still good for the next request.
            assert "connection" not in headers
    assert proxy.pool().open_count == 0


def test_failed_requests_give_the_quota_unit_back(upstream, make_proxy):
    # cus_nearquota has used 998 of 1000: only two requests may ever succeed.
    routes = "  - {name: dead, upstream: dead, path_prefix: /dead}\n" + DEFAULT_ROUTES
    proxy = make_proxy(upstream.port, routes=routes,
                       extra_upstreams=f'  dead: {{url: "http://127.0.0.1:{closed_port()}"}}\n')
    for _ in range(5):
        assert request(proxy.port, "GET", "/dead", key="k-nearquota")[0] == 502
    first = request(proxy.port, "GET", "/echo", key="k-nearquota")
    second = request(proxy.port, "GET", "/echo", key="k-nearquota")
    third = request(proxy.port, "GET", "/echo", key="k-nearquota")
    assert [first[0], second[0], third[0]] == [200, 200, 429]
    assert (remaining(first[1]), remaining(second[1])) == (1, 0)
    proxy.stop()
    # Only what was served is metered.
    assert [event["status"] for event in proxy.meter_events()] == [200, 200]


# -- dying mid-response --------------------------------------------------------------------------

def test_an_upstream_dying_mid_response_breaks_the_clients_response(proxy_for_upstream):
    proxy = proxy_for_upstream
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /die HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n")
        reader = HttpReader(sock)
        status, headers = reader.read_response(head_only=True)[:2]
        assert status == 200
        assert headers["content-length"] == "1000"
        rest = reader.buffer + read_until_closed(sock)
    # The client can tell: the connection ended before the 1000 bytes it was promised.
    assert 100 <= len(rest) < 1000
    assert rest[:100] == b"y" * 100


def test_a_chunked_response_cut_short_never_gets_its_last_chunk(raw_upstream, make_proxy):
    async def script(raw, index, reader, writer):
        await raw.read_request(reader, index)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
    raw_upstream.script = script
    proxy = make_proxy(raw_upstream.port)
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /cut HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n")
        reader = HttpReader(sock)
        status, headers = reader.read_response(head_only=True)[:2]
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        rest = reader.buffer + read_until_closed(sock)
    assert b"hello" in rest
    assert not rest.endswith(b"0\r\n\r\n")


# -- too slow ---------------------------------------------------------------------------------------

def test_an_upstream_slower_than_the_read_timeout_is_504(proxy_for_upstream, upstream, loop_thread):
    proxy = proxy_for_upstream
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-nearquota\r\n\r\n")
        wait_until(loop_thread, lambda: len(upstream.requests) == 1)
        proxy.sweep(READ_TIMEOUT_S - 1)          # not yet
        proxy.sweep(READ_TIMEOUT_S + 1)
        reader = HttpReader(sock)
        status, headers, body, _ = reader.read_response()
        assert status == 504
        assert headers["content-type"] == "application/problem+json"
        assert problem(body)["reason"] == "error_504"
        assert problem(body)["title"] == "Gateway Timeout"
        assert remaining(headers) == 2                   # the customer is told: this one cost nothing
        # The slow upstream connection is given up, the client's is not.
        assert loop_thread.call(lambda: proxy.pool().open_count) == 0
        sock.sendall(b"GET /echo/after HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-nearquota\r\n\r\n")
        status, headers, body, _ = reader.read_response()
    assert status == 200
    assert json.loads(body)["path"] == "/echo/after"
    # The timed-out request cost nothing: 998 + this one = 999 used.
    assert remaining(headers) == 1


def test_an_upstream_that_stalls_mid_response_is_cut_off(proxy_for_upstream, upstream, loop_thread):
    proxy = proxy_for_upstream
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /stream?chunks=2 HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n")
        reader = HttpReader(sock)
        status = reader.read_response(head_only=True)[0]
        assert status == 200
        reader.read_line()
        assert reader.read_exact(8) == b"chunk-0;"
        proxy.sweep(READ_TIMEOUT_S + 1)
        rest = reader.buffer + read_until_closed(sock)
    assert not rest.endswith(b"0\r\n\r\n")


# -- a pooled connection the upstream closed -----------------------------------------------------------

def close_when_reused_script():
    """Connection 0 answers one request with keep-alive, reads the next one and closes
    without answering: the upstream gave up the idle connection just as the proxy
    reused it. Later connections answer every request."""
    async def script(raw, index, reader, writer):
        while (got := await raw.read_request(reader, index)) is not None:
            if index == 0 and len(raw.requests) > 1:
                return
            body = b"%s %s from %d" % (got[0].encode(), got[1].encode(), index)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return script


def test_a_get_on_a_connection_the_upstream_just_closed_is_retried_on_a_fresh_one(raw_upstream, make_proxy):
    raw_upstream.script = close_when_reused_script()
    proxy = make_proxy(raw_upstream.port)
    assert request(proxy.port, "GET", "/first")[2] == b"GET /first from 0"
    status, _, body = request(proxy.port, "GET", "/second")
    assert (status, body) == (200, b"GET /second from 1")
    assert [(index, target) for index, _, target, _ in raw_upstream.requests] == [
        (0, "/first"), (0, "/second"), (1, "/second")]


def test_a_post_on_a_connection_the_upstream_just_closed_is_not_sent_again(raw_upstream, make_proxy):
    raw_upstream.script = close_when_reused_script()
    proxy = make_proxy(raw_upstream.port)
    assert request(proxy.port, "GET", "/first")[0] == 200
    status, headers, body = request(proxy.port, "POST", "/pay", key="k-nearquota", body=b'{"amount": 5}')
    assert status == 502
    assert problem(body)["reason"] == "error_502"
    assert remaining(headers) == 2                       # and the 502 says so
    # The upstream may have acted on it: it must never see it twice.
    assert [target for _, method, target, _ in raw_upstream.requests if method == "POST"] == ["/pay"]
    # The 502 cost the customer nothing.
    status, headers, _ = request(proxy.port, "GET", "/next", key="k-nearquota")
    assert status == 200 and remaining(headers) == 1


def test_an_idle_connection_the_upstream_closed_is_never_reused(raw_upstream, make_proxy, loop_thread):
    async def script(raw, index, reader, writer):
        got = await raw.read_request(reader, index)
        if got is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
    raw_upstream.script = script       # answers with keep-alive, then closes
    proxy = make_proxy(raw_upstream.port)
    pool = proxy.pool()
    assert request(proxy.port, "GET", "/first")[0] == 200
    wait_until(loop_thread, lambda: pool.open_count == 0)
    for method in ("POST", "GET"):
        status, _, body = request(proxy.port, method, "/again", body=b"x" if method == "POST" else None)
        assert (status, body) == (200, b"ok")
        wait_until(loop_thread, lambda: pool.open_count == 0)
    assert [index for index, _, _, _ in raw_upstream.requests] == [0, 1, 2]


# -- no connection free in time -----------------------------------------------------------------------

def test_waiting_too_long_for_a_pooled_connection_is_504(upstream, make_proxy, loop_thread):
    proxy = make_proxy(upstream.port, pool_size=1)
    pool = proxy.pool()
    slow, slow_result = in_background(request, proxy.port, "GET", "/slow")
    wait_until(loop_thread, lambda: len(upstream.requests) == 1)
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /echo/queued HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-nearquota\r\n\r\n")
        wait_until(loop_thread, lambda: len(pool.waiters) == 1)
        proxy.sweep(CONNECT_TIMEOUT_S + 1)
        reader = HttpReader(sock)
        status, headers, body, _ = reader.read_response()
        assert status == 504
        assert problem(body)["reason"] == "error_504"
        assert "became free" in problem(body)["detail"]
        assert len(pool.waiters) == 0
        upstream.gate("slow").set()
        slow.join(10)
        assert slow_result[0][0] == 200
        # Once the connection is free again the same client is served over it.
        sock.sendall(b"GET /echo/later HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-nearquota\r\n\r\n")
        status, headers, body, _ = reader.read_response()
    assert status == 200
    assert remaining(headers) == 1
    assert [path for _, path, _, _, _ in upstream.requests] == ["/slow", "/echo/later"]
    assert pool.connects_total == 1


# -- responses that are not HTTP ---------------------------------------------------------------------

def scripted(answers):
    """Answers the n-th request on any connection with answers[n] (bytes), keep-alive."""
    async def script(raw, index, reader, writer):
        while (await raw.read_request(reader, index)) is not None:
            writer.write(answers[min(len(raw.requests), len(answers)) - 1])
    return script


def test_an_upstream_answering_garbage_is_502(raw_upstream, make_proxy):
    raw_upstream.script = scripted([b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
    proxy = make_proxy(raw_upstream.port)
    status, headers, body = request(proxy.port, "GET", "/garbage")
    assert status == 502
    assert "invalid response" in problem(body)["detail"]
    # The broken connection is gone; the next request gets a fresh one.
    assert request(proxy.port, "GET", "/fine")[2] == b"ok"
    assert raw_upstream.connections == 2


def test_a_response_whose_chunking_breaks_mid_body_breaks_the_clients_response(raw_upstream, make_proxy):
    raw_upstream.script = scripted([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"])
    proxy = make_proxy(raw_upstream.port)
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /broken HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n")
        reader = HttpReader(sock)
        assert reader.read_response(head_only=True)[0] == 200
        rest = reader.buffer + read_until_closed(sock)
    assert b"hello" in rest
    assert not rest.endswith(b"0\r\n\r\n")


def test_bytes_after_a_complete_response_never_spoil_the_next_request(raw_upstream, make_proxy):
    # A backend that sends more than its Content-Length: the extra can belong to no
    # request, so the connection it came on is not used again.
    raw_upstream.script = scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA",
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"])
    proxy = make_proxy(raw_upstream.port)
    assert request(proxy.port, "GET", "/first")[2] == b"hello"
    status, _, body = request(proxy.port, "GET", "/second")
    assert (status, body) == (200, b"next")
