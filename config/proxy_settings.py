# The proxy settings file (`aforo proxy --config FILE`). Every field but `upstreams`,
# `routes` and one of `edge_state` / `control_plane` has a default; every route names a
# defined upstream; and relative file paths are read from the settings file's
# directory, not the cwd.
#
# Fields (defaults in parentheses):
#   listen ("127.0.0.1:8080")  where clients connect, `host:port` (IPv6 as `[::1]:8080`)
#   workers (1)                processes serving `listen`, >= 1
#   admin ("127.0.0.1:9090")   health and Prometheus metrics, `host:port`
#   api_key_header ("authorization")  where the API key is: in `authorization` as
#                              `Bearer <key>`; in any other header, the whole value
#                              (a route may read it from another: its own
#                              `api_key_header`); never forwarded upstream
#   trusted_proxies ([])       CIDRs of load balancers whose X-Forwarded-* headers are
#                              believed; from any other peer they are replaced
#   shadow_report ("upstream") where a shadow guard's verdict (X-Aforo-Shadow) goes:
#                              `upstream` only, or `client_and_upstream`
#   limits                     request and connection limits (see Limits)
#   upstreams                  name -> Upstream (url, pool_size, timeouts, headers it
#                              is sent, e.g. a provider key from the environment);
#                              at least one
#   routes                     list of Route, at least one (see RouteSettings)
#   edge_state                 the customers' edge state file and how often it is checked
#   control_plane              or: the control plane that feeds edge state and takes
#                              meter events (see ControlPlaneSource)
#   metering                   where meter events go (see MeteringSettings)
#   redis                      timeouts and circuit breaker of Redis calls (see RedisCalls)
#   degraded                   how long a state the source stopped confirming is
#                              trusted, and the Retry-After of routes that then fail
#                              closed (see DegradedMode)
#
# `aforo proxy --redis-url URL` (or $AFORO_REDIS_URL) puts a proxy on the Redis edge
# bus whatever the file says: edge state from it and meter events to it.
from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from config.bus import REDIS_URL_MEANING, REDIS_URL_PATTERN
from config.documents import Problem, duplicate_names, parse_document, read_document
from config.errors import ConfigError, raise_if_any
from config.network import (
    HeaderName,
    HostName,
    HostPort,
    HttpMethod,
    TrustedNetwork,
    UpstreamUrl,
)
from config.schema import PATTERN_MEANINGS, MeteredMetric, Name, Schema
from config.yaml_source import child_path_of

PROXY_SETTINGS_EXPECTED = (
    "a mapping of proxy settings with `upstreams`, `routes` and `edge_state` or `control_plane`"
)
CONTROL_PLANE_TOKEN_ENV = "AFORO_CONTROL_PLANE_TOKEN"
REDIS_URL_ENV = "AFORO_REDIS_URL"
BEARER_HEADER = "authorization"
MIB = 1024 * 1024
PATH_PREFIX_PATTERN = r"^/[^?#\s]*$"
FAIL_POLICY_PATTERN = r"^(open|closed)$"
SHADOW_REPORT_PATTERN = r"^(upstream|client_and_upstream)$"
LLM_FORMAT_PATTERN = r"^(openai_chat|openai_responses|anthropic_messages)$"
SETTINGS_PATTERN_MEANINGS = {
    **PATTERN_MEANINGS,
    REDIS_URL_PATTERN: REDIS_URL_MEANING,
    PATH_PREFIX_PATTERN: "a path starting with `/` (no `?`, `#` or spaces)",
    FAIL_POLICY_PATTERN: "`open` or `closed`",
    SHADOW_REPORT_PATTERN: "`upstream` or `client_and_upstream`",
    LLM_FORMAT_PATTERN: "an LLM wire format: `openai_chat`, `openai_responses` or `anthropic_messages`",
}
Count = Annotated[int, msgspec.Meta(ge=1)]
Units = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
GraceSeconds = Annotated[float, msgspec.Meta(ge=0)]
PathPrefix = Annotated[str, msgspec.Meta(pattern=PATH_PREFIX_PATTERN)]
FilePath = Annotated[str, msgspec.Meta(min_length=1)]
# `${NAME}` in an upstream's header value: the environment variable NAME's value.
_REFERENCE = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Fields the proxy frames or sets itself on every forwarded request (and its own
# `x-aforo-*`): an upstream's `headers` cannot set them.
PROXY_SET_HEADERS = frozenset((
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection", "te",
    "trailer", "upgrade", "expect", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded",
))


class Limits(Schema):
    """What one request and the whole listener may take before the proxy refuses.

    Sizes in bytes: request line (414 above), all header fields together and their
    count (431 above), request body (413 above; 0 refuses any body). Seconds: to
    receive a request's headers (408 after), an idle keep-alive connection is kept,
    and in-flight requests get to finish on shutdown. `max_connections` open client
    connections per worker; a connection beyond that is answered 503 and closed.

    A request body is answered 408 (and nothing of it reaches the upstream whole)
    when no byte of it comes for `body_timeout_s`, or when it falls below
    `min_body_bytes_per_s`: by then it must have sent that many bytes for every
    second past `body_timeout_s`. Time the proxy itself is not reading (the upstream
    takes no more) does not count. Bodies of up to `buffered_body_bytes` (and chunked
    ones until they outgrow it) are read whole before an upstream connection is
    taken, so slow clients cannot hold the upstream pool; larger ones stream.
    """

    max_request_line_bytes: Count = 8192
    max_header_bytes: Count = 32768
    max_headers: Count = 100
    max_body_bytes: Units = 10 * MIB
    header_timeout_s: Seconds = 10.0
    body_timeout_s: Seconds = 10.0
    min_body_bytes_per_s: Count = 1024
    buffered_body_bytes: Units = 64 * 1024
    keepalive_timeout_s: Seconds = 75.0
    max_connections: Count = 10000
    shutdown_grace_s: GraceSeconds = 30.0


class Upstream(Schema):
    """A backend the proxy forwards to: `url` (`http://host:port` or
    `https://host:port`), up to `pool_size` keep-alive connections, seconds to connect
    (TLS handshake included) and to wait for each read once the request is sent.

    Over `https` the proxy sends the URL's host name (SNI) and verifies the
    upstream's certificate against the system's CAs, or only against those in
    `ca_file` (PEM; relative to the settings file) for a private CA.

    `headers`: field name -> value the proxy sets on every request to it, replacing
    any the client sent, e.g. a provider's key: `authorization: "Bearer
    ${OPENAI_API_KEY}"`. Each `${NAME}` is the environment variable NAME, read when
    the proxy starts (unset or empty is a configuration error); the values read are
    never logged, counted or kept in the settings.

    `host_header`: the Host it is sent, `upstream` (the URL's host, as a provider
    needs to route the request and match its certificate) or `client` (the one the
    client sent, as your own backend may route on it). Default: `upstream` for
    `https://`, `client` for `http://`. The client's always goes in X-Forwarded-Host."""

    url: UpstreamUrl
    pool_size: Count = 64
    connect_timeout_s: Seconds = 2.0
    read_timeout_s: Seconds = 60.0
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    ca_file: FilePath | None = None
    host_header: Literal["client", "upstream"] | None = None

    def __post_init__(self) -> None:
        if self.ca_file is not None and not self.url.tls:
            raise ValueError(f"`ca_file` is for `https://` upstreams; `{self.url}` is plain HTTP")

    @property
    def sends_own_host(self) -> bool:
        """Whether requests to it carry its own host (not the client's) in Host."""
        return self.host_header == "upstream" or (self.host_header is None and self.url.tls)


class AiMetering(Schema):
    """Token metering of an LLM API route: requests and responses in the wire
    `format` (`openai_chat`: /v1/chat/completions, `openai_responses`: /v1/responses,
    `anthropic_messages`: /v1/messages). Each response's token usage, JSON or
    streamed, becomes one meter event per kind present, of the metric named here,
    with the model as a dimension. Every token is in one metric only:
    `input_metric` (input at the full rate), `cached_metric` (input read from the
    provider's cache), `cache_write_metric` (input written to it: Anthropic),
    `output_metric` (output other than reasoning) and `reasoning_metric` (reasoning
    tokens, which OpenAI counts in its output total).

    Token quotas (a plan's hard quota on any of these metrics): before forwarding,
    the proxy reserves the request's output limit (`max_tokens` and the like, or
    `default_max_tokens` when it sets none) and its body size in input tokens (4
    bytes a token); after the response, it settles each to the count metered."""

    format: Annotated[str, msgspec.Meta(pattern=LLM_FORMAT_PATTERN)]
    default_max_tokens: Annotated[int, msgspec.Meta(ge=0)] = 4096
    input_metric: MeteredMetric = "ai_input_tokens"
    cached_metric: MeteredMetric = "ai_cached_tokens"
    cache_write_metric: MeteredMetric = "ai_cache_write_tokens"
    output_metric: MeteredMetric = "ai_output_tokens"
    reasoning_metric: MeteredMetric = "ai_reasoning_tokens"

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric the route's calls meter tokens in: input, cached, cache write,
        output, reasoning (in this order)."""
        return (self.input_metric, self.cached_metric, self.cache_write_metric, self.output_metric,
                self.reasoning_metric)


class McpMetering(Schema):
    """Metering of an MCP server's route (streamable HTTP): each POST's JSON-RPC
    `tools/call` requests (single or batched) count one unit of `tool_metric` per
    call, with the tool as a dimension, once the server accepted the POST (status
    below 400); each agent session an `initialize` opens (a new `Mcp-Session-Id`)
    counts one unit of `session_metric`. `tool_features`: tool name -> the features
    a customer's plan must include to call it (a POST calling a tool it lacks is
    answered 403 and not forwarded)."""

    tool_metric: MeteredMetric = "mcp_tool_calls"
    session_metric: MeteredMetric = "agent_sessions"
    tool_features: dict[str, tuple[Name, ...]] = msgspec.field(default_factory=dict)

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric the route's exchanges meter calls and sessions in."""
        return self.tool_metric, self.session_metric


class RouteSettings(Schema):
    """Which requests go to which upstream, and what they cost the customer.

    A request matches when its host equals `host` (case-insensitive, port ignored;
    no `host` = any host), its path starts with `path_prefix` on a segment boundary
    and its method is in `methods` (none = any). Matching routes need every feature
    in `features` and count `units` of `metric` toward the customer's quota.

    `when_stale`: what the route does once the edge state is older than the
    staleness budget (see DegradedMode): `open` goes on deciding from the last state,
    `closed` answers 503 with Retry-After until the state is fresh again.

    `when_quota_unknown`: what the route does with a request that needs units of a
    hard quota its worker does not hold while the quota ledger cannot be asked
    (Redis or the control plane away, or a Redis that lost its ledgers being
    rebuilt): `open` admits it from the last state, at most one lease chunk (a
    twentieth of the limit) per worker, customer and metric in each outage, never
    beyond what that state says is left; then, and always with `closed`, it is
    answered 503 with Retry-After. Units the ledger granted the worker before are
    spent as usual either way, so `closed` never admits beyond the limit.

    `ai`: the route serves an LLM API whose token usage is metered (see AiMetering);
    `mcp`: an MCP server whose tool calls and sessions are (see McpMetering).

    `api_key_header`: where the route reads the customer's key (as the settings'
    `api_key_header`, which it defaults to): `authorization` for OpenAI-style SDKs
    (`Bearer <key>`), `x-api-key` for Anthropic's. Every field any route reads a
    key from is held back from every upstream, and a request that repeats one is
    refused with 400.
    """

    name: Name
    upstream: Name
    host: HostName | None = None
    api_key_header: HeaderName | None = None
    path_prefix: PathPrefix = "/"
    methods: tuple[HttpMethod, ...] | None = None
    features: tuple[Name, ...] = ()
    metric: MeteredMetric = "api_calls"
    units: Units = 1
    when_stale: Annotated[str, msgspec.Meta(pattern=FAIL_POLICY_PATTERN)] = "open"
    when_quota_unknown: Annotated[str, msgspec.Meta(pattern=FAIL_POLICY_PATTERN)] = "open"
    ai: AiMetering | None = None
    mcp: McpMetering | None = None

    def __post_init__(self) -> None:
        if self.ai is not None and self.mcp is not None:
            raise ValueError("A route meters an LLM API (`ai`) or an MCP server (`mcp`), not both")


class EdgeStateSource(Schema):
    """Where the customers' edge state comes from: a `file`, checked for a change every
    `reload_interval_s` (a change is rebuilt and swapped in, a broken file is reported
    and skipped); or the Redis edge bus at `redis_url`, where control planes publish
    it (the worker serves once it has the whole state, and gives up after
    `start_timeout_s`)."""

    file: FilePath | None = None
    reload_interval_s: Seconds = 1.0
    redis_url: Annotated[str, msgspec.Meta(pattern=REDIS_URL_PATTERN)] | None = None
    start_timeout_s: Seconds = 30.0

    def __post_init__(self) -> None:
        if (self.file is None) == (self.redis_url is None):
            raise ValueError("Give exactly one of `file` and `redis_url`")


class ControlPlaneSource(Schema):
    """The control plane this proxy follows for edge state and sends meter events to:
    its `url` (`http://host:port`) and the environment variable that holds its admin
    token. The proxy starts serving once it has the whole state, and gives up after
    `start_timeout_s` seconds without it."""

    url: UpstreamUrl
    token_env: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = CONTROL_PLANE_TOKEN_ENV
    start_timeout_s: Seconds = 30.0


class MeteringSettings(Schema):
    """Meter events: appended as NDJSON to `path` (sent to the control plane instead
    when the proxy follows one, and to the Redis meter stream at `redis_url` when one
    is given), spooled to `spool_dir` while the sink is behind; up to `buffer_events`
    held in memory, written `batch_events` at a time at least every
    `flush_interval_s` seconds."""

    path: FilePath = "meter-events.ndjson"
    redis_url: Annotated[str, msgspec.Meta(pattern=REDIS_URL_PATTERN)] | None = None
    spool_dir: FilePath = "meter-spool"
    buffer_events: Count = 100_000
    batch_events: Count = 1000
    flush_interval_s: Seconds = 1.0

    def __post_init__(self) -> None:
        if self.batch_events > self.buffer_events:
            raise ValueError(
                f"`batch_events` ({self.batch_events}) must not exceed "
                f"`buffer_events` ({self.buffer_events})"
            )


class RedisCalls(Schema):
    """Every call a worker makes to Redis (edge state, meter events, quota leases) is
    bounded by `timeout_s`; after `breaker_failures` failures in a row the worker stops
    calling for `breaker_open_s` seconds (circuit open), then tries one call."""

    timeout_s: Seconds = 0.5
    breaker_failures: Count = 3
    breaker_open_s: Seconds = 2.0


class DegradedMode(Schema):
    """When the edge state's source (the Redis bus or the control plane) stops
    answering, the worker decides from its last state; once that state is older than
    `staleness_budget_s`, routes with `when_stale: closed` answer 503 with
    `Retry-After: retry_after_s` until the source answers again."""

    staleness_budget_s: Seconds = 30.0
    retry_after_s: Count = 5


class ProxySettings(Schema):
    """A validated proxy settings file (see the module comment for every field)."""

    upstreams: dict[Name, Upstream]
    routes: tuple[RouteSettings, ...]
    edge_state: EdgeStateSource | None = None
    control_plane: ControlPlaneSource | None = None
    listen: HostPort = HostPort("127.0.0.1", 8080)
    workers: Count = 1
    admin: HostPort = HostPort("127.0.0.1", 9090)
    api_key_header: HeaderName = HeaderName(BEARER_HEADER)
    trusted_proxies: tuple[TrustedNetwork, ...] = ()
    shadow_report: Annotated[str, msgspec.Meta(pattern=SHADOW_REPORT_PATTERN)] = "upstream"
    limits: Limits = msgspec.field(default_factory=Limits)
    metering: MeteringSettings = msgspec.field(default_factory=MeteringSettings)
    redis: RedisCalls = msgspec.field(default_factory=RedisCalls)
    degraded: DegradedMode = msgspec.field(default_factory=DegradedMode)

    def admin_of(self, worker_index: int) -> HostPort:
        """Where worker `worker_index` answers health and metrics: `admin`'s port plus
        the worker's index (port 0: each worker's own, picked by the system)."""
        return HostPort(self.admin.host, self.admin.port + worker_index if self.admin.port else 0)

    @property
    def api_key_is_bearer(self) -> bool:
        """True when the key is read as `Bearer <key>` from the Authorization header;
        False when the whole value of `api_key_header` is the key."""
        return self.api_key_header == BEARER_HEADER


def parse_proxy_settings(
    text: str, file: str = "<string>", base_dir: str | PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ProxySettings:
    """Validate proxy settings YAML `text`; `file` names it in errors.

    Relative `edge_state.file`, `metering.path` and `metering.spool_dir` are joined
    to `base_dir` (left as written when None; absolute paths are never changed).
    `environ` (default os.environ) must hold every variable an upstream's `headers`
    name. Raises ConfigError (ConfigErrors for several cross-field problems) naming
    the file, line and path: YAML and schema errors, a route naming an unknown
    upstream, duplicate route names, a route that an earlier one always wins over,
    and upstream headers that cannot be sent (see upstream_header_problems).
    """
    environ = os.environ if environ is None else environ
    settings = parse_document(
        text,
        file,
        ProxySettings,
        expected=PROXY_SETTINGS_EXPECTED,
        pattern_meanings=SETTINGS_PATTERN_MEANINGS,
        cross_check=lambda value: proxy_problems(value, environ),
    )
    if base_dir is None:
        return settings
    settings = resolve_proxy_paths(settings, base_dir)
    _check_ca_files(settings, file)
    return settings


def load_proxy_settings(path: str | PathLike[str], redis_url: str | None = None,
                        environ: Mapping[str, str] | None = None) -> ProxySettings:
    """Read and validate the settings file at `path`; relative paths inside it are
    resolved against its directory. With `redis_url` the proxy is on that Redis edge
    bus (see on_the_bus). Raises OSError when it cannot be read and ConfigError as
    parse_proxy_settings does (and for text that is not UTF-8)."""
    text, _ = read_document(path)
    settings = parse_proxy_settings(text, str(path), Path(path).parent, environ)
    return settings if redis_url is None else on_the_bus(settings, redis_url, str(path))


def on_the_bus(settings: ProxySettings, redis_url: str, file: str = "<settings>") -> ProxySettings:
    """`settings` with edge state followed from the Redis bus at `redis_url` and meter
    events sent to it (the file's `edge_state` start timeout kept). Raises ConfigError
    for a URL that is not a Redis URL and for settings that follow a control plane."""
    if not re.match(REDIS_URL_PATTERN, redis_url):
        raise ConfigError(f"The Redis URL `{redis_url}` is not {REDIS_URL_MEANING}", file)
    if settings.control_plane is not None:
        raise ConfigError(f"The proxy follows a control plane, so it cannot also be put on the Redis bus at "
                          f"{redis_url}; remove one of them", file, path="$.control_plane")
    start_timeout_s = EdgeStateSource.start_timeout_s if settings.edge_state is None \
        else settings.edge_state.start_timeout_s
    return msgspec.structs.replace(
        settings, edge_state=EdgeStateSource(redis_url=redis_url, start_timeout_s=start_timeout_s),
        metering=msgspec.structs.replace(settings.metering, redis_url=redis_url))


def upstream_tls_context(name: str, upstream: Upstream) -> ssl.SSLContext:
    """The TLS client context of an https upstream: certificates verified (against
    `ca_file` only when given, else the system's CAs) and host names checked. Raises
    ConfigError when the CA file cannot be read or holds no certificate."""
    try:
        return ssl.create_default_context(cafile=upstream.ca_file)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"upstream `{name}`: the CA file {upstream.ca_file} cannot be used: "
                          f"{error.strerror or error}", path=f"$.upstreams.{name}.ca_file") from error


def _check_ca_files(settings: ProxySettings, file: str) -> None:
    # A CA file is read when the settings are, so check-config finds a missing one.
    errors = []
    for name, upstream in settings.upstreams.items():
        if upstream.ca_file is not None:
            try:
                upstream_tls_context(name, upstream)
            except ConfigError as error:
                errors.append(ConfigError(error.message, file, path=error.path))
    raise_if_any(errors)


def resolve_proxy_paths(settings: ProxySettings, base_dir: str | PathLike[str]) -> ProxySettings:
    """`settings` with relative file paths joined to `base_dir` (absolute ones kept)."""
    def resolve(file: str) -> str:
        return os.path.join(base_dir, file)

    edge_state = settings.edge_state
    if edge_state is not None and edge_state.file is not None:
        edge_state = msgspec.structs.replace(edge_state, file=resolve(edge_state.file))
    upstreams = {
        name: upstream if upstream.ca_file is None else msgspec.structs.replace(upstream, ca_file=resolve(upstream.ca_file))
        for name, upstream in settings.upstreams.items()
    }
    metering = msgspec.structs.replace(
        settings.metering,
        path=resolve(settings.metering.path),
        spool_dir=resolve(settings.metering.spool_dir),
    )
    return msgspec.structs.replace(settings, edge_state=edge_state, metering=metering, upstreams=upstreams)


def proxy_problems(settings: ProxySettings, environ: Mapping[str, str] | None = None) -> list[Problem]:
    """No upstream or no route at all; routes that name no upstream, share a name, or
    can never be chosen because an earlier route with the same host and prefix takes
    all of their methods; an API key header the proxy drops; upstream headers that
    cannot be sent with `environ` (default os.environ; see upstream_header_problems)."""
    environ = os.environ if environ is None else environ
    problems: list[Problem] = []
    problems += _underscored_key_header(settings.api_key_header, "$.api_key_header")
    if (settings.edge_state is None) == (settings.control_plane is None):
        problems.append(Problem("$", "Set exactly one of `edge_state` (a file) and `control_plane` (a URL): "
                                     "where the customers' edge state comes from"))
    if not settings.upstreams:
        problems.append(Problem("$.upstreams", "At least one upstream is required"))
    if not settings.routes:
        problems.append(Problem("$.routes", "At least one route is required"))
    known = ", ".join(f"`{name}`" for name in settings.upstreams)
    problems += duplicate_names((route.name for route in settings.routes), "$.routes", "name", "route name")
    problems += upstream_header_problems(settings, environ)
    for index, route in enumerate(settings.routes):
        if route.api_key_header is not None:
            problems += _underscored_key_header(route.api_key_header, f"$.routes[{index}].api_key_header")
        if route.upstream not in settings.upstreams and settings.upstreams:
            problems.append(
                Problem(
                    f"$.routes[{index}].upstream",
                    f"Unknown upstream `{route.upstream}`; the upstreams are {known}",
                )
            )
        for earlier_index, earlier in enumerate(settings.routes[:index]):
            if _always_wins_over(earlier, route):
                problems.append(
                    Problem(
                        f"$.routes[{index}]",
                        f"Route `{route.name}` can never match: route `{earlier.name}` "
                        f"(`$.routes[{earlier_index}]`) has the same host and path prefix "
                        "and takes all of its methods",
                    )
                )
                break
    return problems


def _underscored_key_header(header: str, path: str) -> list[Problem]:
    # The proxy drops request fields whose name has `_` (proxy.headers.FIELD_UNDERSCORED).
    if "_" not in header:
        return []
    return [Problem(path, f"The proxy drops request headers whose name has `_` (as nginx does), so no key "
                          f"would ever be read from `{header}`; use `{header.replace('_', '-')}`")]


def upstream_header_problems(settings: ProxySettings, environ: Mapping[str, str], at: str = "$") -> list[Problem]:
    """For settings found at path `at` of their file: an upstream header whose name
    is not a field name, repeats another (names are case-insensitive) or is one the
    proxy sets itself; whose value holds a control character or a `${` that is not
    `${NAME}`; or that names an environment variable unset or empty in `environ`, or
    holding a control character (a value is never shown: it may be a secret)."""
    problems = []
    for upstream_name, upstream in settings.upstreams.items():
        at_headers = child_path_of(f"{at}.upstreams", upstream_name) + ".headers"
        seen: set[str] = set()
        for name, template in upstream.headers.items():
            path = child_path_of(at_headers, name)
            field = name.lower()
            problem = None
            if not _HEADER_NAME.fullmatch(name):
                problem = f"Expected a header name like `x-api-key`, got `{name}`"
            elif field in seen:
                problem = f"Header `{field}` is set twice (header names are case-insensitive)"
            elif field in PROXY_SET_HEADERS or field.startswith("x-aforo-"):
                problem = f"The proxy sets `{field}` itself; an upstream's `headers` cannot"
            elif _CONTROL.search(_REFERENCE.sub("", template)):
                problem = "A header value cannot hold a line break or another control character"
            elif "${" in _REFERENCE.sub("", template):
                problem = "A `${` in a header value must be a reference like `${OPENAI_API_KEY}`, closed by `}`"
            else:
                problem = _variable_problem(template, environ, field, upstream_name)
            seen.add(field)
            if problem is not None:
                problems.append(Problem(path, problem))
    return problems


def _variable_problem(template: str, environ: Mapping[str, str], field: str, upstream: str) -> str | None:
    for variable in _REFERENCE.findall(template):
        if not _ENV_NAME.fullmatch(variable):
            return (f"Expected `${{NAME}}` with an environment variable's name (letters, digits, `_`; not "
                    f"starting with a digit), got `${{{variable}}}`")
        value = environ.get(variable)
        if not value:
            state = "is empty" if variable in environ else "is not set"
            return (f"Environment variable `{variable}` {state}; the proxy sends it in header `{field}` to "
                    f"upstream `{upstream}`")
        if _CONTROL.search(value):
            return (f"Environment variable `{variable}` holds a line break or another control character, "
                    f"which header `{field}` cannot carry")
    return None


def upstream_headers(settings: ProxySettings, environ: Mapping[str, str] | None = None,
                     file: str = "<settings>") -> dict[str, tuple[tuple[bytes, bytes], ...]]:
    """upstream name -> the (name, value) fields the proxy sets on every request to
    it: names lower-cased, each `${NAME}` replaced by `environ`'s (default
    os.environ) value, UTF-8; upstreams without `headers` are left out. Read once
    when the proxy starts. Raises ConfigError(s) as the loader does (`file` names
    the settings in them)."""
    environ = os.environ if environ is None else environ
    raise_if_any([ConfigError(problem.message, file, path=problem.path)
                  for problem in upstream_header_problems(settings, environ)])
    return {
        name: tuple((field.lower().encode(), _REFERENCE.sub(lambda found: environ[found[1]], template).encode())
                    for field, template in upstream.headers.items())
        for name, upstream in settings.upstreams.items() if upstream.headers
    }


def _always_wins_over(earlier: RouteSettings, later: RouteSettings) -> bool:
    if (earlier.host, earlier.path_prefix) != (later.host, later.path_prefix):
        return False
    if earlier.methods is None:
        return True
    return later.methods is not None and set(later.methods) <= set(earlier.methods)
