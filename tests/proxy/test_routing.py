# Routing: which route a request takes by host, path prefix (on segment boundaries)
# and method, and the request facts each route hands to decide().
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from config.network import HeaderName
from config.proxy_settings import load_proxy_settings
from proxy.routing import Route, Router

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "examples" / "proxy.yaml"

ROUTER = Router(
    [
        Route("root", "core"),
        Route("chat", "llm", b"/v1/chat"),
        Route("api-chat-post", "llm", b"/v1/chat", host=b"api.example.com", methods=[b"POST"]),
        Route("api-root", "core", host=b"API.Example.com"),
        Route("v1-dir", "core", b"/v1/"),
        Route("models-get", "llm", b"/v1/models", methods=[b"GET", b"HEAD"]),
        Route("ipv6-host", "core", b"/local", host=b"[::1]"),
    ]
)


@pytest.mark.parametrize(
    ("host", "path", "method", "route"),
    [
        # host-specific routes beat host-less ones, whatever their prefix length
        (b"api.example.com", b"/v1/chat", b"POST", "api-chat-post"),
        (b"api.example.com", b"/v1/models", b"GET", "api-root"),
        (b"other.example.com", b"/v1/models", b"GET", "models-get"),
        (None, b"/v1/chat", b"POST", "chat"),
        # host: any case, port ignored, trailing dot, IPv6 literal
        (b"API.EXAMPLE.COM:8443", b"/v1/chat", b"POST", "api-chat-post"),
        (b"api.example.com.", b"/v1/chat", b"POST", "api-chat-post"),
        (b"[::1]:8080", b"/local/x", b"GET", "ipv6-host"),
        (b"[::1]", b"/local", b"GET", "ipv6-host"),
        # longest prefix wins, on a segment boundary
        (None, b"/v1/chat/completions", b"POST", "chat"),
        (None, b"/v1/chat?stream=true", b"POST", "chat"),
        (None, b"/v1/chatty", b"POST", "v1-dir"),
        (None, b"/v1/chat/", b"POST", "chat"),
        (None, b"/v1", b"GET", "root"),
        (None, b"/v1/", b"GET", "v1-dir"),
        (None, b"/v2/chat", b"GET", "root"),
        (None, b"/", b"GET", "root"),
        # methods filter; a route that refuses the method lets shorter prefixes try
        (b"api.example.com", b"/v1/chat", b"GET", "api-root"),
        (None, b"/v1/models", b"HEAD", "models-get"),
        (None, b"/v1/models?page=2", b"GET", "models-get"),
        (None, b"/v1/models", b"DELETE", "v1-dir"),
        (None, b"/v1/models", b"get", "v1-dir"),
    ],
)
def test_route_table(host, path, method, route):
    assert ROUTER.match(host, path, method).name == route


@pytest.mark.parametrize(
    ("host", "path", "method"),
    [
        (None, b"/health", b"GET"),
        (b"api.example.com", b"/healthz", b"GET"),
        (None, b"/v1/chatbot", b"GET"),
        (None, b"*", b"OPTIONS"),
        (None, b"/v1/chat", b"DELETE"),
    ],
)
def test_no_match(host, path, method):
    router = Router(
        [
            Route("chat", "llm", b"/v1/chat", methods=[b"POST"]),
            Route("health", "core", b"/health", host=b"internal"),
        ]
    )
    assert router.match(host, path, method) is None


def test_equal_prefixes_keep_settings_order():
    router = Router([Route("reads", "a", b"/x", methods=[b"GET"]), Route("rest", "b", b"/x")])
    assert router.match(None, b"/x", b"GET").name == "reads"
    assert router.match(None, b"/x", b"POST").name == "rest"


def test_an_empty_router_matches_nothing():
    assert Router([]).match(b"api.example.com", b"/", b"GET") is None


def test_a_prefix_must_start_with_a_slash():
    with pytest.raises(ValueError, match=r"route 'bad': a path prefix starts with '/', got b'v1'"):
        Route("bad", "core", b"v1")


def test_routes_from_the_example_settings():
    router = Router.from_settings(load_proxy_settings(EXAMPLE).routes)
    chat = router.match(b"api.example.com", b"/v1/chat/completions", b"POST")
    assert (chat.name, chat.upstream, chat.host, chat.path_prefix, chat.methods) == (
        "chat", "llm-api", b"api.example.com", b"/v1/chat/completions", frozenset({b"POST"})
    )
    assert (chat.facts.features, chat.facts.metric, chat.facts.units) == (("large_models",), "api_calls", 1)
    # An LLM route's token metrics are its calls' other metrics: their guards act on it.
    assert chat.facts.other_metrics == ("ai_input_tokens", "ai_cached_tokens", "ai_cache_write_tokens",
                                        "ai_output_tokens", "ai_reasoning_tokens")
    assert chat.metered_call is not None
    # The chat route is bound to its host; elsewhere the catch-all takes the path.
    assert router.match(b"localhost:8080", b"/v1/chat/completions", b"POST").name == "core"
    tools = router.match(None, b"/mcp", b"POST")
    assert (tools.name, tools.facts.other_metrics) == ("tools", ("mcp_tool_calls", "agent_sessions"))
    render = router.match(None, b"/v1/render/scene", b"PUT")
    assert (render.name, render.methods, render.facts.features, render.facts.units) == (
        "render", None, ("premium_compute",), 10
    )
    assert router.match(None, b"/anything", b"TRACE") is None


def test_many_distinct_host_values_still_route_correctly():
    # Host is client input: past the cache of seen values, matching still works.
    router = Router([Route("api", "llm", host=b"api.example.com"), Route("rest", "core")])
    for port in range(3000):
        assert router.match(b"api.example.com:%d" % port, b"/", b"GET").name == "api"
        assert router.match(b"other-%d.example.com" % port, b"/", b"GET").name == "rest"
    assert router.match(b"API.EXAMPLE.COM", b"/", b"GET").name == "api"


SEGMENTS = st.sampled_from(["v1", "v1x", "chat", "c", "models"])
PREFIXES = st.lists(SEGMENTS, max_size=3).map(lambda parts: "/" + "/".join(parts)).flatmap(
    lambda prefix: st.sampled_from([prefix, prefix.rstrip("/") + "/"])
)
ROUTES = st.lists(
    st.tuples(
        PREFIXES,
        st.sampled_from([None, b"api.example.com", b"other.example.com"]),
        st.sampled_from([None, frozenset({b"GET"}), frozenset({b"POST", b"GET"})]),
    ),
    max_size=6,
)
REQUESTS = st.tuples(
    st.sampled_from([None, b"api.example.com", b"API.example.com:8443", b"elsewhere"]),
    st.lists(SEGMENTS, max_size=4).map(lambda parts: "/" + "/".join(parts)),
    st.sampled_from(["", "/", "?q=1"]),
    st.sampled_from([b"GET", b"POST"]),
)


def reference_match(routes, host, path, method):
    """The routing rules spelled out: host-specific routes first, then any-host ones;
    the longest prefix on a segment boundary whose methods allow the request; ties in
    settings order."""
    host_name = None if host is None else host.split(b":")[0].lower()
    for group in ([r for r in routes if r.host is not None and r.host == host_name],
                  [r for r in routes if r.host is None]):
        fitting = [
            r for r in group
            if path.startswith(r.path_prefix)
            and (r.path_prefix.endswith(b"/") or path[len(r.path_prefix):][:1] in (b"", b"/", b"?"))
            and (r.methods is None or method in r.methods)
        ]
        if fitting:
            longest = max(len(r.path_prefix) for r in fitting)
            return next(r for r in fitting if len(r.path_prefix) == longest)
    return None


@given(ROUTES, REQUESTS)
def test_router_agrees_with_the_rules_spelled_out(table, request_parts):
    routes = [
        Route(f"r{index}", "up", prefix.encode(), host=host, methods=methods)
        for index, (prefix, host, methods) in enumerate(table)
    ]
    host, path, suffix, method = request_parts
    target = (path + suffix).replace("//", "/").encode()
    assert Router(routes).match(host, target, method) is reference_match(routes, host, target, method)


def test_each_route_reads_the_key_from_its_field_and_the_router_knows_them_all():
    routes = [
        Route("chat", "llm", b"/v1/chat"),
        Route("messages", "llm", b"/v1/messages", api_key_header=b"X-Api-Key"),
        Route("other", "core", b"/other", api_key_header=b"authorization"),
    ]
    router = Router(routes)
    assert router.key_fields == (b"authorization", b"x-api-key")
    assert [(route.key_slot, route.key_bearer) for route in routes] == [(0, True), (1, False), (0, True)]


def test_a_route_without_its_own_key_header_reads_the_settings_one():
    routes = load_proxy_settings(EXAMPLE).routes
    router = Router.from_settings(routes, HeaderName("x-api-key"))
    assert router.key_fields == (b"authorization", b"x-api-key")       # the chat route names authorization
    assert [route.api_key_header for route in router.routes] == [b"authorization"] + [b"x-api-key"] * 3
