# Hostile and malformed requests through the running proxy. Every framing a front end
# and a back end could read differently is refused with 400 (501 for a transfer coding
# the proxy does not implement), `Connection: close` and a closed socket; no complete
# request built from those bytes, nor anything pipelined behind them, reaches the upstream.
import json
import socket

import pytest
from conftest import HttpReader, connect, read_until_closed, request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# A valid request sent in the same send() right after the hostile bytes: if the proxy
# ever read the hostile request's end where it does not end, this is what would be
# forwarded or answered.
FOLLOWER = b"GET /echo/smuggled HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n"
HEAD = b"Host: api.test\r\nAuthorization: Bearer k-pro\r\n"


def post(headers, body=b""):
    """A POST to the echo route with a valid key, `headers` (raw lines) and raw `body`."""
    return b"POST /echo HTTP/1.1\r\n" + HEAD + headers + b"\r\n" + body


SMUGGLING = [
    # -- body length: exactly one of Content-Length / chunked, and a plain number ------
    ("cl-and-te", post(b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\nG"), 400),
    ("te-and-cl", post(b"Transfer-Encoding: chunked\r\nContent-Length: 6\r\n", b"0\r\n\r\nG"), 400),
    ("duplicate-cl-same", post(b"Content-Length: 3\r\nContent-Length: 3\r\n", b"abc"), 400),
    ("duplicate-cl-different", post(b"Content-Length: 3\r\nContent-Length: 40\r\n", b"abc"), 400),
    ("cl-plus-sign", post(b"Content-Length: +3\r\n", b"abc"), 400),
    ("cl-minus-sign", post(b"Content-Length: -3\r\n", b"abc"), 400),
    ("cl-list", post(b"Content-Length: 3, 3\r\n", b"abc"), 400),
    ("cl-garbage", post(b"Content-Length: 3x\r\n", b"abc"), 400),
    ("cl-underscore", post(b"Content-Length: 1_0\r\n", b"abcdefghij"), 400),
    ("cl-empty", post(b"Content-Length: \r\n", b"abc"), 400),
    ("cl-overflow", post(b"Content-Length: 99999999999999999999999\r\n", b"abc"), 400),
    # -- transfer codings ------------------------------------------------------------
    ("te-xchunked", post(b"Transfer-Encoding: xchunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"), 501),
    ("te-chunked-identity", post(b"Transfer-Encoding: chunked, identity\r\n", b"3\r\nabc\r\n0\r\n\r\n"), 400),
    ("te-chunked-twice-one-line", post(b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n"), 400),
    ("te-chunked-twice-two-lines",
     post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"), 400),
    ("te-space-before-colon", post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"), 400),
    ("te-leading-space", post(b" Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"), 400),
    ("te-gzip-chunked", post(b"Transfer-Encoding: gzip, chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"), 501),
    ("te-gzip-then-chunked-two-lines",
     post(b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"), 501),
    ("te-identity", post(b"Transfer-Encoding: identity\r\n", b""), 501),
    ("te-in-http-1.0",
     b"POST /echo HTTP/1.0\r\n" + HEAD + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400),
    # -- chunk framing --------------------------------------------------------------
    ("chunk-size-not-hex", post(b"Transfer-Encoding: chunked\r\n", b"zz\r\nabc\r\n0\r\n\r\n"), 400),
    ("chunk-size-overflow", post(b"Transfer-Encoding: chunked\r\n", b"fffffffffffffffffff\r\nabc\r\n0\r\n\r\n"), 400),
    ("chunk-missing-crlf", post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabcX0\r\n\r\n"), 400),
    ("chunk-size-bare-lf", post(b"Transfer-Encoding: chunked\r\n", b"3\nabc\r\n0\r\n\r\n"), 400),
    ("trailer-content-length",
     post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\nContent-Length: 9\r\n\r\n"), 400),
    ("trailer-transfer-encoding",
     post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n"), 400),
    # -- line endings and field syntax ----------------------------------------------------
    ("bare-lf-request-line", b"GET /echo HTTP/1.1\n" + HEAD + b"\r\n", 400),
    ("bare-lf-headers", b"GET /echo HTTP/1.1\r\nHost: api.test\nAuthorization: Bearer k-pro\n\n", 400),
    ("bare-cr-line-ends", b"GET /echo HTTP/1.1\rHost: api.test\rAuthorization: Bearer k-pro\r\r", 400),
    ("obs-fold-space", b"GET /echo HTTP/1.1\r\n" + HEAD + b"X-Note: a\r\n b\r\n\r\n", 400),
    ("obs-fold-tab", b"GET /echo HTTP/1.1\r\n" + HEAD + b"X-Note: a\r\n\tb\r\n\r\n", 400),
    ("nul-in-value", b"GET /echo HTTP/1.1\r\n" + HEAD + b"X-Note: a\x00b\r\n\r\n", 400),
    ("cr-in-value", b"GET /echo HTTP/1.1\r\n" + HEAD + b"X-Note: a\rb\r\n\r\n", 400),
    ("del-in-value", b"GET /echo HTTP/1.1\r\n" + HEAD + b"X-Note: a\x7fb\r\n\r\n", 400),
    ("space-in-name", b"GET /echo HTTP/1.1\r\n" + HEAD + b"X Note: a\r\n\r\n", 400),
    ("empty-name", b"GET /echo HTTP/1.1\r\n" + HEAD + b": a\r\n\r\n", 400),
    ("control-in-target", b"GET /echo\x01x HTTP/1.1\r\n" + HEAD + b"\r\n", 400),
    # -- Host -------------------------------------------------------------------------
    ("duplicate-host", b"GET /echo HTTP/1.1\r\n" + HEAD + b"Host: other.test\r\n\r\n", 400),
    ("missing-host", b"GET /echo HTTP/1.1\r\nAuthorization: Bearer k-pro\r\n\r\n", 400),
    ("host-with-space", b"GET /echo HTTP/1.1\r\nHost: api.test evil\r\nAuthorization: Bearer k-pro\r\n\r\n", 400),
    ("host-with-slash", b"GET /echo HTTP/1.1\r\nHost: api.test/evil\r\nAuthorization: Bearer k-pro\r\n\r\n", 400),
    # -- request line -----------------------------------------------------------------
    ("version-1.2", b"GET /echo HTTP/1.2\r\n" + HEAD + b"\r\n", 400),
    ("version-2.0", b"GET /echo HTTP/2.0\r\n" + HEAD + b"\r\n", 400),
    ("version-0.9-declared", b"GET /echo HTTP/0.9\r\n" + HEAD + b"\r\n", 400),
    ("version-0.9-simple", b"GET /echo\r\n\r\n", 400),
    ("version-glued-to-the-path", b"POST /echoHTTP/1.0\r\n" + HEAD + b"\r\n", 400),
    ("version-lowercase", b"GET /echo http/1.1\r\n" + HEAD + b"\r\n", 400),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    ("absolute-form-ftp", b"GET ftp://api.test/echo HTTP/1.1\r\n" + HEAD + b"\r\n", 400),
    ("absolute-form-no-host", b"GET http:///echo HTTP/1.1\r\n" + HEAD + b"\r\n", 400),
    ("absolute-form-userinfo", b"GET http://user@api.test/echo HTTP/1.1\r\n" + HEAD + b"\r\n", 400),
    ("unknown-method", b"BREW /echo HTTP/1.1\r\n" + HEAD + b"\r\n", 400),
    ("connect", b"CONNECT api.test:443 HTTP/1.1\r\n" + HEAD + b"\r\n", 501),
    ("connect-absolute", b"CONNECT http://api.test/echo HTTP/1.1\r\n" + HEAD + b"\r\n", 501),
]


@pytest.fixture
def proxy(upstream, make_proxy):
    proxy = make_proxy(upstream.port)
    # One exchange first, so an idle upstream connection waits in the pool and a
    # forwarded request head would reach the upstream at once.
    assert request(proxy.port, "GET", "/echo/warm-up")[0] == 200
    assert [entry[1] for entry in upstream.requests] == ["/echo/warm-up"]
    return proxy


def refused(proxy, raw):
    """Send `raw` then FOLLOWER in one send(); (status, headers, body, what followed
    the refusal before the proxy closed)."""
    with connect(proxy.port) as sock:
        sock.sendall(raw + FOLLOWER)
        reader = HttpReader(sock)
        status, headers, body, _ = reader.read_response()
        after = reader.buffer + read_until_closed(sock)
    return status, headers, body, after


def assert_only_warm_up_then(upstream, proxy):
    # A fresh valid request is answered; the upstream log then proves that nothing
    # else (the hostile request, the follower) reached it in between.
    assert request(proxy.port, "GET", "/echo/after")[0] == 200
    assert [entry[1] for entry in upstream.requests] == ["/echo/warm-up", "/echo/after"]


@pytest.mark.parametrize("raw, status", [row[1:] for row in SMUGGLING], ids=[row[0] for row in SMUGGLING])
def test_ambiguous_or_malformed_requests_are_refused_and_never_forwarded(proxy, upstream, raw, status):
    got, headers, body, after = refused(proxy, raw)
    assert got == status
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/problem+json"
    assert json.loads(body)["status"] == status
    assert after == b""          # the follower was never answered; the proxy closed
    assert_only_warm_up_then(upstream, proxy)


def test_a_malformed_request_behind_a_good_one_is_refused_after_the_good_one_is_answered(proxy, upstream):
    # Answers stay in order: the good request gets its own response, the smuggled one
    # behind it the refusal.
    good = b"GET /echo/first HTTP/1.1\r\n" + HEAD + b"\r\n"
    bad = post(b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n")
    with connect(proxy.port) as sock:
        sock.sendall(good + bad + FOLLOWER)
        reader = HttpReader(sock)
        first = reader.read_response()
        second = reader.read_response()
        after = reader.buffer + read_until_closed(sock)
    assert first[0] == 200
    assert json.loads(first[2])["path"] == "/echo/first"
    assert second[0] == 400 and second[1]["connection"] == "close"
    assert after == b""
    assert [entry[1] for entry in upstream.requests] == ["/echo/warm-up", "/echo/first"]


def test_bytes_after_a_request_that_closes_the_connection_do_not_spoil_its_answer(proxy, upstream):
    good = b"GET /echo/last HTTP/1.1\r\n" + HEAD + b"Connection: close\r\n\r\n"
    with connect(proxy.port) as sock:
        sock.sendall(good + b"\x00garbage" + FOLLOWER)
        reader = HttpReader(sock)
        status, headers, body, _ = reader.read_response()
        after = reader.buffer + read_until_closed(sock)
    assert status == 200 and headers["connection"] == "close"
    assert json.loads(body)["path"] == "/echo/last"
    assert after == b""
    assert [entry[1] for entry in upstream.requests] == ["/echo/warm-up", "/echo/last"]


def test_trailer_fields_are_dropped_and_cannot_reframe_the_request(proxy, upstream):
    # A chunked body may end in trailer fields; the proxy does not forward them, and a
    # trailer named like a routing field changes nothing (framing ones are refused above).
    raw = post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\nHost: other.test\r\nX-Trailer: 1\r\n\r\n")
    with connect(proxy.port) as sock:
        sock.sendall(raw + FOLLOWER)
        reader = HttpReader(sock)
        first = reader.read_response()
        second = reader.read_response()
    assert first[0] == 200
    echoed = json.loads(first[2])
    assert echoed["body_len"] == 3
    assert "x-trailer" not in echoed["headers"]
    assert second[0] == 200
    assert json.loads(second[2])["path"] == "/echo/smuggled"


def test_a_chunk_extension_is_accepted_and_not_forwarded_as_data(proxy, upstream):
    raw = post(b"Transfer-Encoding: chunked\r\nConnection: close\r\n", b"3;name=value\r\nabc\r\n0\r\n\r\n")
    with connect(proxy.port) as sock:
        sock.sendall(raw)
        status, _, body, _ = HttpReader(sock).read_response()
    assert status == 200
    assert json.loads(body)["body_len"] == 3
    assert upstream.requests[-1][3] == b"abc"


# -- fuzzing ------------------------------------------------------------------------------

_TOKEN = rb"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_VCHAR = bytes(range(0x21, 0x7F))


def _strict_head(data):
    """Whether `data` begins with a request head (request line and header fields up
    to the empty line) that a strict RFC 9112 reading accepts: known method, origin-
    or http absolute-form target, HTTP/1.0 or 1.1, CRLF everywhere, token names,
    values of visible characters, spaces and tabs (or obs-text), one Host (none only
    in HTTP/1.0), and one unambiguous body length."""
    while data.startswith(b"\r\n"):      # empty lines before a request may be ignored
        data = data[2:]
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    lines = data[:end].split(b"\r\n")
    parts = [part for part in lines[0].split(b" ") if part]
    if len(parts) != 3:
        return False
    method, target, version = parts
    if method not in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE"):
        return False
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        return False
    if not target or any(byte not in _VCHAR for byte in target):
        return False
    if not (target.startswith(b"/") or target.lower().startswith(b"http://")):
        return False
    fields = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or any(byte not in _TOKEN for byte in name):
            return False
        if any(byte < 0x20 and byte != 0x09 or byte == 0x7F for byte in value):
            return False
        fields.append((name.lower(), value.strip(b" \t")))
    hosts = [value for name, value in fields if name == b"host"]
    lengths = [value for name, value in fields if name == b"content-length"]
    codings = [value for name, value in fields if name == b"transfer-encoding"]
    if len(hosts) > 1 or not hosts and version == b"HTTP/1.1":
        return False
    # One way to find the body's end: a single plain Content-Length, or chunked alone (HTTP/1.1).
    if lengths and codings or len(lengths) > 1 or lengths and not lengths[0].isdigit():
        return False
    return not codings or codings == [b"chunked"] and version == b"HTTP/1.1"


_pieces = st.sampled_from([
    b"GET ", b"POST ", b"/echo", b"/echo/fuzz", b" HTTP/1.1", b" HTTP/1.0", b"\r\n", b"\n", b"\r", b" ", b"\t",
    b"Host: api.test", b"Authorization: Bearer k-pro", b"Content-Length: ", b"Transfer-Encoding: ",
    b"chunked", b"identity", b"0", b"3", b"-1", b"ff", b"abc", b"\r\n\r\n", b":", b",", b"\x00", b"\x7f", b"\xff",
    b"Connection: close", b"Connection: upgrade", b"Upgrade: x", b"Expect: 100-continue", b"http://api.test",
])
_VALID_PAIR = post(b"Content-Length: 3\r\n", b"abc") + FOLLOWER


def _overwritten(at_and_patch):
    # The valid pair of requests with a few bytes overwritten at one place.
    at, patch = at_and_patch
    return _VALID_PAIR[:at] + patch + _VALID_PAIR[at + len(patch):]


_hostile_bytes = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.lists(_pieces, min_size=1, max_size=30).map(b"".join),
    st.tuples(st.integers(0, len(_VALID_PAIR) - 1), st.binary(min_size=1, max_size=4)).map(_overwritten),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_hostile_bytes)
def test_random_bytes_never_crash_the_proxy_nor_reach_the_upstream_unless_valid(proxy, upstream, data):
    before = len(upstream.requests)
    with connect(proxy.port) as sock:
        sock.sendall(data)
        # End of input: the proxy answers what it can and closes; nothing waits for a timeout.
        sock.shutdown(socket.SHUT_WR)
        answer = read_until_closed(sock)
    # The proxy never fails on input, however bad.
    assert not answer.startswith(b"HTTP/1.1 500")
    if len(upstream.requests) > before:
        assert _strict_head(data), data
    status, _, _ = request(proxy.port, "GET", "/echo/alive")
    assert status == 200


# -- protocol switches ----------------------------------------------------------------------

def test_an_h2c_upgrade_is_never_switched_so_every_request_stays_decided(raw_upstream, make_proxy):
    # Behind a switch to h2c every later request would bypass the proxy's decisions:
    # only WebSocket upgrades are relayed; any other Upgrade is dropped and the request
    # forwarded as plain HTTP/1.1, even to an upstream that would switch.
    heads = []

    async def switch_to_anything(upstream, index, reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            heads.append(head)
            if b"\nupgrade:" in head.lower():
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
                writer.write(await reader.read(65536))
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")

    raw_upstream.script = switch_to_anything
    proxy = make_proxy(raw_upstream.port)
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\n" + HEAD + b"Connection: Upgrade, HTTP2-Settings\r\n"
                     b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
        reader = HttpReader(sock)
        status, _, body, _ = reader.read_response()
        assert (status, body) == (200, b"plain")
        # HTTP/2 bytes on the connection are not HTTP/1.1: refused, never relayed.
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert reader.read_response()[0] == 400
    assert len(heads) == 1
    assert b"upgrade" not in heads[0].lower()
    assert b"http2-settings" not in heads[0].lower()
