# One identity per request, and the provider's credentials instead of the customer's,
# through the running proxy over real sockets: the customer's key (from whichever
# header its route reads) never reaches an upstream, an upstream's own headers are set
# from the environment in place of the client's, a repeated key header is refused,
# and request headers whose name has `_` are dropped.
import json
import logging
import urllib.request

import pytest
from conftest import HttpReader, connect, request

PROVIDER_KEY = "sk-provider-secret-7d1e"
ROUTES = """\
  - {name: provider, upstream: provider, path_prefix: /inspect/provider}
  - {name: messages, upstream: main, path_prefix: /inspect/messages, api_key_header: x-api-key}
  - {name: everything, upstream: main, path_prefix: /}
"""


@pytest.fixture
def proxy(upstream, make_proxy, monkeypatch):
    monkeypatch.setenv("AFORO_TEST_PROVIDER_KEY", PROVIDER_KEY)
    provider = (f'  provider: {{url: "http://127.0.0.1:{upstream.port}", headers: '
                '{authorization: "Bearer ${AFORO_TEST_PROVIDER_KEY}", X-Provider-Version: "2024-01"}}\n')
    return make_proxy(upstream.port, routes=ROUTES, extra_upstreams=provider)


def inspected(port, path, lines):
    """(status, what /inspect saw or the refusal) for one request with raw header `lines`."""
    with connect(port) as sock:
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n"
                      + "".join(line + "\r\n" for line in lines) + "\r\n").encode())
        status, _, body, _ = HttpReader(sock).read_response()
    return status, json.loads(body)


def fields(seen, name):
    return [value for field, value in seen["raw_headers"] if field == name]


def test_the_customers_key_never_reaches_the_upstream_whichever_header_carries_it(proxy):
    for path, lines in [
        ("/inspect", ["Authorization: Bearer k-pro"]),
        ("/inspect/messages", ["X-Api-Key: k-pro"]),
        ("/inspect", ["Authorization: Bearer k-pro", "X-Api-Key: k-other"]),
        ("/inspect/messages", ["x-api-key: k-pro", "authorization: Bearer k-other"]),
    ]:
        status, seen = inspected(proxy.port, path, lines)
        assert status == 200, (path, lines)
        assert fields(seen, "authorization") == [] and fields(seen, "x-api-key") == []
        assert fields(seen, "x-aforo-customer") == ["cus_pro"]


def test_each_route_reads_the_key_from_its_own_header(proxy):
    assert inspected(proxy.port, "/inspect/messages", ["Authorization: Bearer k-pro"])[0] == 401
    assert inspected(proxy.port, "/inspect", ["X-Api-Key: k-pro"])[0] == 401
    assert inspected(proxy.port, "/inspect/messages", ["X-Api-Key: Bearer k-pro"])[0] == 401   # the whole value


def test_an_upstreams_headers_from_the_environment_replace_the_clients(proxy):
    status, seen = inspected(proxy.port, "/inspect/provider",
                             ["Authorization: Bearer k-pro", "X-Provider-Version: forged", "x-provider-version: 2"])
    assert status == 200
    assert fields(seen, "authorization") == [f"Bearer {PROVIDER_KEY}"]
    assert fields(seen, "x-provider-version") == ["2024-01"]
    assert fields(seen, "x-aforo-customer") == ["cus_pro"]
    # Another upstream sets neither: the client's own field goes through, its key does not.
    status, seen = inspected(proxy.port, "/inspect", ["Authorization: Bearer k-pro", "X-Provider-Version: mine"])
    assert (status, fields(seen, "x-provider-version"), fields(seen, "authorization")) == (200, ["mine"], [])


def test_the_provider_key_is_never_logged_counted_or_shown_in_the_settings(proxy, caplog):
    caplog.set_level(logging.DEBUG)
    assert inspected(proxy.port, "/inspect/provider", ["Authorization: Bearer k-pro"])[0] == 200
    assert inspected(proxy.port, "/inspect/provider", ["Authorization: Bearer k-nobody"])[0] == 401
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin_port}/metrics", timeout=10) as answer:
        metrics = answer.read().decode()
    assert 'route="provider"' in metrics
    assert PROVIDER_KEY not in metrics
    assert PROVIDER_KEY not in caplog.text
    assert PROVIDER_KEY not in repr(proxy.worker.settings)


@pytest.mark.parametrize("lines, name", [
    (["Authorization: Bearer k-pro", "Authorization: Bearer k-free"], "authorization"),
    (["Authorization: Bearer k-free", "AUTHORIZATION: Bearer k-pro"], "authorization"),
    (["Authorization: Bearer k-pro", "X-Api-Key: k-pro", "x-api-key: k-free"], "x-api-key"),
])
def test_two_of_a_key_header_get_400_and_nothing_is_forwarded(proxy, upstream, lines, name):
    for path in ("/inspect", "/inspect/messages"):
        with connect(proxy.port) as sock:
            sock.sendall((f"GET {path} HTTP/1.1\r\nHost: api.test\r\n"
                          + "".join(line + "\r\n" for line in lines) + "\r\n").encode())
            status, headers, body, _ = HttpReader(sock).read_response()
        assert (status, headers["connection"]) == (400, "close")
        assert json.loads(body)["detail"] == f"more than one {name} header: a request carries one API key"
    assert upstream.requests == []


def test_request_headers_with_underscores_are_dropped(proxy):
    status, seen = inspected(proxy.port, "/inspect", [
        "Authorization: Bearer k-pro", "X_Aforo_Customer: cus_blocked", "X_Forwarded_For: 6.6.6.6",
        "x_forwarded_proto: https", "X_Custom: 1", "X-Custom: 2",
    ])
    assert status == 200
    assert [name for name, _ in seen["raw_headers"] if "_" in name] == []
    assert fields(seen, "x-aforo-customer") == ["cus_pro"]
    assert fields(seen, "x-forwarded-for") == ["127.0.0.1"]
    assert fields(seen, "x-forwarded-proto") == ["http"]
    assert fields(seen, "x-custom") == ["2"]


def test_response_headers_with_underscores_still_reach_the_client(raw_upstream, make_proxy):
    async def answer(upstream, index, reader, writer):
        while await upstream.read_request(reader, index) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nX_Upstream_Id: 7\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    raw_upstream.script = answer
    proxy = make_proxy(raw_upstream.port)
    status, headers, body = request(proxy.port, "GET", "/anything")
    assert (status, headers["x_upstream_id"], body) == (200, "7", b"ok")
