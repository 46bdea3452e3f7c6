# Proxy settings: what a settings file means (defaults, normalised names, paths read
# from the file's directory) and the exact message, line and path of each mistake.
import ipaddress
from pathlib import Path

import msgspec
import pytest

from config import ConfigError
from config.network import HostPort
from config.proxy_settings import AiMetering, McpMetering, load_proxy_settings, parse_proxy_settings, upstream_headers

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "examples"

# Lines: 1 upstreams, 2 chat-api, 3 search, 4 search.url, 5 routes, 6 route 0,
# 7 edge_state; `extra` starts at line 8.
MINIMAL = """\
upstreams:
  chat-api: {url: "http://127.0.0.1:8000"}
  search:
    url: http://127.0.0.1:9000
routes:
  - {name: chat, upstream: chat-api%s}
edge_state: {file: edge_state.yaml}
"""


def settings_text(route_extra: str = "", extra: str = "") -> str:
    return MINIMAL % route_extra + extra


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_proxy_settings(text, "proxy.yaml")
    return str(caught.value)


def test_the_production_example_takes_state_from_the_bus_and_meters_to_it():
    settings = load_proxy_settings(EXAMPLES / "production-proxy.yaml")
    assert settings.control_plane is None
    assert (settings.edge_state.file, settings.edge_state.redis_url) == (None, "redis://redis.internal:6379/0")
    assert settings.metering.redis_url == settings.edge_state.redis_url
    assert settings.metering.spool_dir == "/var/lib/aforo/meter-spool"     # writable in the image, kept as written
    assert (settings.listen, settings.admin) == (HostPort("0.0.0.0", 8080), HostPort("0.0.0.0", 9090))


def test_the_example_is_valid_and_points_at_the_example_edge_state():
    path = EXAMPLES / "proxy.yaml"
    settings = load_proxy_settings(path)
    assert Path(settings.edge_state.file) == EXAMPLES / "edge_state.yaml"
    assert Path(settings.metering.path) == EXAMPLES / "meter-events.ndjson"
    assert Path(settings.metering.spool_dir) == EXAMPLES / "meter-spool"
    assert [route.name for route in settings.routes] == ["chat", "tools", "render", "core"]
    assert (settings.routes[0].ai.format, settings.routes[1].mcp.tool_features) == (
        "openai_chat", {"web_search": ("premium_compute",)})
    assert settings.upstreams["llm-api"].url.port == 8001


def test_the_example_writes_out_every_default():
    # The example documents each field with its default value; a drifted default
    # would make the example lie.
    example = load_proxy_settings(EXAMPLES / "proxy.yaml")
    defaults = parse_proxy_settings(settings_text(), "proxy.yaml", EXAMPLES)
    assert (example.listen, example.workers, example.admin) == (defaults.listen, defaults.workers, defaults.admin)
    assert example.api_key_header == defaults.api_key_header
    assert example.limits == defaults.limits
    assert example.metering == defaults.metering
    assert example.edge_state.reload_interval_s == defaults.edge_state.reload_interval_s
    assert (example.redis, example.degraded) == (defaults.redis, defaults.degraded)
    assert example.routes[-1].when_stale == defaults.routes[0].when_stale
    assert example.routes[0].ai == msgspec.convert({"format": "openai_chat"}, AiMetering)
    assert msgspec.structs.replace(example.routes[1].mcp, tool_features={}) == McpMetering()
    example_upstream = example.upstreams["core-api"]
    default_upstream = defaults.upstreams["search"]
    assert (example_upstream.pool_size, example_upstream.connect_timeout_s, example_upstream.read_timeout_s) == (
        default_upstream.pool_size, default_upstream.connect_timeout_s, default_upstream.read_timeout_s
    )


def test_defaults():
    settings = parse_proxy_settings(settings_text(), "proxy.yaml")
    assert settings.listen == HostPort("127.0.0.1", 8080)
    assert settings.admin == HostPort("127.0.0.1", 9090)
    assert settings.workers == 1
    assert settings.api_key_header == "authorization" and settings.api_key_is_bearer
    assert settings.trusted_proxies == ()
    limits = settings.limits
    assert (limits.max_request_line_bytes, limits.max_header_bytes, limits.max_headers) == (8192, 32768, 100)
    assert (limits.max_body_bytes, limits.max_connections) == (10 * 1024 * 1024, 10000)
    assert (limits.header_timeout_s, limits.keepalive_timeout_s, limits.shutdown_grace_s) == (10.0, 75.0, 30.0)
    assert (limits.body_timeout_s, limits.min_body_bytes_per_s, limits.buffered_body_bytes) == (10.0, 1024, 65536)
    upstream = settings.upstreams["search"]
    assert (upstream.pool_size, upstream.connect_timeout_s, upstream.read_timeout_s) == (64, 2.0, 60.0)
    (route,) = settings.routes
    assert (route.host, route.path_prefix, route.methods) == (None, "/", None)
    assert (route.features, route.metric, route.units) == ((), "api_calls", 1)
    assert settings.edge_state.reload_interval_s == 1.0
    metering = settings.metering
    assert (metering.path, metering.spool_dir) == ("meter-events.ndjson", "meter-spool")
    assert (metering.buffer_events, metering.batch_events, metering.flush_interval_s) == (100_000, 1000, 1.0)
    assert (settings.redis.timeout_s, settings.redis.breaker_failures, settings.redis.breaker_open_s) == (0.5, 3, 2.0)
    assert (settings.degraded.staleness_budget_s, settings.degraded.retry_after_s) == (30.0, 5)
    assert (route.when_stale, route.when_quota_unknown) == ("open", "open")


@pytest.mark.parametrize(
    ("extra", "read", "expected"),
    [
        ("listen: 0.0.0.0:80\n", lambda s: (s.listen.host, s.listen.port), ("0.0.0.0", 80)),
        ("listen: '[::1]:8080'\n", lambda s: (s.listen.host, s.listen.port, str(s.listen)),
         ("::1", 8080, "[::1]:8080")),
        ("admin: Localhost:65535\n", lambda s: (s.admin.host, s.admin.port), ("localhost", 65535)),
        ("api_key_header: X-Api-Key\n", lambda s: (s.api_key_header, s.api_key_is_bearer), ("x-api-key", False)),
        ("api_key_header: Authorization\n", lambda s: (s.api_key_header, s.api_key_is_bearer),
         ("authorization", True)),
        ("trusted_proxies: [10.0.0.0/8, 192.168.1.7, '::1']\n", lambda s: s.trusted_proxies,
         ("10.0.0.0/8", "192.168.1.7/32", "::1/128")),
        ("limits: {header_timeout_s: 2, max_body_bytes: 0}\n",
         lambda s: (s.limits.header_timeout_s, s.limits.max_body_bytes, s.limits.max_headers), (2.0, 0, 100)),
        ("workers: 8\n", lambda s: s.workers, 8),
    ],
    ids=["any-address", "ipv6", "name-lower-cased", "own-header", "bearer", "cidrs", "partial-limits", "workers"],
)
def test_top_level_values_read_as_written(extra, read, expected):
    assert read(parse_proxy_settings(settings_text(extra=extra), "proxy.yaml")) == expected


def test_trusted_networks_contain_their_peers():
    settings = parse_proxy_settings(settings_text(extra="trusted_proxies: [10.0.0.0/8]\n"), "proxy.yaml")
    (network,) = settings.trusted_proxies
    assert ipaddress.ip_address("10.20.30.40") in network.network
    assert ipaddress.ip_address("11.0.0.1") not in network.network


@pytest.mark.parametrize(
    ("written", "host", "port", "authority", "normalised"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1", 8000, "127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://Backend.Internal", "backend.internal", 80, "backend.internal", "http://backend.internal:80"),
        ("HTTP://backend:8080/", "backend", 8080, "backend:8080", "http://backend:8080"),
        ("http://[::1]:9000", "::1", 9000, "[::1]:9000", "http://[::1]:9000"),
        ("https://API.OpenAI.com", "api.openai.com", 443, "api.openai.com", "https://api.openai.com:443"),
        ("https://10.0.0.5:8443", "10.0.0.5", 8443, "10.0.0.5:8443", "https://10.0.0.5:8443"),
    ],
)
def test_upstream_urls(written, host, port, authority, normalised):
    text = settings_text().replace("http://127.0.0.1:9000", written)
    url = parse_proxy_settings(text, "proxy.yaml").upstreams["search"].url
    assert (url.host, url.port, url.authority, url) == (host, port, authority, normalised)


def test_route_values_are_normalised():
    route_extra = ", host: API.Example.com, path_prefix: /v1/chat, methods: [post, Get], features: [large_models], metric: ai_tokens, units: 0"
    (route,) = parse_proxy_settings(settings_text(route_extra), "proxy.yaml").routes
    assert route.host == "api.example.com"
    assert route.methods == ("POST", "GET")
    assert (route.path_prefix, route.features, route.metric, route.units) == ("/v1/chat", ("large_models",), "ai_tokens", 0)


def test_relative_paths_are_read_from_the_settings_file_directory(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "proxy.yaml"
    absolute_spool = tmp_path / "spool"
    path.write_text(settings_text(extra=f"metering: {{path: meters/events.ndjson, spool_dir: '{absolute_spool}'}}\n"))
    settings = load_proxy_settings(path)
    assert Path(settings.edge_state.file) == tmp_path / "conf" / "edge_state.yaml"
    assert Path(settings.metering.path) == tmp_path / "conf" / "meters" / "events.ndjson"
    assert Path(settings.metering.spool_dir) == absolute_spool


def test_parsing_text_without_a_directory_keeps_paths_as_written():
    settings = parse_proxy_settings(settings_text(), "proxy.yaml")
    assert settings.edge_state.file == "edge_state.yaml"


ROUTE_AT = "- at `$.routes[0]"
BAD_SETTINGS = [
    # (route extra, top-level extra, message)
    ("", "listen: 8080\n",
     "proxy.yaml:8: Expected `host:port` like `127.0.0.1:8080`, `[::1]:8080` or `proxy.internal:8080`, got `8080` - at `$.listen`"),
    ("", "listen: 127.0.0.1:65536\n",
     "proxy.yaml:8: Expected a port between 0 and 65535, got `65536` in `127.0.0.1:65536` - at `$.listen`"),
    ("", "admin: 127.0.0.1:99999\n",
     "proxy.yaml:8: Expected a port between 0 and 65535, got `99999` in `127.0.0.1:99999` - at `$.admin`"),
    ("", "listen: ::1:8080\n",
     "proxy.yaml:8: Expected `host:port` like `127.0.0.1:8080`, `[::1]:8080` or `proxy.internal:8080`, got `::1:8080` - at `$.listen`"),
    ("", "workers: 0\n", "proxy.yaml:8: Expected `int` >= 1 - at `$.workers`"),
    ("", "api_key_header: 'x api key'\n",
     "proxy.yaml:8: Expected a header name like `x-api-key`, got `x api key` - at `$.api_key_header`"),
    ("", "trusted_proxies: [10.0.0.1/8]\n",
     "proxy.yaml:8: Expected a CIDR like `10.0.0.0/8` or `::1/128`, got `10.0.0.1/8` (10.0.0.1/8 has host bits set)"
     " - at `$.trusted_proxies[0]`"),
    ("", "trusted_proxies: 10.0.0.0/8\n", "proxy.yaml:8: Expected `array`, got `str` - at `$.trusted_proxies`"),
    ("", "limits: {header_timeout_s: 0}\n", "proxy.yaml:8: Expected `float` > 0.0 - at `$.limits.header_timeout_s`"),
    ("", "limits: {body_timeout_s: 0}\n", "proxy.yaml:8: Expected `float` > 0.0 - at `$.limits.body_timeout_s`"),
    ("", "limits: {min_body_bytes_per_s: 0}\n",
     "proxy.yaml:8: Expected `int` >= 1 - at `$.limits.min_body_bytes_per_s`"),
    ("", "limits: {buffered_body_bytes: -1}\n",
     "proxy.yaml:8: Expected `int` >= 0 - at `$.limits.buffered_body_bytes`"),
    ("", "limits: {max_body_byte: 1}\n", "proxy.yaml:8: Object contains unknown field `max_body_byte` - at `$.limits`"),
    ("", "limits:\n  max_headers: -1\n", "proxy.yaml:9: Expected `int` >= 1 - at `$.limits.max_headers`"),
    ("", "metering: {buffer_events: 10, batch_events: 100}\n",
     "proxy.yaml:8: `batch_events` (100) must not exceed `buffer_events` (10) - at `$.metering`"),
    ("", "edge_stat: {file: x}\n", "proxy.yaml:8: Object contains unknown field `edge_stat`"),
    (", upstream: search", "", "proxy.yaml:6: Duplicate key `upstream` (first at line 6) - at `$.routes[0].upstream`"),
    (", path_prefix: v1", "",
     f"proxy.yaml:6: Expected a path starting with `/` (no `?`, `#` or spaces), got `v1` {ROUTE_AT}.path_prefix`"),
    (", path_prefix: '/v1?x=1'", "",
     f"proxy.yaml:6: Expected a path starting with `/` (no `?`, `#` or spaces), got `/v1?x=1` {ROUTE_AT}.path_prefix`"),
    (", host: 'api.example.com:443'", "",
     "proxy.yaml:6: Expected a host name without a port (the port is ignored when matching), "
     f"got `api.example.com:443` {ROUTE_AT}.host`"),
    (", host: 'https://api.example.com'", "",
     "proxy.yaml:6: Expected a host name without a port (the port is ignored when matching), "
     f"got `https://api.example.com` {ROUTE_AT}.host`"),
    (", methods: [GET, 'B@D']", "",
     f"proxy.yaml:6: Expected an HTTP method like `GET` or `POST`, got `B@D` {ROUTE_AT}.methods[1]`"),
    (", methods: GET", "", f"proxy.yaml:6: Expected `array | null`, got `str` {ROUTE_AT}.methods`"),
    (", metric: '*'", "",
     f"proxy.yaml:6: Expected a metric name (letters, digits, `_`, `.`, `:`, `-`), got `*` {ROUTE_AT}.metric`"),
    (", units: -1", "", f"proxy.yaml:6: Expected `int` >= 0 {ROUTE_AT}.units`"),
    (", feature: [x]", "", f"proxy.yaml:6: Object contains unknown field `feature` {ROUTE_AT}`"),
    (", ai: {format: gemini}", "",
     "proxy.yaml:6: Expected an LLM wire format: `openai_chat`, `openai_responses` or `anthropic_messages`, "
     f"got `gemini` {ROUTE_AT}.ai.format`"),
    (", ai: {}", "", f"proxy.yaml:6: Object missing required field `format` {ROUTE_AT}.ai`"),
    (", ai: {format: openai_chat}, mcp: {}", "",
     f"proxy.yaml:6: A route meters an LLM API (`ai`) or an MCP server (`mcp`), not both {ROUTE_AT}`"),
    (", when_stale: sometimes", "",
     f"proxy.yaml:6: Expected `open` or `closed`, got `sometimes` {ROUTE_AT}.when_stale`"),
    (", when_quota_unknown: refuse", "",
     f"proxy.yaml:6: Expected `open` or `closed`, got `refuse` {ROUTE_AT}.when_quota_unknown`"),
    ("", "degraded: {staleness_budget_s: 0}\n",
     "proxy.yaml:8: Expected `float` > 0.0 - at `$.degraded.staleness_budget_s`"),
    ("", "redis: {breaker_failures: 0}\n", "proxy.yaml:8: Expected `int` >= 1 - at `$.redis.breaker_failures`"),
]


@pytest.mark.parametrize(("route_extra", "extra", "message"), BAD_SETTINGS)
def test_bad_settings(route_extra, extra, message):
    assert error_of(settings_text(route_extra, extra)) == message


@pytest.mark.parametrize(
    ("replace", "by", "message"),
    [
        ("http://127.0.0.1:9000", "ftp://127.0.0.1:9000",
         "proxy.yaml:4: Only `http://` and `https://` upstream URLs are supported, got `ftp://127.0.0.1:9000` - at `$.upstreams.search.url`"),
        ("http://127.0.0.1:9000", "http://127.0.0.1:9000/api",
         "proxy.yaml:4: An upstream URL is `http://host:port` without path, query or user info, "
         "got `http://127.0.0.1:9000/api` - at `$.upstreams.search.url`"),
        ("http://127.0.0.1:9000", "127.0.0.1:9000",
         "proxy.yaml:4: Expected an upstream URL like `http://127.0.0.1:8000`, got `127.0.0.1:9000` - at `$.upstreams.search.url`"),
        ("http://127.0.0.1:9000", "http://127.0.0.1:0",
         "proxy.yaml:4: Expected a port between 1 and 65535, got `0` in `http://127.0.0.1:0` - at `$.upstreams.search.url`"),
        ('{url: "http://127.0.0.1:8000"}', '{url: "http://127.0.0.1:8000", pool_size: 0}',
         "proxy.yaml:2: Expected `int` >= 1 - at `$.upstreams['chat-api'].pool_size`"),
        ("    url: http://127.0.0.1:9000", "    url: http://127.0.0.1:9000\n    read_timeout_s: -5",
         "proxy.yaml:5: Expected `float` > 0.0 - at `$.upstreams.search.read_timeout_s`"),
        ("upstream: chat-api", "upstream: chat",
         "proxy.yaml:6: Unknown upstream `chat`; the upstreams are `chat-api`, `search` - at `$.routes[0].upstream`"),
        ("edge_state: {file: edge_state.yaml}\n", "",
         "proxy.yaml:1: Set exactly one of `edge_state` (a file) and `control_plane` (a URL): where the "
         "customers' edge state comes from - at `$`"),
        ("edge_state: {file: edge_state.yaml}\n", "edge_state: {file: edge_state.yaml}\n"
                                                  "control_plane: {url: 'http://127.0.0.1:8070'}\n",
         "proxy.yaml:1: Set exactly one of `edge_state` (a file) and `control_plane` (a URL): where the "
         "customers' edge state comes from - at `$`"),
        ("edge_state: {file: edge_state.yaml}", "edge_state: {file: ''}",
         "proxy.yaml:7: Expected `str` of length >= 1 - at `$.edge_state.file`"),
        ("edge_state: {file: edge_state.yaml}", "edge_state: {file: e.yaml, redis_url: 'redis://127.0.0.1:6379/0'}",
         "proxy.yaml:7: Give exactly one of `file` and `redis_url` - at `$.edge_state`"),
        ("edge_state: {file: edge_state.yaml}", "edge_state: {redis_url: 'http://127.0.0.1:6379/0'}",
         "proxy.yaml:7: Expected a Redis URL such as `redis://127.0.0.1:6379/0`, got `http://127.0.0.1:6379/0` "
         "- at `$.edge_state.redis_url`"),
    ],
)
def test_bad_upstreams_and_references(replace, by, message):
    text = settings_text()
    assert replace in text
    assert error_of(text.replace(replace, by, 1)) == message


def test_route_table_problems_are_reported_together():
    text = settings_text(
        extra="",
    ).replace(
        "routes:\n  - {name: chat, upstream: chat-api}\n",
        "routes:\n"
        "  - {name: chat, upstream: chat-api, path_prefix: /v1}\n"   # line 6
        "  - {name: chat, upstream: search}\n"                        # line 7
        "  - {name: all-v1, upstream: nowhere, path_prefix: /v1}\n"   # line 8
        "  - {name: get-v1, upstream: search, path_prefix: /v1, methods: [GET]}\n",  # line 9
    )
    assert error_of(text).splitlines() == [
        "proxy.yaml:7: Duplicate route name `chat`; first used by `$.routes[0]` - at `$.routes[1].name`",
        "proxy.yaml:8: Unknown upstream `nowhere`; the upstreams are `chat-api`, `search` - at `$.routes[2].upstream`",
        "proxy.yaml:8: Route `all-v1` can never match: route `chat` (`$.routes[0]`) has the same host and path "
        "prefix and takes all of its methods - at `$.routes[2]`",
        "proxy.yaml:9: Route `get-v1` can never match: route `chat` (`$.routes[0]`) has the same host and path "
        "prefix and takes all of its methods - at `$.routes[3]`",
    ]


def test_routes_that_split_methods_or_hosts_are_not_dead():
    text = settings_text().replace(
        "routes:\n  - {name: chat, upstream: chat-api}\n",
        "routes:\n"
        "  - {name: reads, upstream: search, path_prefix: /v1, methods: [GET]}\n"
        "  - {name: writes, upstream: chat-api, path_prefix: /v1, methods: [POST, GET]}\n"
        "  - {name: api-host, upstream: chat-api, path_prefix: /v1, host: api.example.com}\n",
    )
    assert [route.name for route in parse_proxy_settings(text, "proxy.yaml").routes] == ["reads", "writes", "api-host"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "proxy.yaml: File is empty; expected a mapping of proxy settings with `upstreams`, `routes` and "
             "`edge_state` or `control_plane`"),
        ("- listen\n", "proxy.yaml:1: Expected a mapping of proxy settings with `upstreams`, `routes` and "
                       "`edge_state` or `control_plane` at the top level, got a list"),
        ("upstreams: {}\nroutes: []\nedge_state: {file: x}\n",
         "proxy.yaml:1: At least one upstream is required - at `$.upstreams`\n"
         "proxy.yaml:2: At least one route is required - at `$.routes`"),
    ],
)
def test_empty_and_wrong_top_levels(text, message):
    assert error_of(text) == message


def test_unreadable_settings_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_proxy_settings(tmp_path / "missing.yaml")


def test_a_redis_url_puts_the_proxy_on_the_bus(tmp_path):
    path = tmp_path / "proxy.yaml"
    path.write_text(settings_text(extra="metering: {spool_dir: spool}\n"))
    settings = load_proxy_settings(path, redis_url="redis://10.0.0.5:6379/2")
    assert (settings.edge_state.file, settings.edge_state.redis_url) == (None, "redis://10.0.0.5:6379/2")
    assert settings.metering.redis_url == "redis://10.0.0.5:6379/2"
    assert Path(settings.metering.spool_dir) == tmp_path / "spool"


@pytest.mark.parametrize(
    ("text", "redis_url", "message"),
    [
        (settings_text(), "localhost:6379",
         "proxy.yaml: The Redis URL `localhost:6379` is not a Redis URL such as `redis://127.0.0.1:6379/0`"),
        (settings_text().replace("edge_state: {file: edge_state.yaml}", "control_plane: {url: 'http://cp:8070'}"),
         "redis://cp:6379/0",
         "proxy.yaml: The proxy follows a control plane, so it cannot also be put on the Redis bus at "
         "redis://cp:6379/0; remove one of them - at `$.control_plane`"),
    ],
    ids=["not-a-redis-url", "follows-a-control-plane"],
)
def test_a_redis_url_that_cannot_be_used(tmp_path, text, redis_url, message):
    path = tmp_path / "proxy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_proxy_settings(path, redis_url=redis_url)
    assert str(caught.value).replace(str(tmp_path) + "/", "") == message


# -- headers an upstream is sent, from the environment ---------------------------------------

def with_headers(headers: str) -> str:
    # The chat-api upstream (line 2) with `headers: {headers}`.
    return settings_text().replace('chat-api: {url: "http://127.0.0.1:8000"}',
                                   f'chat-api: {{url: "http://127.0.0.1:8000", headers: {headers}}}')


PROVIDER_ENV = {"OPENAI_API_KEY": "sk-provider-1", "EMPTY_KEY": "", "BROKEN_KEY": "sk-1\r\nx-evil: 1"}


def test_an_upstreams_headers_are_read_from_the_environment_and_never_shown():
    settings = parse_proxy_settings(
        with_headers('{Authorization: "Bearer ${OPENAI_API_KEY}", OpenAI-Beta: "assistants=v2"}'), "proxy.yaml",
        environ=PROVIDER_ENV)
    assert upstream_headers(settings, PROVIDER_ENV) == {
        "chat-api": ((b"authorization", b"Bearer sk-provider-1"), (b"openai-beta", b"assistants=v2"))}
    assert "sk-provider-1" not in repr(settings) and "sk-provider-1" not in str(settings)
    assert upstream_headers(parse_proxy_settings(settings_text(), "proxy.yaml")) == {}


def test_a_variable_unset_when_the_proxy_starts_is_a_config_error_naming_it():
    settings = parse_proxy_settings(with_headers('{x-api-key: "${OPENAI_API_KEY}"}'), "proxy.yaml",
                                    environ=PROVIDER_ENV)
    with pytest.raises(ConfigError) as caught:
        upstream_headers(settings, {}, "proxy.yaml")
    assert str(caught.value) == (
        "proxy.yaml: Environment variable `OPENAI_API_KEY` is not set; the proxy sends it in header `x-api-key` "
        "to upstream `chat-api` - at `$.upstreams['chat-api'].headers['x-api-key']`")


HEADERS_AT = "- at `$.upstreams['chat-api'].headers"


@pytest.mark.parametrize(("headers", "message"), [
    ('{authorization: "Bearer ${MISSING_KEY}"}',
     "Environment variable `MISSING_KEY` is not set; the proxy sends it in header `authorization` to upstream "
     f"`chat-api` {HEADERS_AT}.authorization`"),
    ('{authorization: "Bearer ${EMPTY_KEY}"}',
     "Environment variable `EMPTY_KEY` is empty; the proxy sends it in header `authorization` to upstream "
     f"`chat-api` {HEADERS_AT}.authorization`"),
    ('{authorization: "Bearer ${BROKEN_KEY}"}',
     "Environment variable `BROKEN_KEY` holds a line break or another control character, which header "
     f"`authorization` cannot carry {HEADERS_AT}.authorization`"),
    ('{authorization: "Bearer ${1KEY}"}',
     "Expected `${NAME}` with an environment variable's name (letters, digits, `_`; not starting with a digit), "
     f"got `${{1KEY}}` {HEADERS_AT}.authorization`"),
    ('{authorization: "Bearer ${OPENAI_API_KEY"}',
     f"A `${{` in a header value must be a reference like `${{OPENAI_API_KEY}}`, closed by `}}` {HEADERS_AT}.authorization`"),
    ('{x-note: "a\\nb"}', f"A header value cannot hold a line break or another control character {HEADERS_AT}['x-note']`"),
    ('{"x api": v}', f"Expected a header name like `x-api-key`, got `x api` {HEADERS_AT}['x api']`"),
    ('{X-Key: a, x-key: b}', f"Header `x-key` is set twice (header names are case-insensitive) {HEADERS_AT}['x-key']`"),
    ('{Host: api.openai.com}', f"The proxy sets `host` itself; an upstream's `headers` cannot {HEADERS_AT}.Host`"),
    ('{x-aforo-customer: c}',
     f"The proxy sets `x-aforo-customer` itself; an upstream's `headers` cannot {HEADERS_AT}['x-aforo-customer']`"),
    ('{content-length: "0"}',
     f"The proxy sets `content-length` itself; an upstream's `headers` cannot {HEADERS_AT}['content-length']`"),
])
def test_bad_upstream_headers(headers, message):
    with pytest.raises(ConfigError) as caught:
        parse_proxy_settings(with_headers(headers), "proxy.yaml", environ=PROVIDER_ENV)
    assert str(caught.value) == f"proxy.yaml:2: {message}"


def test_each_route_reads_the_key_from_its_own_header_or_the_settings_one():
    settings = parse_proxy_settings(settings_text(", api_key_header: X-Api-Key", "api_key_header: x-key\n"),
                                    "proxy.yaml")
    assert settings.routes[0].api_key_header == "x-api-key"
    assert parse_proxy_settings(settings_text(), "proxy.yaml").routes[0].api_key_header is None


@pytest.mark.parametrize(("route_extra", "extra", "message"), [
    (", api_key_header: x_api_key", "",
     "proxy.yaml:6: The proxy drops request headers whose name has `_` (as nginx does), so no key would ever be "
     f"read from `x_api_key`; use `x-api-key` {ROUTE_AT}.api_key_header`"),
    ("", "api_key_header: X_Api_Key\n",
     "proxy.yaml:8: The proxy drops request headers whose name has `_` (as nginx does), so no key would ever be "
     "read from `x_api_key`; use `x-api-key` - at `$.api_key_header`"),
])
def test_a_key_header_the_proxy_drops_is_refused(route_extra, extra, message):
    assert error_of(settings_text(route_extra, extra)) == message
