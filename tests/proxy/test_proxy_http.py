# HTTP/1.1 forwarding through the running proxy, over real sockets: what reaches the
# upstream (request line, body, header hygiene, X-Forwarded-*), keep-alive on both
# sides, the pool's connection limit, pipelining, and bodiless responses.
import hashlib
import json
import threading
import time

import pytest
from conftest import HttpReader, connect, read_until_closed, request, wait_until


@pytest.fixture
def proxy(upstream, make_proxy):
    return make_proxy(upstream.port)


def send(sock, method, path, *, key="k-pro", headers=(), body=None, version="1.1", host="api.test"):
    """Write one request on an open socket; `headers` is a sequence of (name, value)."""
    lines = [f"{method} {path} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    if key:
        lines.append(f"Authorization: Bearer {key}")
    lines += [f"{name}: {value}" for name, value in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))


def inspected(port, method="GET", path="/inspect", **kwargs):
    """(status, response headers, what /inspect saw) for one request on a fresh connection."""
    with connect(port) as sock:
        send(sock, method, path, headers=[("Connection", "close")] + list(kwargs.pop("headers", ())), **kwargs)
        status, headers, body, _ = HttpReader(sock).read_response()
    return status, headers, json.loads(body)


def fields(seen, name):
    """Every value the upstream got for header `name`, in order."""
    return [value for field, value in seen["raw_headers"] if field == name]


# -- the request line and body ---------------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_method_target_and_body_reach_the_upstream_unchanged(proxy, method):
    body = None if method in ("GET", "OPTIONS") else bytes(range(256)) * 40 + b"\r\n0\r\n\r\n"
    target = "/inspect/a%20b/%3Bc/%C3%A9?q=1&r=%2F&s=a+b&empty=&t;p=../..//x"
    status, _, seen = inspected(proxy.port, method, target, body=body)
    assert status == 200
    assert seen["method"] == method
    assert seen["raw_path"] == target
    assert seen["version"] == "1.1"
    assert seen["body_len"] == len(body or b"")
    assert seen["body_sha256"] == hashlib.sha256(body or b"").hexdigest()


def test_an_absolute_form_target_is_sent_as_a_path_with_its_host(proxy):
    status, _, seen = inspected(proxy.port, "GET", "http://other.test:8080/inspect/x?y=1")
    assert status == 200
    assert seen["raw_path"] == "/inspect/x?y=1"
    assert fields(seen, "host") == ["other.test:8080"]


def test_end_to_end_headers_are_forwarded_with_their_values_and_repeats(proxy):
    _, _, seen = inspected(proxy.port, headers=[
        ("Accept", "application/json"), ("X-Custom", "one"), ("X-Custom", "two"),
        ("Cookie", "a=1; b=2"), ("User-Agent", "tester/1.0"),
    ])
    assert fields(seen, "accept") == ["application/json"]
    assert fields(seen, "x-custom") == ["one", "two"]
    assert fields(seen, "cookie") == ["a=1; b=2"]
    assert fields(seen, "user-agent") == ["tester/1.0"]
    assert fields(seen, "authorization") == []       # the customer's key stays at the edge
    assert fields(seen, "host") == ["api.test"]


# -- hop-by-hop hygiene ---------------------------------------------------------------------

HOP_BY_HOP_SENT = [
    ("Connection", "keep-alive, X-Drop-Me"), ("Connection", "X-Drop-Too"),
    ("X-Drop-Me", "1"), ("X-Drop-Too", "2"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
    ("Trailer", "X-Checksum"), ("Upgrade", "h2c"), ("Proxy-Authorization", "Basic c2VjcmV0"),
    ("Proxy-Connection", "keep-alive"), ("X-Kept", "yes"),
]


def test_hop_by_hop_headers_and_those_named_in_connection_never_reach_the_upstream(proxy):
    with connect(proxy.port) as sock:
        send(sock, "GET", "/inspect", headers=HOP_BY_HOP_SENT)
        status, _, body, _ = HttpReader(sock).read_response()
    seen = json.loads(body)
    assert status == 200
    names = {name for name, _ in seen["raw_headers"]}
    for dropped in ("connection", "keep-alive", "te", "trailer", "upgrade", "proxy-authorization",
                    "proxy-connection", "x-drop-me", "x-drop-too"):
        assert dropped not in names
    assert fields(seen, "x-kept") == ["yes"]


def test_hop_by_hop_headers_from_the_upstream_never_reach_the_client(proxy):
    # /echo answers with `Connection: keep-alive, X-Secret-Hop`, `X-Secret-Hop` and `Keep-Alive`.
    with connect(proxy.port) as sock:
        send(sock, "GET", "/echo")
        status, headers, _, framing = HttpReader(sock).read_response()
    assert status == 200
    assert headers["x-upstream"] == "yes"
    for dropped in ("connection", "keep-alive", "x-secret-hop", "x-aforo-throttle"):
        assert dropped not in headers
    assert framing == "length"


def test_a_client_cannot_strip_the_proxys_own_headers_through_connection(proxy):
    _, _, seen = inspected(proxy.port, headers=[
        ("Connection", "X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, X-Aforo-Customer"),
    ])
    assert fields(seen, "x-forwarded-for") == ["127.0.0.1"]
    assert fields(seen, "x-forwarded-proto") == ["http"]
    assert fields(seen, "x-forwarded-host") == ["api.test"]
    assert fields(seen, "x-aforo-customer") == ["cus_pro"]


def test_a_client_cannot_forge_the_proxys_headers_to_the_upstream(proxy):
    _, _, seen = inspected(proxy.port, headers=[
        ("X-Aforo-Customer", "cus_free"), ("x-aforo-customer", "cus_blocked"),
        ("X-Aforo-Throttle", "true"), ("X-Aforo-Anything", "1"),
    ])
    assert fields(seen, "x-aforo-customer") == ["cus_pro"]
    assert [name for name, _ in seen["raw_headers"] if name.startswith("x-aforo-")] == ["x-aforo-customer"]


# -- X-Forwarded-* -----------------------------------------------------------------------------

FORGED_FORWARDING = [
    ("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "7.7.7.7"), ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.test"), ("Forwarded", "for=6.6.6.6;proto=https"),
]


def test_forwarding_headers_come_from_the_socket_when_the_peer_is_not_trusted(proxy):
    _, _, seen = inspected(proxy.port, headers=FORGED_FORWARDING)
    assert fields(seen, "x-forwarded-for") == ["127.0.0.1"]
    assert fields(seen, "x-forwarded-proto") == ["http"]
    assert fields(seen, "x-forwarded-host") == ["api.test"]
    assert fields(seen, "forwarded") == []


def test_a_trusted_proxys_forwarding_headers_are_kept_and_extended(upstream, make_proxy):
    proxy = make_proxy(upstream.port, trusted="[127.0.0.1/32]")
    _, _, seen = inspected(proxy.port, headers=FORGED_FORWARDING)
    # Every hop the trusted proxy reported, in order, then the trusted proxy itself.
    assert fields(seen, "x-forwarded-for") == ["6.6.6.6, 7.7.7.7, 127.0.0.1"]
    assert fields(seen, "x-forwarded-proto") == ["https"]
    assert fields(seen, "x-forwarded-host") == ["evil.test"]


def test_a_trusted_proxy_without_forwarding_headers_gets_the_socket_values(upstream, make_proxy):
    proxy = make_proxy(upstream.port, trusted="[127.0.0.1/32]")
    _, _, seen = inspected(proxy.port)
    assert fields(seen, "x-forwarded-for") == ["127.0.0.1"]
    assert fields(seen, "x-forwarded-proto") == ["http"]
    assert fields(seen, "x-forwarded-host") == ["api.test"]


# -- keep-alive --------------------------------------------------------------------------------

def test_requests_on_one_connection_are_answered_in_order_over_one_upstream_connection(proxy, upstream):
    paths = [f"/echo/{index}?n={index}" for index in range(5)]
    with connect(proxy.port) as sock:
        reader = HttpReader(sock)
        answers = []
        for index, path in enumerate(paths):
            send(sock, "POST" if index % 2 else "GET", path, body=b"b" * index if index % 2 else None)
            status, headers, body, _ = reader.read_response()
            assert status == 200
            assert "connection" not in headers
            answers.append(json.loads(body))
    assert [answer["path"] for answer in answers] == paths
    assert len({answer["peer_port"] for answer in answers}) == 1
    assert proxy.pool().connects_total == 1


def test_an_http_1_0_client_without_keep_alive_gets_the_connection_closed(proxy, upstream):
    with connect(proxy.port) as sock:
        send(sock, "GET", "/inspect/old", version="1.0", host=None)
        data = read_until_closed(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nconnection: close" in head.lower()
    seen = json.loads(body)
    assert seen["raw_path"] == "/inspect/old"
    # Forwarded as HTTP/1.1, which needs a Host: the upstream's own.
    assert fields(seen, "host") == [f"127.0.0.1:{upstream.port}"]


def test_an_http_1_0_client_asking_for_keep_alive_is_told_and_kept(proxy):
    with connect(proxy.port) as sock:
        reader = HttpReader(sock)
        for path in ("/echo/one", "/echo/two"):
            send(sock, "GET", path, version="1.0", headers=[("Connection", "keep-alive")])
            status, headers, body, framing = reader.read_response()
            assert status == 200
            # An HTTP/1.0 client only keeps a connection the response says is kept.
            assert headers["connection"].lower() == "keep-alive"
            assert framing == "length"
            assert json.loads(body)["path"] == path


def test_connection_close_is_honoured(proxy):
    with connect(proxy.port) as sock:
        send(sock, "GET", "/echo/last", headers=[("Connection", "close")])
        reader = HttpReader(sock)
        status, headers, body, _ = reader.read_response()
        assert status == 200
        assert headers["connection"] == "close"
        assert read_until_closed(sock) == b""
    assert json.loads(body)["path"] == "/echo/last"


# -- the pool's limit ---------------------------------------------------------------------------

def test_a_full_pool_makes_the_next_request_wait_then_serves_it(upstream, make_proxy, loop_thread):
    proxy = make_proxy(upstream.port, pool_size=1)
    pool = proxy.pool()
    results = {}

    def client(name):
        results[name] = request(proxy.port, "GET", f"/slow?client={name}")

    first = threading.Thread(target=client, args=("a",))
    first.start()
    wait_until(loop_thread, lambda: len(upstream.requests) == 1)
    second = threading.Thread(target=client, args=("b",))
    second.start()
    wait_until(loop_thread, lambda: len(pool.waiters) == 1)
    assert loop_thread.call(lambda: pool.open_count) == 1
    assert len(upstream.requests) == 1
    upstream.gate("slow").set()
    first.join(10)
    second.join(10)
    assert results["a"][0] == 200 and results["a"][2] == b"finally"
    assert results["b"][0] == 200 and results["b"][2] == b"finally"
    assert [path for _, path, _, _, _ in upstream.requests] == ["/slow?client=a", "/slow?client=b"]
    assert pool.connects_total == 1


# -- pipelining -----------------------------------------------------------------------------------

def test_pipelined_requests_are_answered_in_order(proxy):
    pipeline = (
        b"GET /echo/first HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n"
        b"POST /echo/second HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n"
        b"Content-Length: 5\r\n\r\nhello"
        b"GET /echo/third HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n"
    )
    with connect(proxy.port) as sock:
        sock.sendall(pipeline)
        reader = HttpReader(sock)
        answers = [reader.read_response() for _ in range(3)]
    assert [status for status, _, _, _ in answers] == [200, 200, 200]
    bodies = [json.loads(body) for _, _, body, _ in answers]
    assert [body["path"] for body in bodies] == ["/echo/first", "/echo/second", "/echo/third"]
    assert [body["body_len"] for body in bodies] == [0, 5, 0]


@pytest.mark.parametrize("cuts", [(), (74,), (5, 22, 24, 74, 100), (70, 88, 100, 101)],
                         ids=["one write", "one read each", "first line cut", "both lines cut"])
def test_each_pipelined_request_is_answered_in_its_own_http_version(proxy, cuts):
    # An HTTP/1.1 request then an HTTP/1.0 one without keep-alive: the first keeps the
    # connection, the second is answered as HTTP/1.0 and closes it.
    pipeline = (
        b"GET /echo/eleven HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n"
        b"GET /echo/ten HTTP/1.0\r\nAuthorization: Bearer k-pro\r\n\r\n"
    )
    with connect(proxy.port) as sock:
        for start, end in zip((0, *cuts), (*cuts, len(pipeline))):
            sock.sendall(pipeline[start:end])
            time.sleep(0.01)      # each piece its own read
        reader = HttpReader(sock)
        first = reader.read_response()
        assert first[0] == 200 and first[3] == "length"
        assert "connection" not in first[1]
        status, headers, body, _ = reader.read_response()
        assert status == 200
        assert headers["connection"] == "close"
        assert read_until_closed(sock) == b""
    assert [json.loads(answer[2])["path"] for answer in (first, (status, headers, body))] == ["/echo/eleven", "/echo/ten"]


def test_a_pipelined_request_after_an_edge_refusal_is_still_answered(proxy):
    pipeline = (
        b"GET /echo/refused HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-nobody\r\n\r\n"
        b"GET /echo/served HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n"
    )
    with connect(proxy.port) as sock:
        sock.sendall(pipeline)
        reader = HttpReader(sock)
        refused = reader.read_response()
        served = reader.read_response()
    assert refused[0] == 401
    assert served[0] == 200
    assert json.loads(served[2])["path"] == "/echo/served"


# -- responses without a body ----------------------------------------------------------------------

@pytest.mark.parametrize("method, path, status", [
    ("HEAD", "/echo/head", 200),
    ("HEAD", "/large?size=100000", 200),
    ("GET", "/status/204", 204),
    ("GET", "/status/304", 304),
    ("HEAD", "/status/404", 404),
])
def test_bodiless_responses_leave_the_connection_usable(proxy, method, path, status):
    with connect(proxy.port) as sock:
        reader = HttpReader(sock)
        send(sock, method, path)
        got, headers, _, _ = reader.read_response(head_only=True)
        assert got == status
        assert "transfer-encoding" not in headers
        if path.startswith("/large"):
            assert headers["content-length"] == "100000"    # what a GET would get
        # Any stray body byte would now be read as the next status line.
        send(sock, "GET", "/echo/after")
        after, _, body, _ = reader.read_response()
        assert after == 200
        assert json.loads(body)["path"] == "/echo/after"
        assert reader.buffer == b""


def test_the_upstream_reason_phrase_reaches_the_client(raw_upstream, make_proxy):
    # Each response keeps its own phrase, even when the same status came before with
    # another; an upstream that sends none gets the standard one.
    phrases = [b"OK", b"Fine Thanks", b"OK", b""]

    async def script(raw, index, reader, writer):
        while (await raw.read_request(reader, index)) is not None:
            phrase = phrases.pop(0)
            writer.write(b"HTTP/1.1 200 " + phrase + b"\r\nContent-Length: 2\r\n\r\nok")
    raw_upstream.script = script
    proxy = make_proxy(raw_upstream.port)
    with connect(proxy.port) as sock:
        reader = HttpReader(sock)
        lines = []
        for _ in range(4):
            send(sock, "GET", "/phrase")
            line = reader.read_line()
            lines.append(line)
            reader.buffer = line + b"\r\n" + reader.buffer
            assert reader.read_response()[2] == b"ok"
    assert lines == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 Fine Thanks", b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"]


# -- interim responses --------------------------------------------------------------------------------

def test_an_interim_response_reaches_http_1_1_clients_only(raw_upstream, make_proxy):
    async def script(raw, index, reader, writer):
        while (await raw.read_request(reader, index)) is not None:
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                         b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
    raw_upstream.script = script
    proxy = make_proxy(raw_upstream.port)
    with connect(proxy.port) as sock:
        reader = HttpReader(sock)
        send(sock, "GET", "/hints")
        assert reader.read_response()[:2] == (103, {"link": "</style.css>; rel=preload"})
        assert reader.read_response()[2] == b"done"
    # RFC 9110 15.2: never a 1xx to an HTTP/1.0 client, which would take it as the answer.
    with connect(proxy.port) as sock:
        send(sock, "GET", "/hints", version="1.0", host=None)
        data = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert data.endswith(b"\r\n\r\ndone")
