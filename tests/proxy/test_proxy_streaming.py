# Bodies stream through the running proxy in both directions without being held:
# chunked and Content-Length uploads, chunked and SSE responses read piece by piece as
# the upstream sends them, a large response to a slow reader (back-pressure), a
# close-delimited response re-framed for HTTP/1.1, and WebSocket tunnels.
import asyncio
import hashlib
import json
import socket
import threading

import aiohttp
import pytest
from conftest import (
    SOCKET_TIMEOUT_S,
    HttpReader,
    connect,
    read_until_closed,
    request,
    wait_until,
)

MIB = 1024 * 1024


@pytest.fixture
def proxy(upstream, make_proxy):
    return make_proxy(upstream.port)


def read_head(reader):
    """(status, headers) of the next response, leaving its body unread."""
    return reader.read_response(head_only=True)[:2]


def read_chunk(reader):
    """The data of the next chunk of a chunked body (b"" for the last chunk)."""
    size = int(reader.read_line().split(b";")[0], 16)
    if size == 0:
        reader.read_line()
        return b""
    data = reader.read_exact(size)
    assert reader.read_line() == b""
    return data


def read_until(reader, expected):
    """Chunks until their data adds up to `expected` (the proxy may split what the
    upstream wrote, never hold it back)."""
    data = b""
    while len(data) < len(expected):
        data += read_chunk(reader)
    assert data == expected
    return data


HEAD = "POST {path} HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n{framing}\r\n"


# -- request bodies ----------------------------------------------------------------------------

def test_a_chunked_upload_streams_to_the_upstream_piece_by_piece(proxy, upstream, loop_thread):
    # The first piece is past what the proxy holds before forwarding (buffered_body_bytes).
    pieces = [b"\xff" * (64 * 1024 + 1)] + [bytes([index]) * (1000 * (index + 1)) for index in range(5)]
    with connect(proxy.port) as sock:
        sock.sendall(HEAD.format(path="/collect", framing="Transfer-Encoding: chunked\r\n").encode())
        sent = 0
        for piece in pieces:
            sock.sendall(b"%x\r\n%b\r\n" % (len(piece), piece))
            sent += len(piece)
            # Each piece reaches the upstream before the client sends the next one.
            wait_until(loop_thread, lambda: sum(upstream.collected) == sent)
        sock.sendall(b"0\r\n\r\n")
        status, _, body, _ = HttpReader(sock).read_response()
    assert status == 200
    answer = json.loads(body)
    assert answer["chunked"] is True
    assert answer["body_len"] == sum(map(len, pieces))
    assert answer["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()


def test_a_chunked_upload_with_extensions_and_trailers_arrives_whole(proxy):
    body = b"".join(b"part-%d;" % index for index in range(50))
    framed = b"".join(b"%x;ext=%d\r\n%b\r\n" % (len(body[i:i + 37]), i, body[i:i + 37]) for i in range(0, len(body), 37))
    with connect(proxy.port) as sock:
        sock.sendall(HEAD.format(path="/echo/upload", framing="Transfer-Encoding: chunked\r\n").encode())
        sock.sendall(framed)
        sock.sendall(b"0\r\nX-Checksum: abc\r\n\r\n")
        status, _, answer, _ = HttpReader(sock).read_response()
    assert status == 200
    assert json.loads(answer)["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert json.loads(answer)["chunked"] is True


def test_a_content_length_upload_of_several_mib_streams_through(proxy, upstream):
    body = hashlib.sha256(b"seed").digest() * (8 * MIB // 32)
    with connect(proxy.port) as sock:
        sock.sendall(HEAD.format(path="/echo/big", framing=f"Content-Length: {len(body)}\r\n").encode())
        sender = threading.Thread(target=sock.sendall, args=(body,))
        sender.start()
        status, _, answer, _ = HttpReader(sock).read_response()
        sender.join(SOCKET_TIMEOUT_S)
    assert status == 200
    answer = json.loads(answer)
    assert answer["body_len"] == len(body)
    assert answer["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert answer["chunked"] is False
    assert answer["headers"]["content-length"] == str(len(body))


# -- response bodies ---------------------------------------------------------------------------

def test_a_chunked_response_arrives_as_the_upstream_sends_it(proxy, upstream):
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /stream?chunks=4 HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n")
        reader = HttpReader(sock)
        status, headers = read_head(reader)
        assert status == 200
        assert headers["transfer-encoding"] == "chunked"
        for index in range(4):
            # The upstream has not sent chunk index+1 yet: it waits for gate stream-<index>.
            read_until(reader, b"chunk-%d;" % index)
            if index < 3:
                upstream.gate(f"stream-{index}").set()
        assert read_chunk(reader) == b""
        # The connection carries on after the streamed response.
        sock.sendall(b"GET /echo/next HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n")
        assert json.loads(reader.read_response()[2])["path"] == "/echo/next"


def test_server_sent_events_arrive_one_by_one(proxy, upstream):
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /sse HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n"
                     b"Accept: text/event-stream\r\n\r\n")
        reader = HttpReader(sock)
        status, headers = read_head(reader)
        assert status == 200
        assert headers["content-type"] == "text/event-stream"
        assert headers["cache-control"] == "no-cache"
        for index in range(3):
            read_until(reader, b"data: event-%d\n\n" % index)
            if index < 2:
                upstream.gate(f"sse-{index}").set()
        assert read_chunk(reader) == b""


def test_an_http_1_0_client_gets_a_chunked_upstream_response_delimited_by_close(proxy, upstream):
    for index in range(2):
        upstream.gate(f"stream-{index}").set()
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /stream?chunks=3 HTTP/1.0\r\nAuthorization: Bearer k-pro\r\n\r\n")
        data = read_until_closed(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert b"\r\nconnection: close" in head.lower()
    assert body == b"chunk-0;chunk-1;chunk-2;"


def test_a_large_response_reaches_a_slow_reader_whole_with_bounded_buffering(upstream, make_proxy, loop_thread):
    # pool_size=1: the next request must reuse the same upstream connection.
    proxy = make_proxy(upstream.port, pool_size=1)
    size = 20 * MIB
    app = proxy.app
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /large?size=%d HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n" % size)
        # The client reads nothing yet: the proxy must stop reading the upstream
        # rather than hold the whole body in memory.
        wait_until(loop_thread, lambda: any(conn.writing_paused for conn in app.connections))
        buffered = loop_thread.call(lambda: max(conn.transport.get_write_buffer_size() for conn in app.connections))
        assert buffered < 2 * MIB
        reader = HttpReader(sock)
        status, headers = read_head(reader)
        assert status == 200
        assert headers["content-length"] == str(size)
        received = 0
        while received < size:
            # Small reads keep the proxy's write buffer full, pausing it again and again.
            piece = reader.read_exact(min(4096, size - received))
            assert piece == b"x" * len(piece)
            received += len(piece)
        sock.sendall(b"GET /echo/after HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n")
        status, _, body, _ = reader.read_response()
    assert status == 200
    assert json.loads(body)["path"] == "/echo/after"
    # A second client over the same (pooled) upstream connection.
    assert request(proxy.port, "GET", "/echo/again")[0] == 200
    assert proxy.pool().connects_total == 1


def close_delimited_script(body_parts):
    async def script(raw, index, reader, writer):
        if await raw.read_request(reader, index) is None:
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
        for part in body_parts:
            writer.write(part)
            await writer.drain()
    return script


def test_a_close_delimited_response_is_reframed_as_chunked_for_http_1_1(raw_upstream, make_proxy):
    parts = [b"first-part;", b"y" * 300_000, b";last-part"]
    raw_upstream.script = close_delimited_script(parts)
    proxy = make_proxy(raw_upstream.port)
    with connect(proxy.port) as sock:
        reader = HttpReader(sock)
        for _ in range(2):
            sock.sendall(b"GET /closing HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n")
            status, headers, body, framing = reader.read_response()
            assert status == 200
            assert framing == "chunked"
            assert body == b"".join(parts)
            # The client's connection outlives the upstream's.
            assert "connection" not in headers
    assert raw_upstream.connections == 2


def test_a_close_delimited_response_stays_close_delimited_for_http_1_0(raw_upstream, make_proxy):
    parts = [b"old-client;", b"z" * 100_000]
    raw_upstream.script = close_delimited_script(parts)
    proxy = make_proxy(raw_upstream.port)
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /closing HTTP/1.0\r\nAuthorization: Bearer k-pro\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body, framing = HttpReader(sock).read_response()
    assert status == 200
    assert framing == "close"
    assert headers["connection"] == "close"
    assert body == b"".join(parts)


# -- WebSocket ---------------------------------------------------------------------------------

def test_a_websocket_echoes_both_ways_through_the_proxy(proxy, upstream, loop_thread):
    async def session():
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(f"http://127.0.0.1:{proxy.port}/ws",
                                         headers={"Authorization": "Bearer k-pro"}) as ws:
                replies = []
                for message in ("hello", "x" * 100_000, "bye"):
                    await ws.send_str(message)
                    replies.append((await ws.receive(timeout=SOCKET_TIMEOUT_S)).data)
                return replies

    replies = loop_thread.run(session())
    assert replies == ["echo:hello", "echo:" + "x" * 100_000, "echo:bye"]
    # The tunnel is gone from the pool's count once it closed.
    wait_until(loop_thread, lambda: proxy.pool().open_count == 0 and not proxy.app.connections)


def test_a_websocket_upgrade_is_decided_before_it_is_forwarded(proxy, upstream, loop_thread):
    async def session():
        async with aiohttp.ClientSession() as client:
            try:
                async with client.ws_connect(f"http://127.0.0.1:{proxy.port}/ws",
                                             headers={"Authorization": "Bearer k-blocked"}):
                    return 101
            except aiohttp.WSServerHandshakeError as refusal:
                return refusal.status

    assert loop_thread.run(session()) == 429
    assert proxy.pool().connects_total == 0


def test_a_refused_upgrade_never_switches_the_connection(proxy, upstream):
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-blocked\r\n"
                     b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        reader = HttpReader(sock)
        status, headers, body, _ = reader.read_response()
        assert status == 429
        assert json.loads(body)["reason"] == "margin_blocked"
        # Nothing switched: the connection still speaks HTTP, decided request by request.
        sock.sendall(b"GET /echo/plain HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n")
        status, _, body, _ = reader.read_response()
        assert status == 200 and json.loads(body)["path"] == "/echo/plain"
        # Bytes that are not HTTP are refused, never relayed anywhere.
        sock.sendall(b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 400 ")
    assert [path for _, path, _, _, _ in upstream.requests] == ["/echo/plain"]


WEBSOCKET_HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n"
                       b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


def text_frame(text):
    """A masked client text frame (short payloads only)."""
    payload, mask = text.encode(), b"\x01\x02\x03\x04"
    return bytes((0x81, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def echoed(sock, reader, text):
    sock.sendall(text_frame(text))
    head = reader.read_exact(2)
    return reader.read_exact(head[1] & 0x7F).decode()


def test_an_idle_websocket_is_closed_after_the_upstream_read_timeout(proxy, upstream, loop_thread):
    # read_timeout_s is 30 for this proxy's upstream.
    with connect(proxy.port) as sock:
        sock.sendall(WEBSOCKET_HANDSHAKE)
        reader = HttpReader(sock)
        assert reader.read_response()[0] == 101
        assert echoed(sock, reader, "first") == "echo:first"
        proxy.sweep(0)                  # bytes crossed since the last sweep: the idle clock starts over
        proxy.sweep(25)                 # idle, but not for long enough
        assert echoed(sock, reader, "still open") == "echo:still open"
        proxy.sweep(0)
        proxy.sweep(31)
        assert reader.buffer + read_until_closed(sock) == b""
    wait_until(loop_thread, lambda: proxy.pool().open_count == 0 and not proxy.app.connections)


def switch_then(then):
    """A raw upstream script: answer the upgrade with 101, then run `then(reader, writer)`."""
    async def script(upstream, index, reader, writer):
        await upstream.read_request(reader, index)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        await writer.drain()
        await then(reader, writer)
    return script


def the_tunnel(app):
    [client] = app.connections
    return client, client.tunnel


def test_a_websocket_client_faster_than_its_upstream_is_held_back_not_buffered(raw_upstream, make_proxy,
                                                                                loop_thread):
    stalled = asyncio.Event()

    async def never_read(reader, writer):
        await stalled.wait()
    raw_upstream.script = switch_then(never_read)
    proxy = make_proxy(raw_upstream.port)
    with connect(proxy.port) as sock:
        sock.sendall(WEBSOCKET_HANDSHAKE)
        assert HttpReader(sock).read_response()[0] == 101
        flood = threading.Thread(target=send_until_closed, args=(sock, 64 * MIB), daemon=True)
        flood.start()
        # The upstream reads nothing: the proxy stops reading the client instead of
        # holding what it sends.
        wait_until(loop_thread, lambda: the_tunnel(proxy.app)[0].reading_paused_by != 0)
        held = loop_thread.call(lambda: the_tunnel(proxy.app)[1].transport.get_write_buffer_size())
        assert held < 2 * MIB
        assert flood.is_alive()             # the client is blocked, not done
        loop_thread.call(stalled.set)
    flood.join(SOCKET_TIMEOUT_S)


def test_a_websocket_upstream_faster_than_its_client_is_held_back_not_buffered(raw_upstream, make_proxy,
                                                                                loop_thread):
    written = []

    async def flood(reader, writer):
        chunk = b"\x82\x7f" + (65536).to_bytes(8, "big") + b"x" * 65536
        while sum(written) < 64 * MIB:
            writer.write(chunk)
            await writer.drain()
            written.append(len(chunk))
    raw_upstream.script = switch_then(flood)
    proxy = make_proxy(raw_upstream.port)
    with connect(proxy.port) as sock:
        sock.sendall(WEBSOCKET_HANDSHAKE)
        assert HttpReader(sock).read_response()[0] == 101
        # The client reads nothing more: the proxy stops reading the upstream.
        wait_until(loop_thread, lambda: the_tunnel(proxy.app)[1].reading_paused)
        held = loop_thread.call(lambda: the_tunnel(proxy.app)[0].transport.get_write_buffer_size())
        assert held < 2 * MIB
        assert loop_thread.call(lambda: sum(written)) < 64 * MIB


def send_until_closed(sock, size):
    try:
        sock.sendall(b"x" * size)
    except OSError:
        pass


# -- a response that ends while the client lags ------------------------------------------------

PART_BYTES = 4 * MIB
TAIL_BYTES = 200 * 1024
LAGGING_BODY = b"a" * PART_BYTES + b"b" * TAIL_BYTES


def lagging_tail_script(gate):
    """/tail: a chunked response whose first 4 MiB go out at once and whose last
    200 KiB and end follow in one write when `gate` opens; anything else: `next`."""
    async def script(raw, index, reader, writer):
        while (got := await raw.read_request(reader, index)) is not None:
            if got[1] == "/tail":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n"
                             % (PART_BYTES, b"a" * PART_BYTES))
                await asyncio.get_running_loop().run_in_executor(None, gate.wait, SOCKET_TIMEOUT_S)
                writer.write(b"%x\r\n%b\r\n0\r\n\r\n" % (TAIL_BYTES, b"b" * TAIL_BYTES))
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
    return script


class LaggingClient:
    """A client whose GET /tail response ends while it is not reading: the last 200 KiB
    arrive when the proxy's socket to it is full, so the proxy has to pause in the very
    read that completes the response. `pipelined` is sent right after the request."""

    def __init__(self, proxy, loop_thread, pipelined=b""):
        app = proxy.app
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        self.sock.settimeout(SOCKET_TIMEOUT_S)
        self.sock.connect(("127.0.0.1", proxy.port))
        wait_until(loop_thread, lambda: len(app.connections) == 1)
        self.conn = conn = loop_thread.call(lambda: next(iter(app.connections)))
        # A small send buffer on the proxy's side stands in for a slow, distant client.
        loop_thread.call(lambda: conn.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 16384))
        self.sock.sendall(b"GET /tail HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n"
                          + pipelined)
        wait_until(loop_thread, lambda: conn.writing_paused)
        # Room for the whole tail on the proxy's side of the upstream connection, so it
        # arrives in one read.
        loop_thread.call(lambda: conn.exchanges[0].upstream.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, MIB))
        self.reader = HttpReader(self.sock)
        status, headers = read_head(self.reader)
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        # Read just enough for the proxy to have taken the first part and be writable
        # again, a little at a time so its socket to us stays nearly full.
        self.raw = [self.reader.buffer]
        self.reader.buffer = b""
        while not loop_thread.call(lambda: conn.exchanges[0].response_bytes == PART_BYTES
                                   and not conn.writing_paused):
            data = self.sock.recv(4096)
            assert data, "the proxy closed the connection"
            self.raw.append(data)

    def read_tail(self):
        """The whole /tail body, read to its end (what follows stays in the reader)."""
        self.reader.buffer = b"".join(self.raw) + self.reader.buffer
        body = []
        while (data := read_chunk(self.reader)):
            body.append(data)
        return b"".join(body)


def test_an_upstream_connection_released_while_the_client_lags_serves_the_next_request(
        raw_upstream, upstream, make_proxy, loop_thread):
    gate = upstream.gate("tail")
    raw_upstream.script = lagging_tail_script(gate)
    proxy = make_proxy(raw_upstream.port, pool_size=1)
    client = LaggingClient(proxy, loop_thread)
    with client.sock:
        gate.set()
        wait_until(loop_thread, lambda: not client.conn.exchanges and len(proxy.pool().idle) == 1)
        # Another client, over the same pooled upstream connection, while the first
        # one still has not read the end of its response.
        status, _, body = request(proxy.port, "GET", "/next")
        assert (status, body) == (200, b"next")
        assert client.read_tail() == LAGGING_BODY
    assert raw_upstream.connections == 1


def test_the_next_pipelined_response_is_held_back_while_the_client_lags(
        raw_upstream, upstream, make_proxy, loop_thread):
    gate = upstream.gate("tail")
    raw_upstream.script = lagging_tail_script(gate)
    routes = ("  - {name: large, upstream: web, path_prefix: /large}\n"
              "  - {name: everything, upstream: main, path_prefix: /}\n")
    proxy = make_proxy(raw_upstream.port, routes=routes,
                       extra_upstreams=f'  web: {{url: "http://127.0.0.1:{upstream.port}"}}\n')
    size = 8 * MIB
    client = LaggingClient(proxy, loop_thread, pipelined=(
        b"GET /large?size=%d HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n" % size))
    conn = client.conn
    with client.sock:
        gate.set()
        # The pipelined request is forwarded, but its response must wait for the
        # client instead of piling up in the proxy's memory.
        wait_until(loop_thread, lambda: len(conn.exchanges) == 1 and conn.exchanges[0].upstream is not None
                   and conn.exchanges[0].upstream.transport.is_reading() is False)
        assert loop_thread.call(lambda: conn.transport.get_write_buffer_size()) < MIB
        assert client.read_tail() == LAGGING_BODY
        status, headers, body, _ = client.reader.read_response()
    assert status == 200
    assert len(body) == size and body == b"x" * size


# -- interim responses and early answers -----------------------------------------------------------

def test_expect_100_continue_is_relayed_before_the_body_is_sent(proxy):
    body = b"q" * 300_000
    with connect(proxy.port) as sock:
        sock.sendall(HEAD.format(path="/echo/expect", framing=f"Content-Length: {len(body)}\r\n"
                                 "Expect: 100-continue\r\n").encode())
        reader = HttpReader(sock)
        # curl and others wait for this before sending a large body.
        status, _ = read_head(reader)
        assert status == 100
        sock.sendall(body)
        status, _, answer, _ = reader.read_response()
    assert status == 200
    assert json.loads(answer)["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_an_upstream_answering_before_the_upload_ends_leaves_the_connection_usable(proxy, upstream):
    body = b"u" * (2 * MIB)
    with connect(proxy.port) as sock:
        sock.sendall(HEAD.format(path="/status/413", framing=f"Content-Length: {len(body)}\r\n").encode())
        sender = threading.Thread(target=sock.sendall, args=(body,))
        sender.start()
        reader = HttpReader(sock)
        status, _, answer, _ = reader.read_response()
        sender.join(SOCKET_TIMEOUT_S)
        assert status == 413
        assert answer == b"status body"
        # The rest of the upload is read and dropped; the next request is a request.
        sock.sendall(b"GET /echo/next HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n")
        status, _, answer, _ = reader.read_response()
    assert status == 200
    assert json.loads(answer)["path"] == "/echo/next"
