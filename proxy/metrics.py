# Every Prometheus metric of one proxy, on the proxy's own registry (never the global
# one). Hot path: the request counter and the decision histogram, through label children
# cached per (route, decision). Gauges mirroring live objects are read at scrape time only.
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from decision_core.decide import TITLES

log = logging.getLogger("aforo.metrics")

# `decision` label values: the decision core's reasons, then what the proxy answers
# before or instead of a decision.
DECISION_ERROR_502 = "error_502"
DECISION_ERROR_504 = "error_504"
DECISION_BAD_REQUEST = "bad_request"
DECISION_UNROUTED = "unrouted"
DECISION_UNAUTHORIZED = "unauthorized"
DECISION_LABELS = (*TITLES, DECISION_ERROR_502, DECISION_ERROR_504, DECISION_BAD_REQUEST,
                   DECISION_UNROUTED, DECISION_UNAUTHORIZED)

DECISION_BUCKETS_S = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3)
UPSTREAM_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                      1.0, 2.5, 5.0, 10.0, 30.0)
METER_OUTCOMES = ("recorded", "flushed", "spilled", "lost")
POOL_STATES = ("idle", "busy")

# (upstream, state, connections) triples, e.g. from each pool's idle and busy counts.
PoolConnections = Callable[[], Iterable[tuple[str, str, int]]]


class ProxyMetrics:
    """The metrics of one proxy and the registry `/metrics` renders.

    Hot path (cheap, called per request): `count_request(route, decision)` — one dict
    lookup and an increment —, `request_counter(route, decision)` for callers that
    keep the child themselves, `observe_decision(seconds)`. Per upstream exchange:
    `observe_upstream(upstream, seconds)`. Rare: `count_reload_error(file, error)`.
    Read at scrape time, never on the hot path: the meter buffer (`watch_meter_buffer`),
    upstream pools (`watch_upstream_pools`), edge state age (`watch_edge_state_age`).

    Metric objects: `requests_total`, `decision_seconds`, `upstream_seconds`,
    `config_reload_errors_total` (prometheus_client objects, on `registry`).
    """

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests_total = Counter(
            "aforo_requests_total",
            "Requests answered, by route and decision (decision core reason or proxy outcome).",
            ("route", "decision"), registry=self.registry)
        self.decision_seconds = Histogram(
            "aforo_decision_seconds", "Time spent in the decision core per request.",
            buckets=DECISION_BUCKETS_S, registry=self.registry)
        self.upstream_seconds = Histogram(
            "aforo_upstream_seconds", "Time from forwarding a request to the end of the upstream's response.",
            ("upstream",), buckets=UPSTREAM_BUCKETS_S, registry=self.registry)
        self.config_reload_errors_total = Counter(
            "aforo_config_reload_errors_total",
            "Configuration reloads rejected (the old configuration stays in force).",
            ("file",), registry=self.registry)
        self._live = _LiveCollector()
        self.registry.register(self._live)
        self._request_children: dict[tuple[str, str], object] = {}
        self._upstream_children: dict[str, object] = {}
        # Bound once: the unlabelled histogram is its own child.
        self.observe_decision: Callable[[float], None] = self.decision_seconds.observe

    def request_counter(self, route: str, decision: str):
        """The `aforo_requests_total{route, decision}` child, created once and cached.
        Call `.inc()` on it. Route names come from configuration and decisions from
        DECISION_LABELS, which keeps the number of series bounded."""
        key = (route, decision)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests_total.labels(route=route, decision=decision)
        return child

    def count_request(self, route: str, decision: str) -> None:
        """Count one answered request under (route, decision)."""
        child = self._request_children.get((route, decision))
        if child is None:
            child = self.request_counter(route, decision)
        child.inc()

    def observe_upstream(self, upstream: str, seconds: float) -> None:
        """Record one upstream exchange's duration, in seconds."""
        child = self._upstream_children.get(upstream)
        if child is None:
            child = self._upstream_children[upstream] = self.upstream_seconds.labels(upstream=upstream)
        child.observe(seconds)

    def count_reload_error(self, file: str, error: BaseException | None = None) -> None:
        """Count one rejected reload of configuration `file` (its path as configured).
        `error` is accepted so this can be a reload-error callback as it is; the
        loader logs it, the metric only counts. Safe from any thread."""
        self.config_reload_errors_total.labels(file=file).inc()

    def watch_meter_buffer(self, buffer) -> None:
        """Read `buffer`'s counters at each scrape (a MeterBuffer, or anything with
        depth, spooled_events, recorded_total, flushed_total, spilled_total,
        lost_total and sink_errors_total). A later call replaces the buffer watched."""
        self._live.meter_buffer = buffer

    def watch_upstream_pools(self, connections: PoolConnections) -> None:
        """Call `connections()` at each scrape for (upstream, state, count) triples,
        state being "idle" or "busy"."""
        self._live.pool_connections = connections

    def watch_edge_state_age(self, age_s: Callable[[], float]) -> None:
        """Call `age_s()` at each scrape: seconds since the edge state last changed
        or was confirmed by the control plane."""
        self._live.edge_state_age_s = age_s

    def watch(self, app, meter_buffer, edge_state) -> None:
        """Watch a worker's live objects in one call: `meter_buffer` (see
        watch_meter_buffer), the upstream pools in `app.pools` (name -> pool with an
        `idle` collection and a `busy` count) and, when `edge_state` has an `age_s()`
        method, its age. An edge state without one leaves the age gauge empty."""
        self.watch_meter_buffer(meter_buffer)
        self.watch_upstream_pools(lambda: pool_connections(app.pools))
        age_s = getattr(edge_state, "age_s", None)
        if callable(age_s):
            self.watch_edge_state_age(age_s)


def pool_connections(pools) -> Iterator[tuple[str, str, int]]:
    """(upstream, "idle" | "busy", count) for each pool in the mapping `pools`
    (name -> pool with an `idle` collection and a `busy` count)."""
    for name, pool in pools.items():
        yield name, "idle", len(pool.idle)
        yield name, "busy", pool.busy


def new_proxy_metrics() -> ProxyMetrics:
    """A fresh set of proxy metrics on its own registry: several proxies (or tests)
    in one process never share or collide on a series."""
    return ProxyMetrics()


class _LiveCollector(Collector):
    # Families computed from live objects at scrape time. A source that raises is
    # logged and its family left without samples, so one bad source never fails a scrape.

    def __init__(self):
        self.meter_buffer = None
        self.pool_connections: PoolConnections | None = None
        self.edge_state_age_s: Callable[[], float] | None = None

    def describe(self) -> Iterator[Metric]:
        return iter(_families())

    def collect(self) -> Iterator[Metric]:
        depth, spooled, events, sink_errors, pools, age = _families()
        buffer = self.meter_buffer
        if buffer is not None:
            try:
                totals = (buffer.recorded_total, buffer.flushed_total, buffer.spilled_total, buffer.lost_total)
                depth.add_metric([], buffer.depth)
                spooled.add_metric([], buffer.spooled_events)
                for outcome, total in zip(METER_OUTCOMES, totals):
                    events.add_metric([outcome], total)
                sink_errors.add_metric([], buffer.sink_errors_total)
            except Exception:
                log.exception("cannot read the meter buffer for /metrics")
        if self.pool_connections is not None:
            try:
                for upstream, state, count in self.pool_connections():
                    pools.add_metric([upstream, state], count)
            except Exception:
                log.exception("cannot read upstream pools for /metrics")
        if self.edge_state_age_s is not None:
            try:
                age.add_metric([], self.edge_state_age_s())
            except Exception:
                log.exception("cannot read the edge state age for /metrics")
        return iter((depth, spooled, events, sink_errors, pools, age))


def _families():
    return (
        GaugeMetricFamily("aforo_meter_buffer_depth", "Meter events held in memory, waiting for the sink."),
        GaugeMetricFamily("aforo_meter_spooled_events", "Meter events waiting in the disk spool."),
        CounterMetricFamily("aforo_meter_events", "Meter events by outcome: recorded, flushed (delivered), "
                            "spilled (to the disk spool), lost (neither kept nor spooled).", labels=("outcome",)),
        CounterMetricFamily("aforo_meter_sink_errors", "Failed meter batch writes (each retried)."),
        GaugeMetricFamily("aforo_upstream_pool_connections", "Open upstream connections by state.",
                          labels=("upstream", "state")),
        GaugeMetricFamily("aforo_edge_state_age_seconds", "Seconds since the edge state was last refreshed."),
    )
