# Every Prometheus metric of one proxy, on the proxy's own registry (never the global
# one). The per-request metrics (request counter, decision and upstream histograms) are
# plain integers and lists bumped without locks — one event loop thread owns them — and
# become Prometheus families only when /metrics is scraped; so do the gauges that
# mirror live objects.
from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Iterable, Iterator

import cython
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from config.watched_file import ReloadErrorCounter
from decision_core.decide import TITLES

log = logging.getLogger("aforo.metrics")

# `decision` label values: the decision core's reasons, then what the proxy answers
# before or instead of a decision.
DECISION_ERROR_502 = "error_502"
DECISION_ERROR_504 = "error_504"
DECISION_BAD_REQUEST = "bad_request"
DECISION_UNROUTED = "unrouted"
DECISION_UNAUTHORIZED = "unauthorized"
DECISION_ERROR_500 = "error_500"
DECISION_TOO_MANY_CONNECTIONS = "too_many_connections"
DECISION_LABELS = (*TITLES, DECISION_ERROR_502, DECISION_ERROR_504, DECISION_BAD_REQUEST,
                   DECISION_UNROUTED, DECISION_UNAUTHORIZED, DECISION_ERROR_500, DECISION_TOO_MANY_CONNECTIONS)

DECISION_BUCKETS_S = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3)
UPSTREAM_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                      1.0, 2.5, 5.0, 10.0, 30.0)
METER_OUTCOMES = ("recorded", "flushed", "spilled", "lost")
POOL_STATES = ("idle", "busy")

# (upstream, state, connections) triples, e.g. from each pool's idle and busy counts.
PoolConnections = Callable[[], Iterable[tuple[str, str, int]]]


class ProxyMetrics:
    """The metrics of one proxy and the registry `/metrics` renders.

    Hot path (cheap, called per request): `count_request(route, decision)` — two dict
    lookups and an increment —, `observe_decision(seconds)`. Per upstream exchange:
    `observe_upstream(upstream, seconds)`. Rare: `count_reload_error(file, error)`.
    Read at scrape time, never on the hot path: the meter buffer (`watch_meter_buffer`),
    upstream pools (`watch_upstream_pools`), edge state age (`watch_edge_state_age`).

    Metric objects: `requests_total`, `decision_seconds`, `upstream_seconds`,
    `config_reload_errors_total` (a config.watched_file.ReloadErrorCounter), all on
    `registry`.
    """

    def __init__(self):
        self.registry = CollectorRegistry()
        self.config_reload_errors_total = ReloadErrorCounter(self.registry)
        # route -> decision -> requests answered.
        self.request_counts: dict[str, dict[str, int]] = {}
        self._decision = _Histogram(DECISION_BUCKETS_S)
        self._upstream: dict[str, _Histogram] = {}
        self._live = _LiveCollector()
        self._live.requests = self.request_counts
        self._live.decision = self._decision
        self._live.upstream = self._upstream
        self.registry.register(self._live)

    def observe_decision(self, seconds: float) -> None:
        """Record how long one decision took, in seconds."""
        self._decision.observe(seconds)

    def count_request(self, route: str, decision: str) -> None:
        """Count one answered request under (route, decision)."""
        by_decision = self.request_counts.get(route)
        if by_decision is None:
            by_decision = self.request_counts[route] = {}
        by_decision[decision] = by_decision.get(decision, 0) + 1

    def request_count(self, route: str, decision: str) -> int:
        """Requests counted so far under (route, decision)."""
        return self.request_counts.get(route, {}).get(decision, 0)

    def observe_upstream(self, upstream: str, seconds: float) -> None:
        """Record one upstream exchange's duration, in seconds."""
        histogram = self._upstream.get(upstream)
        if histogram is None:
            histogram = self._upstream[upstream] = _Histogram(UPSTREAM_BUCKETS_S)
        histogram.observe(seconds)

    def count_reload_error(self, file: str, error: BaseException | None = None) -> None:
        """Count one rejected reload of configuration `file` (its path as configured).
        `error` is accepted so this can be a reload-error callback as it is; the
        loader logs it, the metric only counts. Safe from any thread."""
        self.config_reload_errors_total(file, error)

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

    def watch_degraded(self, stale: Callable[[], bool], circuit_open: Callable[[], bool],
                       unledgered_units: Callable[[], int]) -> None:
        """Call at each scrape: `stale()` (the edge state is older than its staleness
        budget), `circuit_open()` (Redis failed in a row and no call has succeeded since) and
        `unledgered_units()` (hard-quota units leased from the last state while the
        lease ledger could not be asked)."""
        self._live.degraded = (stale, circuit_open, unledgered_units)

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


class _Histogram:
    # Non-cumulative bucket counts (the last one is +Inf) and the sum; made cumulative
    # at scrape time.
    # Bounds and counts are machine arrays (compiled, C loops over them).

    def __init__(self, bounds):
        self.bounds = array("d", bounds)
        self.counts = array("q", bytes(8 * (len(bounds) + 1)))
        self.sum = 0.0

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def observe(self, value):
        # The first bucket whose upper bound is >= value (bounds are few and ascending).
        size = len(self.bounds)
        index = 0
        while index < size and value > self.bounds[index]:
            index += 1
        self.counts[index] += 1
        self.sum += value

    def family_samples(self):
        cumulative = []
        running = 0
        bounds = len(self.bounds)
        for index in range(bounds + 1):
            running += self.counts[index]
            cumulative.append((repr(float(self.bounds[index])) if index < bounds else "+Inf", running))
        return cumulative, self.sum


class _LiveCollector(Collector):
    # Families computed from live objects at scrape time. A source that raises is
    # logged and its family left without samples, so one bad source never fails a scrape.

    def __init__(self):
        self.requests: dict[str, dict[str, int]] = {}
        self.decision: _Histogram | None = None
        self.upstream: dict[str, _Histogram] = {}
        self.meter_buffer = None
        self.pool_connections: PoolConnections | None = None
        self.edge_state_age_s: Callable[[], float] | None = None
        self.degraded = None

    def describe(self) -> Iterator[Metric]:
        return iter((*_request_families(), *_families()))

    def collect(self) -> Iterator[Metric]:
        requests, decision, upstream = _request_families()
        for route, by_decision in list(self.requests.items()):
            for outcome, count in list(by_decision.items()):
                requests.add_metric([route, outcome], count)
        if self.decision is not None:
            buckets, total = self.decision.family_samples()
            decision.add_metric([], buckets, total)
        for name, histogram in list(self.upstream.items()):
            buckets, total = histogram.family_samples()
            upstream.add_metric([name], buckets, total)
        yield from (requests, decision, upstream)
        depth, spooled, events, sink_errors, pools, age, stale, circuit_open, unledgered = _families()
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
        if self.degraded is not None:
            try:
                for family, read in zip((stale, circuit_open, unledgered), self.degraded):
                    family.add_metric([], int(read()))
            except Exception:
                log.exception("cannot read the degraded state for /metrics")
        yield from (depth, spooled, events, sink_errors, pools, age, stale, circuit_open, unledgered)


def _request_families():
    return (
        CounterMetricFamily("aforo_requests", "Requests answered, by route and decision "
                            "(decision core reason or proxy outcome).", labels=("route", "decision")),
        HistogramMetricFamily("aforo_decision_seconds", "Time spent in the decision core per request."),
        HistogramMetricFamily("aforo_upstream_seconds", "Time from forwarding a request to the upstream's "
                              "response head.", labels=("upstream",)),
    )


def _families():
    return (
        GaugeMetricFamily("aforo_meter_buffer_depth", "Meter events held in memory (each journaled to disk "
                          "within 100 ms), waiting for the sink or their spool chunk."),
        GaugeMetricFamily("aforo_meter_spooled_events", "Meter events on disk in the spool, waiting for the sink."),
        CounterMetricFamily("aforo_meter_events", "Meter events by outcome: recorded, flushed (delivered), "
                            "spilled (to the disk spool), lost (neither kept nor spooled).", labels=("outcome",)),
        CounterMetricFamily("aforo_meter_sink_errors", "Failed meter batch writes (each retried)."),
        GaugeMetricFamily("aforo_upstream_pool_connections", "Open upstream connections by state.",
                          labels=("upstream", "state")),
        GaugeMetricFamily("aforo_edge_state_age_seconds", "Seconds since the edge state was last refreshed."),
        GaugeMetricFamily("aforo_degraded", "1 while the edge state is older than the staleness budget "
                          "(routes with when_stale: closed answer 503)."),
        GaugeMetricFamily("aforo_redis_circuit_open", "1 from failures in a row to Redis until a call succeeds "
                          "again (calls refused, or tried again after the pause)."),
        CounterMetricFamily("aforo_quota_unledgered_units", "Hard-quota units a worker leased itself from its "
                            "last state while the lease ledger could not be asked."),
    )
