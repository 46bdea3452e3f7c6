# Decision outcomes through the running proxy, per the contract table in DESIGN.md.
import json
import time

import pytest
from conftest import request


@pytest.fixture
def proxy(upstream, make_proxy):
    return make_proxy(upstream.port)


def problem(body):
    return json.loads(body)


def test_an_allowed_request_reaches_the_upstream_with_quota_headers(proxy, upstream):
    status, headers, body = request(proxy.port, "GET", "/echo/hello?x=1")
    assert status == 200
    assert json.loads(body)["path"] == "/echo/hello?x=1"
    assert headers["ratelimit-policy"].startswith('"api_calls";q=100000;w=')
    assert headers["ratelimit"].startswith('"api_calls";r=99999;t=')   # after this request
    assert json.loads(body)["headers"]["x-aforo-customer"] == "cus_pro"


@pytest.mark.parametrize(
    "key, method, path, status, title, reason",
    [
        (None, "GET", "/echo", 401, "Unauthorized", "unauthorized"),
        ("k-nobody", "GET", "/echo", 401, "Unauthorized", "unauthorized"),
        ("k-pastdue", "GET", "/echo", 403, "Subscription Not Active", "subscription_inactive"),
        ("k-free", "POST", "/v1/chat", 403, "Feature Not In Plan", "feature_not_entitled"),
        ("k-blocked", "GET", "/echo", 429, "Margin Limit Exceeded", "margin_blocked"),
        ("k-locked", "POST", "/v1/chat", 429, "Margin Limit Exceeded", "feature_locked"),
    ],
)
def test_refusals_follow_the_contract_and_never_reach_the_upstream(proxy, upstream, key, method, path, status,
                                                                     title, reason):
    got_status, headers, body = request(proxy.port, method, path, key=key, body=b"{}" if method == "POST" else None)
    assert got_status == status
    assert headers["content-type"] == "application/problem+json"
    assert problem(body)["title"] == title
    assert problem(body)["reason"] == reason
    assert problem(body)["status"] == status
    if status == 429:
        assert int(headers["retry-after"]) > 86400     # to the end of the billing period
        # The route's metric has a quota: what is left of it, on the refusal too.
        assert headers["ratelimit"].startswith('"api_calls";r=100000;' if path == "/echo" else '"ai_tokens";r=5000000;')
    else:
        assert "ratelimit" not in headers              # never decided on quota
    assert upstream.requests == []


def test_the_api_key_may_come_from_a_custom_header(upstream, make_proxy):
    proxy = make_proxy(upstream.port, api_key_header="x-api-key")
    assert request(proxy.port, "GET", "/echo", key=None, headers={"X-Api-Key": "k-pro"})[0] == 200
    assert request(proxy.port, "GET", "/echo", key="k-pro")[0] == 401


@pytest.mark.parametrize("value, status", [
    ("Bearer k-pro", 200), ("bearer k-pro", 200), ("BEARER \tk-pro \t", 200),
    ("Bearer", 401), ("Bearer ", 401), ("Bearer    ", 401), ("Basic k-pro", 401), ("k-pro", 401),
    ("Bearer k-pro2", 401), ("Bearerk-pro", 401),
])
def test_the_api_key_is_read_from_a_bearer_authorization(proxy, upstream, value, status):
    assert request(proxy.port, "GET", "/echo", key=None, headers={"Authorization": value})[0] == status


def test_a_hard_quota_holds_between_meter_flushes(proxy, upstream):
    # 998 of 1000 used: two more requests fit, the third is refused at the edge.
    first = request(proxy.port, "GET", "/echo", key="k-nearquota")
    second = request(proxy.port, "GET", "/echo", key="k-nearquota")
    third = request(proxy.port, "GET", "/echo", key="k-nearquota")
    assert (first[0], second[0], third[0]) == (200, 200, 429)
    assert first[1]["ratelimit"].startswith('"api_calls";r=1;')     # left after this request
    assert second[1]["ratelimit"].startswith('"api_calls";r=0;')
    assert problem(third[2])["reason"] == "quota_exceeded"
    assert third[1]["ratelimit"].startswith('"api_calls";r=0;')
    assert len(upstream.requests) == 2


def test_a_forwarded_request_is_metered_when_and_as_long_as_it_happened(proxy, upstream):
    before = time.time()
    started = time.monotonic()
    status, _, body = request(proxy.port, "GET", "/echo/timed")
    took_ms = (time.monotonic() - started) * 1000.0
    after = time.time()
    assert status == 200
    proxy.stop()                                   # flushes the meter buffer
    [event] = proxy.meter_events()
    assert (event["customer_id"], event["route"], event["status"]) == ("cus_pro", "everything", 200)
    assert before <= event["timestamp"] <= after
    assert 0.0 < event["latency_ms"] <= took_ms
    assert event["response_bytes"] == len(body)


def test_level_2_marks_responses_then_limits_the_rate(proxy, upstream):
    # 1req/min with a burst of 2.
    responses = [request(proxy.port, "GET", "/echo", key="k-throttled") for _ in range(3)]
    assert [r[0] for r in responses] == [200, 200, 429]
    assert responses[0][1]["x-aforo-throttle"] == "true"
    assert responses[1][1]["x-aforo-throttle"] == "true"
    # The upstream learns it too, with the level and the guard, to switch to a cheaper path.
    forwarded = json.loads(responses[0][2])["headers"]
    assert (forwarded["x-aforo-throttle"], forwarded["x-aforo-guard-level"], forwarded["x-aforo-guard"]) == \
        ("true", "2", "g-throttle")
    assert problem(responses[2][2])["reason"] == "throttled"
    assert 1 <= int(responses[2][1]["retry-after"]) <= 60
    assert [r[1]["ratelimit"].split(";t=")[0] for r in responses] == ['"api_calls";r=99999', '"api_calls";r=99998',
                                                                      '"api_calls";r=99998']


def test_a_shadow_guard_only_tells_the_upstream(proxy, upstream):
    status, headers, body = request(proxy.port, "GET", "/echo", key="k-shadow")
    assert status == 200
    assert "x-aforo-shadow" not in headers and "x-aforo-throttle" not in headers
    forwarded = json.loads(body)["headers"]
    assert forwarded["x-aforo-shadow"] == "margin_blocked; guard=g-shadow"
    assert "x-aforo-throttle" not in forwarded


def test_a_shadow_guard_can_tell_the_client_too(upstream, make_proxy):
    proxy = make_proxy(upstream.port, extra_settings="shadow_report: client_and_upstream\n")
    status, headers, body = request(proxy.port, "GET", "/echo", key="k-shadow")
    assert status == 200
    assert headers["x-aforo-shadow"] == "margin_blocked; guard=g-shadow"
    assert json.loads(body)["headers"]["x-aforo-shadow"] == "margin_blocked; guard=g-shadow"


def test_a_client_cannot_claim_a_decision(proxy, upstream):
    status, _, body = request(proxy.port, "GET", "/echo", key="k-pro",
                              headers={"X-Aforo-Throttle": "true", "X-Aforo-Guard-Level": "3", "X-Aforo-Shadow": "x"})
    assert status == 200
    forwarded = json.loads(body)["headers"]
    assert not {"x-aforo-throttle", "x-aforo-guard-level", "x-aforo-shadow"} & set(forwarded)


def test_an_upstream_cannot_forge_the_proxys_headers(proxy, upstream):
    status, headers, _ = request(proxy.port, "GET", "/echo", key="k-pro")
    assert status == 200
    assert "x-aforo-throttle" not in headers


def test_a_request_no_route_takes_is_404(upstream, make_proxy):
    proxy = make_proxy(upstream.port, routes="  - {name: only, upstream: main, path_prefix: /echo}\n")
    status, headers, body = request(proxy.port, "GET", "/elsewhere")
    assert status == 404
    assert problem(body)["reason"] == "unrouted"
