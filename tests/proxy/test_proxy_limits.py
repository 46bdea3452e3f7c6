# The proxy's limits through the running proxy: every size and time limit in the
# settings is enforced with its status (414, 431, 413, 408, 503), the connection is
# closed, and nothing over a limit reaches the upstream. Time moves only by sweep().
import json

import pytest
from conftest import HttpReader, connect, read_until_closed, request, wait_until

LIMITS = """\
  max_request_line_bytes: 200
  max_header_bytes: 1024
  max_headers: 10
  max_body_bytes: 1000
  header_timeout_s: 5
  keepalive_timeout_s: 30
  max_connections: 2
"""
HEAD = "Host: api.test\r\nAuthorization: Bearer k-pro\r\n"


@pytest.fixture
def proxy(upstream, make_proxy):
    return make_proxy(upstream.port, limits=LIMITS)


def exchange(sock, raw):
    """Send `raw` on `sock` and read one response: (status, headers, body)."""
    sock.sendall(raw)
    status, headers, body, _ = HttpReader(sock).read_response()
    return status, headers, body


def refused_and_closed(sock, raw, status):
    """Send `raw` (if any), then expect a `status` problem response and the proxy closing."""
    if raw:
        sock.sendall(raw)
    reader = HttpReader(sock)
    got, headers, body, _ = reader.read_response()
    assert got == status
    assert headers["connection"] == "close"
    assert json.loads(body)["status"] == status
    assert reader.buffer + read_until_closed(sock) == b""


def connections(proxy):
    return proxy.loop_thread.call(lambda: list(proxy.app.connections))


# -- sizes ------------------------------------------------------------------------------

def test_a_request_target_over_the_limit_is_414(proxy, upstream):
    with connect(proxy.port) as sock:
        refused_and_closed(sock, f"GET /echo/{'a' * 300} HTTP/1.1\r\n{HEAD}\r\n".encode(), 414)
    assert upstream.requests == []
    # At the limit it is served.
    path = "/echo/" + "a" * (200 - len("/echo/"))
    assert request(proxy.port, "GET", path)[0] == 200


def test_one_huge_header_is_431(proxy, upstream):
    with connect(proxy.port) as sock:
        refused_and_closed(sock, f"GET /echo HTTP/1.1\r\n{HEAD}X-Big: {'b' * 2000}\r\n\r\n".encode(), 431)
    assert upstream.requests == []


def test_a_header_that_never_ends_is_431_before_it_ends(proxy, upstream):
    # The proxy must not hold an endless header value waiting for its end.
    with connect(proxy.port) as sock:
        sock.sendall(f"GET /echo HTTP/1.1\r\n{HEAD}X-Big: ".encode() + b"b" * 100)
        wait_until(proxy.loop_thread, lambda: any(c.parsing is not None for c in proxy.app.connections))
        sock.sendall(b"b" * 4096)
        refused_and_closed(sock, None, 431)
    assert upstream.requests == []


@pytest.mark.parametrize("extra, status", [(4, 200), (5, 431)])
def test_header_count_is_limited(proxy, upstream, extra, status):
    # Every field line counts, also those never forwarded: 6 + 4 = 10 is the limit.
    fields = "".join(f"X-Field-{index}: {index}\r\n" for index in range(extra))
    never_forwarded = "Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nConnection: close\r\n"
    with connect(proxy.port) as sock:
        got, headers, _ = exchange(sock, f"GET /echo HTTP/1.1\r\n{HEAD}{never_forwarded}{fields}\r\n".encode())
    assert got == status
    assert len(upstream.requests) == (1 if status == 200 else 0)


def test_a_content_length_over_the_limit_is_413_before_any_body_is_read(proxy, upstream):
    with connect(proxy.port) as sock:
        # Only the head is sent: the answer cannot depend on reading the body.
        refused_and_closed(sock, f"POST /echo HTTP/1.1\r\n{HEAD}Content-Length: 1001\r\n\r\n".encode(), 413)
    assert upstream.requests == []
    status, _, body = request(proxy.port, "POST", "/echo", body=b"x" * 1000)
    assert status == 200
    assert json.loads(body)["body_len"] == 1000


def test_a_chunked_body_growing_past_the_limit_is_413_and_never_arrives_whole(proxy, upstream):
    assert request(proxy.port, "GET", "/echo/warm-up")[0] == 200    # an idle upstream connection waits
    with connect(proxy.port) as sock:
        sock.sendall(f"POST /echo HTTP/1.1\r\n{HEAD}Transfer-Encoding: chunked\r\n\r\n".encode())
        for _ in range(2):
            sock.sendall(b"190\r\n" + b"c" * 400 + b"\r\n")               # 800 bytes: within the limit
        refused_and_closed(sock, b"190\r\n" + b"c" * 400 + b"\r\n0\r\n\r\n", 413)
    assert [entry[1] for entry in upstream.requests] == ["/echo/warm-up"]


def test_a_body_past_the_limit_after_the_response_began_aborts_both_sides(raw_upstream, make_proxy):
    # The upstream answers before reading the body; the client keeps sending past the
    # limit. The response cannot turn into a 413 any more: the client connection is
    # aborted, so the response is visibly cut, and the upstream never gets the body's end.
    received = []
    finished = []

    async def answer_early(upstream, index, reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nearly\r\n")
            while data := await reader.read(65536):
                received.append(data)
        finally:
            finished.append(True)          # the proxy closed its side: all it sent is in `received`

    raw_upstream.script = answer_early
    # Bodies stream (none is read whole first), so the upstream can answer before the body is in.
    proxy = make_proxy(raw_upstream.port, limits=LIMITS + "  buffered_body_bytes: 0\n")
    with connect(proxy.port) as sock:
        sock.sendall(f"POST /echo HTTP/1.1\r\n{HEAD}Transfer-Encoding: chunked\r\n\r\n".encode())
        reader = HttpReader(sock)
        assert reader.read_line() == b"HTTP/1.1 200 OK"
        while reader.read_line():
            pass
        assert int(reader.read_line(), 16) == 5
        assert reader.read_exact(5) == b"early"
        try:
            sock.sendall(b"3e8\r\n" + b"c" * 1000 + b"\r\n" + b"1\r\nc\r\n0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        rest = reader.buffer + read_until_closed(sock)
    assert b"0\r\n\r\n" not in rest                 # never a clean end of the response
    wait_until(proxy.loop_thread, lambda: finished == [True])
    assert raw_upstream.connections == 1
    assert b"".join(received).endswith(b"c" * 1000 + b"\r\n")     # the body up to the limit, then cut


def test_a_refused_body_costs_the_customer_no_quota(proxy, upstream):
    # 998 of 1000 calls used: a request refused for its size is not counted, so two fit after it.
    assert request(proxy.port, "GET", "/echo/warm-up")[0] == 200
    with connect(proxy.port) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-nearquota\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        refused_and_closed(sock, b"3e9\r\n" + b"c" * 1001 + b"\r\n", 413)
    first = request(proxy.port, "GET", "/echo", key="k-nearquota")
    second = request(proxy.port, "GET", "/echo", key="k-nearquota")
    assert (first[0], second[0]) == (200, 200)
    assert second[1]["ratelimit"].startswith('"api_calls";r=0;')


# -- time -------------------------------------------------------------------------------

def test_headers_that_do_not_arrive_in_time_are_408(proxy, upstream):
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: api.te")
        wait_until(proxy.loop_thread, lambda: any(c.parsing is not None for c in proxy.app.connections))
        proxy.sweep(4)                               # within the header timeout: still waiting
        assert [c.closing for c in connections(proxy)] == [False]
        proxy.sweep(6)
        refused_and_closed(sock, None, 408)
    assert upstream.requests == []


def test_a_late_pipelined_request_is_408_only_after_the_one_before_it_is_answered(proxy, upstream):
    with connect(proxy.port) as sock:
        sock.sendall(f"GET /slow HTTP/1.1\r\n{HEAD}\r\n".encode())
        wait_until(proxy.loop_thread, lambda: any(entry[1] == "/slow" for entry in upstream.requests))
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: api.te")
        wait_until(proxy.loop_thread, lambda: any(c.parsing is not None for c in proxy.app.connections))
        proxy.sweep(6)
        upstream.gate("slow").set()
        reader = HttpReader(sock)
        status, headers, body, _ = reader.read_response()
        assert (status, body) == (200, b"finally")
        assert "connection" not in headers
        late = reader.read_response()
        assert late[0] == 408 and late[1]["connection"] == "close"
        assert reader.buffer + read_until_closed(sock) == b""


def test_a_connection_that_never_sends_a_request_is_closed_after_the_header_timeout(proxy):
    with connect(proxy.port) as sock:
        wait_until(proxy.loop_thread, lambda: len(proxy.app.connections) == 1)
        proxy.sweep(6)
        assert read_until_closed(sock) == b""


def test_an_idle_keep_alive_connection_is_closed_without_a_response(proxy, upstream):
    with connect(proxy.port) as sock:
        reader = HttpReader(sock)
        sock.sendall(f"GET /echo/1 HTTP/1.1\r\n{HEAD}\r\n".encode())
        assert reader.read_response()[0] == 200
        proxy.sweep(29)                              # not idle long enough yet
        sock.sendall(f"GET /echo/2 HTTP/1.1\r\n{HEAD}\r\n".encode())
        assert reader.read_response()[0] == 200
        proxy.sweep(31)
        assert reader.buffer + read_until_closed(sock) == b""
    assert [entry[1] for entry in upstream.requests] == ["/echo/1", "/echo/2"]


# -- connections --------------------------------------------------------------------------

def test_connections_over_the_limit_get_503_while_the_others_keep_working(proxy, upstream):
    with connect(proxy.port) as first, connect(proxy.port) as second:
        wait_until(proxy.loop_thread, lambda: len(proxy.app.connections) == 2)
        with connect(proxy.port) as third:
            refused_and_closed(third, None, 503)
        assert proxy.app.metrics.request_count("", "too_many_connections") == 1
        for sock in (first, second):
            assert exchange(sock, f"GET /echo HTTP/1.1\r\n{HEAD}\r\n".encode())[0] == 200
        assert len(upstream.requests) == 2
    # Closed connections free their places.
    wait_until(proxy.loop_thread, lambda: len(proxy.app.connections) == 0)
    assert request(proxy.port, "GET", "/echo")[0] == 200


def test_a_refused_upload_is_read_by_the_client_not_reset(proxy, upstream):
    # The client keeps sending a body the proxy refused by its Content-Length; the
    # proxy drains it after answering, so the 413 arrives instead of a reset.
    with connect(proxy.port) as sock:
        sock.sendall(f"POST /echo HTTP/1.1\r\n{HEAD}Content-Length: 5000000\r\n\r\n".encode())
        sent = 0
        while sent < 2_000_000:
            sock.sendall(b"x" * 65536)
            sent += 65536
        response = read_until_closed(sock)
    assert response.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in response
    assert upstream.requests == []


def test_a_lingering_connection_is_closed_by_the_sweep(proxy, upstream):
    with connect(proxy.port) as sock:
        sock.sendall(f"POST /echo HTTP/1.1\r\n{HEAD}Content-Length: 5000000\r\n\r\nxyz".encode())
        reader = HttpReader(sock)
        status, _, _, _ = reader.read_response()
        assert status == 413
        wait_until(proxy.loop_thread, lambda: any(c.lingering for c in proxy.app.connections))
        proxy.sweep(60)
        wait_until(proxy.loop_thread, lambda: not proxy.app.connections)
