# Routing on the normalized path, through the running proxy over real sockets: every
# spelling of `/premium` (dot segments, encoded unreserved characters, repeated
# slashes, path parameters) is decided under the premium route and forwarded as the
# normal path; what cannot be normalized safely is refused with 400. A customer
# without the premium feature never reaches the premium upstream.
import json

import pytest
from conftest import HttpReader, RawUpstream, connect, request

ROUTES = """\
  - {name: premium, upstream: premium, path_prefix: /premium, features: [large_models]}
  - {name: v1-premium, upstream: premium, path_prefix: /v1/premium, features: [large_models]}
  - {name: everything, upstream: main, path_prefix: /}
"""

# target as sent -> the normal target the premium upstream gets (for a customer with
# the feature; one without it gets 403).
PREMIUM_SPELLINGS = [
    ("/premium", "/premium"),
    ("/free/../premium", "/premium"),
    ("/free/%2e%2e/premium", "/premium"),
    ("/free/%2E%2e/premium", "/premium"),
    ("/free/.%2E/premium", "/premium"),
    ("/free/./../premium", "/premium"),
    ("/free/..;/premium", "/premium"),
    ("//premium", "/premium"),
    ("/premium/", "/premium/"),
    ("/premium//report", "/premium/report"),
    ("/./premium", "/premium"),
    ("/%70%72%65%6D%69%75%6d", "/premium"),
    ("/v1/%70remium", "/v1/premium"),
    ("/v1/premium;x", "/v1/premium"),
    ("/v1/premium;x=1/report", "/v1/premium/report"),
    ("/v1//premium", "/v1/premium"),
    ("/free/../premium?next=/../free&q=%2F", "/premium?next=/../free&q=%2F"),
    ("http://api.test/free/../premium", "/premium"),
]
# Targets no normalization makes safe: 400 whoever sends them.
UNSAFE = [
    ("/free/..%2fpremium", "an encoded `/` (%2F) in the path"),
    ("/free/..%2Fpremium", "an encoded `/` (%2F) in the path"),
    ("/free/..%5cpremium", "an encoded `\\` (%5C) in the path"),
    ("/free\\..\\premium", "a `\\` in the path"),
    ("/%2e%2e/premium", "a `..` segment above the root of the path"),
    ("/../premium", "a `..` segment above the root of the path"),
    ("/premium%00", "an encoded NUL (%00) in the path"),
    ("/premium#x", "a `#` in the request target (a fragment is never sent to a server)"),
    ("/free/%252e%252e/premium", "a doubly encoded `.`, `/`, `\\` or NUL (%25...) in the path"),
    ("/free/%zz/premium", "a `%` in the path that is not followed by two hex digits"),
]


async def answer_with_the_target(upstream, index, reader, writer):
    # Every request the premium upstream reads is logged (RawUpstream.requests).
    while (seen := await upstream.read_request(reader, index)) is not None:
        body = seen[1].encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()


@pytest.fixture
def premium(loop_thread):
    server = RawUpstream(loop_thread)
    server.script = answer_with_the_target
    loop_thread.run(server.start())
    yield server
    loop_thread.run(server.stop())


@pytest.fixture
def proxy(upstream, premium, make_proxy):
    return make_proxy(upstream.port, routes=ROUTES,
                      extra_upstreams=f'  premium: {{url: "http://127.0.0.1:{premium.port}"}}\n')


def test_no_spelling_of_the_premium_path_takes_a_customer_without_the_feature_to_the_premium_upstream(
        proxy, upstream, premium):
    for target, _ in PREMIUM_SPELLINGS:
        status, _, body = request(proxy.port, "GET", target, key="k-free")
        assert status == 403, target
        assert json.loads(body)["reason"] == "feature_not_entitled", target
    for target, _ in UNSAFE:
        assert request(proxy.port, "GET", target, key="k-free")[0] == 400, target
    assert premium.requests == []
    assert upstream.requests == []       # nor was any of them forwarded under the default route


def test_every_spelling_of_the_premium_path_is_forwarded_to_the_premium_upstream_as_its_normal_path(
        proxy, upstream, premium):
    for target, normal in PREMIUM_SPELLINGS:
        status, _, body = request(proxy.port, "GET", target, key="k-pro")
        assert (status, body.decode()) == (200, normal), target
    assert [seen[2] for seen in premium.requests] == [normal for _, normal in PREMIUM_SPELLINGS]
    assert upstream.requests == []


@pytest.mark.parametrize("target, why", UNSAFE)
def test_a_path_that_cannot_be_normalized_safely_is_refused_with_400_saying_why(proxy, premium, target, why):
    status, headers, body = request(proxy.port, "GET", target, key="k-pro")
    assert status == 400
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert json.loads(body)["detail"] == f"the request path cannot be routed safely: {why}"
    assert premium.requests == []


def test_other_routes_get_the_normal_path_too_and_the_query_as_sent(proxy):
    status, _, body = request(proxy.port, "GET", "/inspect/./a/../b;p=1//c/%7e?x=/../%2F&y=%2e", key="k-pro")
    assert status == 200
    assert json.loads(body)["raw_path"] == "/inspect/b/c/~?x=/../%2F&y=%2e"


def test_a_normal_path_on_a_kept_alive_connection_is_forwarded_unchanged(proxy, upstream):
    with connect(proxy.port) as sock:
        for target in ("/inspect/a", "/inspect/a%20b/c?q=%2e%2e", "/inspect/.well-known/x"):
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer k-pro\r\n\r\n".encode())
            status, _, body, _ = HttpReader(sock).read_response()
            assert status == 200 and json.loads(body)["raw_path"] == target
