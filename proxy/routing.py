# Which route a request takes. Routes bound to the request's host are tried before
# routes for any host; within each group the longest path prefix wins, matched on a
# segment boundary (`/v1/chat` takes `/v1/chat`, `/v1/chat/x`, `/v1/chat?x`, never
# `/v1/chatty`), on the normalized path (proxy.paths). A route whose methods exclude
# the request's is skipped, not fatal.
from __future__ import annotations

import functools
from collections.abc import Iterable

from config.network import HeaderName
from config.proxy_settings import BEARER_HEADER, RouteSettings
from decision_core.state import RequestFacts

_BEARER = HeaderName(BEARER_HEADER)
_BEARER_HEADER = _BEARER.encode()
_SLASH = ord("/")
_QUERY = ord("?")
# Host header values seen as sent -> that host's routes, so a repeated Host skips
# normalising. Bounded: Host is client input, and unseen values still match, slower.
HOST_CACHE_ENTRIES = 1024
_UNSEEN = object()


class Route:
    """One route: `name`, the `upstream` it forwards to (a name from the settings),
    `host` (lower-case bytes without port, or None for any host), `path_prefix`
    (bytes), `methods` (frozenset of upper-case bytes, or None for any), `facts`,
    the RequestFacts (features, metric, units, and the `other_metrics` its metered
    calls count: their guards act on it too) decide() gets, built once here,
    `fail_closed`: refuse while the edge state is stale (else decide from it),
    `quota_unknown_closed`: refuse (503) rather than admit from the last state what
    no quota ledger granted while the ledger cannot be asked, and
    `metered_call`: None, or a callable returning a new call object (AiCall,
    McpCall) for each request, whose body is then read whole before forwarding.
    `api_key_header`: the (lower-case) field the customer's key is read from, as
    `Bearer <key>` when it is `authorization` (`key_bearer`), else the whole value;
    `key_slot`: its index in its Router's `key_fields`."""

    def __init__(
        self,
        name: str,
        upstream: str,
        path_prefix: bytes = b"/",
        host: bytes | None = None,
        methods: Iterable[bytes] | None = None,
        features: Iterable[str] = (),
        metric: str = "api_calls",
        units: int = 1,
        fail_closed: bool = False,
        metered_call: object = None,
        other_metrics: Iterable[str] = (),
        api_key_header: bytes = b"authorization",
        quota_unknown_closed: bool = False,
    ) -> None:
        if not path_prefix.startswith(b"/"):
            raise ValueError(f"route {name!r}: a path prefix starts with '/', got {path_prefix!r}")
        self.name = name
        self.upstream = upstream
        self.host = None if host is None else _host_name(host)
        self.path_prefix = path_prefix
        self.methods = None if methods is None else frozenset(methods)
        self.facts = RequestFacts(tuple(features), metric, units, tuple(other_metrics))
        # The metrics a response's RateLimit fields speak of (those with a quota in the
        # customer's plan): the route's, then the ones its calls meter (LLM tokens).
        self.quota_metrics = (metric, *other_metrics)
        self.fail_closed = fail_closed
        self.quota_unknown_closed = quota_unknown_closed
        self.metered_call = metered_call
        self.api_key_header = api_key_header.lower()
        self.key_bearer = self.api_key_header == _BEARER_HEADER
        self.key_slot = 0

    @classmethod
    def from_settings(cls, settings: RouteSettings, api_key_header: HeaderName = _BEARER) -> Route:
        """The route a validated settings entry describes; its key is read from the
        route's `api_key_header`, else from `api_key_header` (the settings' own)."""
        return cls(
            settings.name,
            settings.upstream,
            settings.path_prefix.encode(),
            None if settings.host is None else settings.host.encode("ascii"),
            None if settings.methods is None else (method.encode() for method in settings.methods),
            settings.features,
            settings.metric,
            settings.units,
            settings.when_stale == "closed",
            *_metering(settings),
            (settings.api_key_header or api_key_header).encode(),
            settings.when_quota_unknown == "closed",
        )

    def __repr__(self) -> str:
        return f"Route(name={self.name!r}, host={self.host!r}, path_prefix={self.path_prefix!r})"


def _metering(settings: RouteSettings):
    # (metered_call, other_metrics) of a route; the call classes are imported only
    # for routes that need them.
    if settings.ai is not None:
        from proxy.ai_metering import AiCall
        return functools.partial(AiCall, settings.ai), settings.ai.metrics
    if settings.mcp is not None:
        from proxy.mcp_metering import McpCall
        return functools.partial(McpCall, settings.mcp), settings.mcp.metrics
    return None, ()


class Router:
    """Matches requests to routes; built once per route table. Only a bounded cache
    of normalised Host values changes after that (one worker, one event loop).
    `key_fields`: every field any route reads the customer's key from (lower-case,
    each once; a route's `key_slot` indexes it): a request's are held for the
    decision and never forwarded, whichever route takes it."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        self.key_fields = _key_fields(self.routes)
        by_host: dict[bytes, list[Route]] = {}
        any_host: list[Route] = []
        for route in self.routes:
            if route.host is None:
                any_host.append(route)
            else:
                by_host.setdefault(route.host, []).append(route)
        self._by_host = {host: _candidates(group) for host, group in by_host.items()}
        self._any_host = _candidates(any_host)
        self._host_cache: dict[bytes, object] = {}

    @classmethod
    def from_settings(cls, routes: Iterable[RouteSettings], api_key_header: HeaderName = _BEARER) -> Router:
        """The router for the `routes` of validated proxy settings, whose own
        `api_key_header` is `api_key_header`."""
        return cls(Route.from_settings(route, api_key_header) for route in routes)

    def match(self, host: bytes | None, path: bytes, method: bytes) -> Route | None:
        """The route for a request, or None when no route takes it.

        `host`: the Host header (any case, with or without port; None when absent).
        `path`: the request target in origin form, query string included, its path
        normalized (proxy.paths.normal_target: what is routed is what is forwarded).
        `method`: as sent (methods are case-sensitive). Routes for `host` are tried
        first, then routes for any host; within each, the longest matching prefix
        whose methods allow `method`; equal prefixes keep settings order.
        """
        if host is not None and self._by_host:
            candidates = self._host_cache.get(host, _UNSEEN)
            if candidates is _UNSEEN:
                candidates = self._by_host.get(_host_name(host))
                if len(self._host_cache) < HOST_CACHE_ENTRIES:
                    self._host_cache[host] = candidates
            if candidates is not None:
                route = _first_match(candidates, path, method)
                if route is not None:
                    return route
        return _first_match(self._any_host, path, method)


def _key_fields(routes: tuple) -> tuple:
    # Each route's key field, each once in settings order; sets each route's key_slot.
    fields: list[bytes] = []
    for route in routes:
        if route.api_key_header not in fields:
            fields.append(route.api_key_header)
        route.key_slot = fields.index(route.api_key_header)
    return tuple(fields)


def _candidates(routes: list[Route]) -> tuple[tuple[bytes, int, bool, frozenset[bytes] | None, Route], ...]:
    # Longest prefix first; sorted() is stable, so equal prefixes keep settings order.
    ordered = sorted(routes, key=lambda route: -len(route.path_prefix))
    return tuple(
        (route.path_prefix, len(route.path_prefix), route.path_prefix.endswith(b"/"), route.methods, route)
        for route in ordered
    )


def _first_match(candidates: tuple, path: bytes, method: bytes) -> Route | None:
    for prefix, size, ends_in_slash, methods, route in candidates:
        if (
            path.startswith(prefix)
            and (ends_in_slash or len(path) == size or path[size] == _SLASH or path[size] == _QUERY)
            and (methods is None or method in methods)
        ):
            return route
    return None


def _host_name(host: bytes) -> bytes:
    # `API.example.com:8443` -> `api.example.com`; `[::1]:8080` -> `[::1]`; a trailing
    # dot (fully qualified form) names the same host.
    if host[:1] == b"[":
        end = host.find(b"]")
        return host[: end + 1].lower() if end > 0 else host.lower()
    colon = host.find(b":")
    name = host if colon < 0 else host[:colon]
    return name.rstrip(b".").lower()
