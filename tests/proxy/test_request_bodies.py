# Request bodies and the timers that guard them, through real sockets: a body that
# stalls or trickles is cut with 408 and never reaches the upstream whole; small bodies
# are read before an upstream connection is taken, so slow clients cannot starve the
# pool; the upstream read timeout counts the upstream's silence once the request is
# sent, not the time the client takes to upload. Time moves only by sweep().
import asyncio
import json
import threading

import pytest

from conftest import HttpReader, connect, read_until_closed, request, wait_until

HEAD = "Host: api.test\r\nAuthorization: Bearer k-pro\r\n"
BODY_TIMEOUT_S = 10
LIMITS = f"""\
  body_timeout_s: {BODY_TIMEOUT_S}
  min_body_bytes_per_s: 1024
  buffered_body_bytes: 4096
"""


def post_head(path, length, extra=""):
    return f"POST {path} HTTP/1.1\r\n{HEAD}Content-Length: {length}\r\n{extra}\r\n".encode()


def refused_408(sock, detail_part):
    reader = HttpReader(sock)
    status, headers, body, _ = reader.read_response()
    assert (status, headers["connection"]) == (408, "close")
    assert detail_part in json.loads(body)["detail"]
    assert reader.buffer + read_until_closed(sock) == b""


def receiving_body(proxy):
    """True once a connection of the proxy is reading a request's body."""
    return lambda: any(c.parsing is not None and c.parsing.headers_done and c.parsing.request_bytes > 0
                       for c in proxy.app.connections)


@pytest.fixture
def proxy(upstream, make_proxy):
    return make_proxy(upstream.port, limits=LIMITS, pool_size=2)


def test_a_body_that_stalls_is_408_and_never_reaches_the_upstream(proxy, upstream):
    with connect(proxy.port) as sock:
        sock.sendall(post_head("/echo/stalled", 3000) + b"x" * 2500)
        wait_until(proxy.loop_thread, receiving_body(proxy))
        proxy.sweep(BODY_TIMEOUT_S - 1)                  # still within the body timeout
        sock.sendall(b"x" * 100)                          # progress: its clock starts over
        proxy.sweep(BODY_TIMEOUT_S + 1)
        refused_408(sock, "did not arrive in time")
    assert upstream.requests == []
    assert proxy.pool().connects_total == 0              # no upstream connection was even taken


def test_a_streamed_body_that_stalls_is_408_and_the_upstream_never_gets_it_whole(raw_upstream, make_proxy):
    # Larger than buffered_body_bytes: it streams, so the upstream has the head and part
    # of the body; the proxy cuts that connection, never completing the request.
    received = []
    closed = []

    async def read_all(upstream, index, reader, writer):
        try:
            while data := await reader.read(65536):
                received.append(data)
        finally:
            closed.append(True)

    raw_upstream.script = read_all
    proxy = make_proxy(raw_upstream.port, limits=LIMITS)
    with connect(proxy.port) as sock:
        sock.sendall(post_head("/upload", 20000) + b"y" * 8000)
        wait_until(proxy.loop_thread, lambda: sum(map(len, received)) > 8000)
        proxy.sweep(BODY_TIMEOUT_S + 1)
        refused_408(sock, "did not arrive in time")
    wait_until(proxy.loop_thread, lambda: closed == [True])
    forwarded = b"".join(received)
    assert forwarded.startswith(b"POST /upload HTTP/1.1\r\n")
    assert forwarded.endswith(b"y" * 8000)                 # what came, and not a byte more


def test_a_body_below_the_minimum_rate_is_408_though_it_never_stops(proxy, upstream):
    with connect(proxy.port) as sock:
        sock.sendall(post_head("/echo/trickle", 1000) + b"z")
        wait_until(proxy.loop_thread, receiving_body(proxy))
        for _ in range(3):                            # a byte now and then: never silent for long
            proxy.sweep(BODY_TIMEOUT_S - 1)
            sock.sendall(b"z")
        proxy.sweep(BODY_TIMEOUT_S + 1)               # 4 bytes past the body timeout: below 1024 bytes/s
        refused_408(sock, "slower than the proxy accepts (at least 1024 bytes/s)")
    assert upstream.requests == []


def test_slow_clients_cannot_hold_the_upstream_pool(proxy, upstream):
    # Seventy clients trickle a 1,000-byte body; the pool has 2 connections. Another
    # customer is served while they trickle, and they are all cut at the body timeout.
    tricklers = [connect(proxy.port) for _ in range(70)]
    try:
        for sock in tricklers:
            sock.sendall(post_head("/echo/trickle", 1000) + b"t")
        wait_until(proxy.loop_thread, lambda: sum(c.parsing is not None and c.parsing.request_bytes == 1
                                                  for c in proxy.app.connections) == 70)
        assert request(proxy.port, "GET", "/echo/meanwhile", key="k-free")[0] == 200
        assert request(proxy.port, "POST", "/echo/quick", body=b"q" * 1000)[0] == 200
        proxy.sweep(BODY_TIMEOUT_S + 1)
        for sock in tricklers:
            refused_408(sock, "slower than the proxy accepts")
    finally:
        for sock in tricklers:
            sock.close()
    assert [entry[1] for entry in upstream.requests] == ["/echo/meanwhile", "/echo/quick"]


def test_a_small_body_reaches_the_upstream_only_once_it_is_whole(proxy, upstream, loop_thread):
    with connect(proxy.port) as sock:
        sock.sendall(f"POST /echo/chunks HTTP/1.1\r\n{HEAD}Transfer-Encoding: chunked\r\n\r\n".encode())
        for index in range(3):
            sock.sendall(b"3e8\r\n" + bytes([65 + index]) * 1000 + b"\r\n")
        wait_until(loop_thread, lambda: any(c.parsing is not None and c.parsing.request_bytes == 3000
                                            for c in proxy.app.connections))
        assert proxy.pool().connects_total == 0       # nothing taken while the body arrives
        sock.sendall(b"0\r\n\r\n")
        status, _, body, _ = HttpReader(sock).read_response()
    assert status == 200
    assert json.loads(body)["body_len"] == 3000


def test_expect_100_continue_is_answered_by_the_proxy_for_a_body_it_reads_first(proxy, upstream):
    with connect(proxy.port) as sock:
        sock.sendall(post_head("/echo/expect", 10, "Expect: 100-continue\r\n"))
        reader = HttpReader(sock)
        assert reader.read_line() == b"HTTP/1.1 100 Continue"
        assert reader.read_line() == b""
        sock.sendall(b"0123456789")
        status, _, body, _ = reader.read_response()
    assert status == 200
    answer = json.loads(body)
    assert answer["body_len"] == 10 and "expect" not in answer["headers"]


def test_an_upload_slower_than_the_read_timeout_is_not_cut_and_the_timeout_counts_after_it(
        raw_upstream, make_proxy):
    # read_timeout_s is 5, the upload takes longer; the upstream answers only once it has
    # the whole body, then a second request gets no answer: 504 after the read timeout.
    async def answer_when_whole(upstream, index, reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(20000)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(30)                        # never answers the second

    raw_upstream.script = answer_when_whole
    proxy = make_proxy(raw_upstream.port, limits=LIMITS.replace("body_timeout_s: 10", "body_timeout_s: 60"),
                       read_timeout_s=5)
    with connect(proxy.port) as sock:
        reader = HttpReader(sock)
        sock.sendall(post_head("/upload", 20000) + b"u" * 10000)
        wait_until(proxy.loop_thread, lambda: proxy.pool().busy == 1)
        proxy.sweep(6)                                 # past the read timeout, mid-upload
        sock.sendall(b"u" * 10000)
        status, _, body, _ = reader.read_response()
        assert (status, body) == (200, b"ok")
        sock.sendall(f"GET /silent HTTP/1.1\r\n{HEAD}\r\n".encode())
        wait_until(proxy.loop_thread, lambda: any(c.exchanges and c.exchanges[0].upstream is not None
                                                  for c in proxy.app.connections))
        proxy.sweep(4)
        proxy.sweep(6)
        status, _, body, _ = reader.read_response()
    assert status == 504


def test_a_body_the_upstream_does_not_take_counts_against_the_upstream_not_the_client(
        raw_upstream, make_proxy):
    # The upstream reads the head and then nothing: the proxy stops reading the client,
    # which is not cut for the silence that causes (408); the upstream gets its 504.
    async def never_read(upstream, index, reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(30)

    raw_upstream.script = never_read
    proxy = make_proxy(raw_upstream.port, limits=LIMITS, read_timeout_s=30)
    size = 8 * 1024 * 1024
    with connect(proxy.port) as sock:
        sender = threading.Thread(target=lambda: _send_ignoring_errors(sock, post_head("/upload", size)
                                                                       + b"v" * size), daemon=True)
        sender.start()
        wait_until(proxy.loop_thread, lambda: any(c.reading_paused_by for c in proxy.app.connections))
        proxy.sweep(BODY_TIMEOUT_S + 1)
        assert [c.closing for c in proxy.loop_thread.call(lambda: list(proxy.app.connections))] == [False]
        proxy.sweep(31)
        status, _, body, _ = HttpReader(sock).read_response()
        assert status == 504
    sender.join(10)


def _send_ignoring_errors(sock, data):
    try:
        sock.sendall(data)
    except OSError:
        pass


def test_timeouts_fire_by_themselves_without_a_sweep(upstream, make_proxy):
    # The worker's own timer, not a test's sweep: a short setting, and the answer comes.
    # Each proxy has only one timeout short, so nothing else can fire first.
    headers_proxy = make_proxy(upstream.port, limits="  header_timeout_s: 0.2\n")
    body_proxy = make_proxy(upstream.port, limits="  body_timeout_s: 0.2\n")
    with connect(headers_proxy.port) as headers_late, connect(body_proxy.port) as body_late:
        headers_late.sendall(b"GET /echo HTTP/1.1\r\nHost: api.te")
        body_late.sendall(post_head("/echo/late", 10) + b"12345")
        refused_408(headers_late, "headers did not arrive in time")
        refused_408(body_late, "body did not arrive in time")
    assert upstream.requests == []
