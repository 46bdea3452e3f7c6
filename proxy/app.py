# What every connection of one proxy worker shares: limits, router, edge state,
# upstream pools, the meter buffer and metrics, plus the clocks. A connection's
# timeouts (header, body, idle, upstream read) are filed in `deadlines`, and one loop
# timer wakes the worker when the earliest is due, so they fire on time without a
# timer handle per request; upstream connect timeouts and the edge state's staleness
# are checked by a sweep every SWEEP_INTERVAL_S. Tests call sweep() with a fake clock.
import ipaddress
import logging
import time

import cython

from config.proxy_settings import upstream_headers, upstream_tls_context
from proxy.deadlines import Deadlines
from proxy.headers import starts_ignoring_case
from proxy.upstream import UpstreamPool

log = logging.getLogger("aforo.proxy")

SWEEP_INTERVAL_S = 0.1
# Whether the edge state is stale is asked this often (it changes in seconds).
STALENESS_CHECK_S = 1.0
_NEVER = float("inf")
_BEARER = b"bearer "


class ProxyApp:
    """Shared state of one worker. `clock` is monotonic seconds (timeouts);
    `wall_clock` is epoch seconds (billing periods, meter timestamps)."""

    def __init__(self, settings, router, edge_state, meter, metrics, loop,
                 clock=time.monotonic, wall_clock=time.time):
        self.settings = settings
        self.limits = settings.limits
        # The per-request limits as C numbers (read for every header).
        self.max_request_line_bytes = settings.limits.max_request_line_bytes
        self.max_header_bytes = settings.limits.max_header_bytes
        self.max_headers = settings.limits.max_headers
        self.max_body_bytes = settings.limits.max_body_bytes
        self.header_timeout_s = settings.limits.header_timeout_s
        self.body_timeout_s = settings.limits.body_timeout_s
        self.body_s_per_byte = 1.0 / settings.limits.min_body_bytes_per_s
        self.buffered_body_bytes = settings.limits.buffered_body_bytes
        self.router = router
        self.edge_state = edge_state
        self.meter_buffer = meter
        self.metrics = metrics
        self.loop = loop
        self.clock = clock
        self.wall_clock = wall_clock
        # With the system clocks, compiled code reads them directly (no Python call).
        self.system_clock = clock is time.monotonic
        self.system_wall_clock = wall_clock is time.time
        self.shadow_to_client = settings.shadow_report == "client_and_upstream"
        # upstream name -> (the field names it sets, those fields in wire form): the
        # upstream's values (a provider key, from the environment; its own Host)
        # replace the client's.
        set_fields = upstream_headers(settings)
        for name, upstream in settings.upstreams.items():
            if upstream.sends_own_host:
                set_fields[name] = ((b"host", upstream.url.authority.encode()), *set_fields.get(name, ()))
        self.upstream_fields = {
            name: (frozenset(field for field, _ in fields), b"".join(b"%s: %s\r\n" % field for field in fields))
            for name, fields in set_fields.items()
        }
        self.trusted_networks = tuple(ipaddress.ip_network(cidr) for cidr in settings.trusted_proxies)
        self.pools = {}
        for name, upstream in settings.upstreams.items():
            self.pools[name] = UpstreamPool(
                name, upstream.url.host, upstream.url.port, upstream.pool_size,
                upstream.connect_timeout_s, upstream.read_timeout_s, loop, clock,
                upstream_tls_context(name, upstream) if upstream.url.tls else None,
            )
        self.connections = set()
        self.deadlines = Deadlines(self._wake_at)
        self.wake_timer = None        # the loop timer for the earliest filed deadline
        self.wake_timer_at = _NEVER
        self.closing = False
        self.sweeper = None           # the timer of the next sweep, while sweeps are scheduled
        self.leases = None            # QuotaLeases when hard quotas are leased (control plane or Redis)
        self.throttles = None         # ThrottleLeases then too: level-2 throttles shared by every worker
        # Degraded mode: a followed state older than the budget is stale, and routes
        # that fail closed refuse while it is (checked at each sweep, not per request).
        self.edge_state_age = getattr(edge_state, "age_s", None)
        self.staleness_budget_s = settings.degraded.staleness_budget_s
        self.stale_retry_after = b"%d" % settings.degraded.retry_after_s
        self.stale = False
        self.staleness_checked_at = float("-inf")

    # -- connections ----------------------------------------------------------------
    def is_trusted(self, ip):
        """Whether a peer address is a configured trusted proxy (whose X-Forwarded-*
        values are kept)."""
        if not self.trusted_networks:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self.trusted_networks)

    def admit_connection(self, connection):
        """Register a new client connection; False when max_connections is reached."""
        if len(self.connections) >= self.limits.max_connections or self.closing:
            return False
        self.connections.add(connection)
        return True

    def forget_connection(self, connection):
        self.connections.discard(connection)

    def api_key(self, raw, bearer):
        """The API key from the value `raw` of a route's key field: `Bearer <key>`
        when `bearer` (Authorization), the whole value otherwise, without
        surrounding whitespace; None when absent or malformed."""
        if raw is None:
            return None
        start = 0
        end = len(raw)
        if bearer:
            if end < len(_BEARER) or not starts_ignoring_case(raw, _BEARER):
                return None
            start = len(_BEARER)
        while start < end and raw[start] in b" \t\n\r\x0b\x0c":
            start += 1
        while end > start and raw[end - 1] in b" \t\n\r\x0b\x0c":
            end -= 1
        if start == end:
            return None
        return raw if start == 0 and end == len(raw) else raw[start:end]

    # -- accounting -------------------------------------------------------------------
    def count_refusal(self, status):
        """Count a request refused as malformed (4xx) or failed in the proxy (5xx)."""
        self.metrics.count_request("", "bad_request" if status < 500 else f"error_{status}")

    def log_error(self, message, error):
        log.error("%s: %r", message, error, exc_info=error)

    # -- time ----------------------------------------------------------------------------
    def now(self):
        """`clock()`: monotonic seconds."""
        if cython.compiled and self.system_clock:      # C names from app.pxd
            clock_gettime(CLOCK_MONOTONIC, cython.address(reading))  # noqa: F821
            return reading.tv_sec + reading.tv_nsec * 1e-9  # noqa: F821
        return self.clock()

    def wall_now(self):
        """`wall_clock()`: epoch seconds."""
        if cython.compiled and self.system_wall_clock:
            clock_gettime(CLOCK_REALTIME, cython.address(reading))  # noqa: F821
            return reading.tv_sec + reading.tv_nsec * 1e-9  # noqa: F821
        return self.wall_clock()

    def sweep(self, now=None):
        """Enforce header, body, idle, connect and read timeouts due at `now` (default:
        clock()), and say whether a followed edge state is stale (older than its budget)."""
        now = self.clock() if now is None else now
        if self.edge_state_age is not None and now - self.staleness_checked_at >= STALENESS_CHECK_S:
            self.staleness_checked_at = now
            age_s = self.edge_state_age()
            stale = age_s > self.staleness_budget_s
            if stale != self.stale:
                if stale:
                    log.warning("edge state is %.0f s old, beyond the staleness budget of %g s: degraded (routes "
                                "with when_stale: closed answer 503)", age_s, self.staleness_budget_s)
                else:
                    log.warning("edge state is fresh again: no longer degraded")
                self.stale = stale
        self.deadlines.check(now)
        for pool in self.pools.values():
            pool.sweep(now)

    def _wake_at(self, at):
        # The earliest connection deadline is now `at`: the loop wakes then.
        if at >= self.wake_timer_at or self.sweeper is None:
            return
        if self.wake_timer is not None:
            self.wake_timer.cancel()
        self.wake_timer_at = at
        delay = at - self.now()
        self.wake_timer = self.loop.call_later(delay if delay > 0.0 else 0.0, self._woken)

    def _woken(self):
        self.wake_timer = None
        self.wake_timer_at = _NEVER
        self.deadlines.check(self.now())
        self._wake_at(self.deadlines.next_at)

    def schedule_sweeps(self):
        """Sweep every SWEEP_INTERVAL_S on the loop until stop_sweeps()."""
        def tick():
            self.sweep()
            self.sweeper = self.loop.call_later(SWEEP_INTERVAL_S, tick)
        self.sweeper = self.loop.call_later(SWEEP_INTERVAL_S, tick)
        self._wake_at(self.deadlines.next_at)

    def stop_sweeps(self):
        """Cancel the scheduled sweeps (the worker has stopped): nothing on the loop
        keeps this app alive any more."""
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        if self.wake_timer is not None:
            self.wake_timer.cancel()
            self.wake_timer = None
            self.wake_timer_at = _NEVER

    def begin_shutdown(self):
        """Stop keeping connections alive: idle ones close now, busy ones after their
        current response."""
        self.closing = True
        for connection in list(self.connections):
            connection.close_when_idle()
