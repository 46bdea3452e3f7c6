# Running the proxy: one ProxyWorker per process (uvloop, its own SO_REUSEPORT
# listening socket, admin port, edge state watcher, meter buffer), and run_proxy()
# that starts `workers` of them and stops them all on SIGTERM / SIGINT: stop
# accepting, finish in-flight requests within the grace period, flush meter events.
import asyncio
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from pathlib import Path

import uvloop

from config import ConfigError
from config.logs import configure_logging
from config.proxy_settings import load_proxy_settings
from proxy.admin import start_admin_server
from proxy.app import ProxyApp
from proxy.connection import ClientConnection
from proxy.edge_state import FileEdgeState
from proxy.followed_edge_state import WAIT_FOR_CHANGES_S, FollowedEdgeState
from proxy.kept_edge_state import KEPT_STATE_DIR, EdgeStateKeeper
from proxy.metering import MeterBuffer, NdjsonFileSink
from proxy.metrics import new_proxy_metrics
from proxy.quota_leases import QuotaLeases
from proxy.throttle_leases import ThrottleLeases
from proxy.routing import Router

log = logging.getLogger("aforo.proxy")

# How long the meter buffer may take to hand its events to the sink at shutdown;
# what it cannot deliver in time goes to the disk spool and is replayed on start.
METER_CLOSE_TIMEOUT_S = 10.0


def listening_socket(host, port, reuse_port=True):
    """A bound, listening TCP socket; SO_REUSEPORT lets every worker bind the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def _per_worker(path, worker_index, workers):
    # Each worker writes its own meter file and spool so no two processes share a file.
    if workers == 1:
        return Path(path)
    path = Path(path)
    return path.with_name(f"{path.stem}.worker-{worker_index}{path.suffix}")


class ProxyWorker:
    """One worker: everything one process needs to serve traffic.

    start() binds (port 0 picks a free port: see `port`), loads the edge state (a bad
    first file raises ConfigError; a control plane that does not send it within
    `start_timeout_s` raises EdgeStateUnavailable), and begins serving; stop(grace_s)
    shuts down gracefully and returns once every meter event is with the sink or the
    spool.
    """

    def __init__(self, settings, *, worker_index=0, loop=None, clock=time.monotonic, wall_clock=time.time,
                 edge_state=None):
        self.settings = settings
        # An EdgeState to serve instead of the settings' file (the benchmark builds one).
        self.given_edge_state = edge_state
        self.worker_index = worker_index
        self.loop = loop or asyncio.get_event_loop()
        self.clock = clock
        self.wall_clock = wall_clock
        self.server = None
        self.admin = None
        self.app = None
        self.meter = None
        self.sink = None
        self.leases = None
        self.throttles = None
        self.edge_state = None
        self.buses = []
        self.meter_task = None
        self.watch_task = None
        self.port = None
        self.admin_port = None
        self.stopped = asyncio.Event()

    async def start(self):
        settings = self.settings
        workers = settings.workers
        metrics = new_proxy_metrics()
        metering = settings.metering
        sink = None
        buses = {}

        def bus(redis_url):
            # One connection (timeouts, circuit breaker) per Redis this worker talks to.
            if redis_url not in buses:
                from proxy.redis_bus import CircuitBreaker, RedisBus

                calls = settings.redis
                buses[redis_url] = RedisBus(redis_url, calls.timeout_s,
                                            CircuitBreaker(calls.breaker_failures, calls.breaker_open_s))
            return buses[redis_url]
        # The source answers at least this often while it is there, so a state older
        # than the staleness budget means it is not.
        wait_s = min(WAIT_FOR_CHANGES_S, settings.degraded.staleness_budget_s / 2)
        spool_dir = _per_worker(metering.spool_dir, self.worker_index, workers)

        def keeper():
            # A followed state is kept beside the worker's meter spool, for a start without the source.
            return EdgeStateKeeper(spool_dir / KEPT_STATE_DIR, self.wall_clock)
        if settings.control_plane is not None:
            # Imported only here: a proxy fed from a file never loads the HTTP client.
            from proxy.control_plane_link import (
                ControlPlaneClient,
                ControlPlaneLedger,
                ControlPlaneSink,
                ControlPlaneSource,
            )

            source = settings.control_plane
            token = os.environ.get(source.token_env)
            if not token:
                raise ConfigError(f"`control_plane`: set the control plane's admin token in ${source.token_env}")
            self.edge_state = self.given_edge_state or FollowedEdgeState(
                ControlPlaneSource(ControlPlaneClient(source.url, token)), clock=self.wall_clock,
                leased_quotas=True, wait_s=wait_s, keeper=keeper())
            start_timeout_s = source.start_timeout_s
            sink = ControlPlaneSink(ControlPlaneClient(source.url, token))
            ledger = ControlPlaneLedger(ControlPlaneClient(source.url, token))
        elif settings.edge_state.redis_url is not None:
            from proxy.edge_bus_source import EdgeBusSource
            from proxy.redis_quota_ledger import RedisQuotaLedger

            on_the_bus = bus(settings.edge_state.redis_url)
            self.edge_state = self.given_edge_state or FollowedEdgeState(
                EdgeBusSource(on_the_bus), clock=self.wall_clock, leased_quotas=True, wait_s=wait_s,
                keeper=keeper())
            start_timeout_s = settings.edge_state.start_timeout_s
            ledger = RedisQuotaLedger(on_the_bus)
        else:
            self.edge_state = self.given_edge_state or FileEdgeState(
                settings.edge_state.file, clock=self.wall_clock, on_reload_error=metrics.count_reload_error)
            ledger = None
        if metering.redis_url is not None:
            from proxy.meter_stream import RedisStreamSink

            sink = RedisStreamSink(bus(metering.redis_url))
        if ledger is not None:
            if not self.edge_state.ready:
                await self.edge_state.start(start_timeout_s)
            self.leases = QuotaLeases(ledger, self.edge_state, self.loop)
            self.throttles = ThrottleLeases(ledger, self.loop, wall_clock=self.wall_clock)
        self.buses = list(buses.values())
        sink = sink or NdjsonFileSink(_per_worker(metering.path, self.worker_index, workers))
        self.sink = sink
        self.meter = MeterBuffer(
            sink,
            capacity_events=metering.buffer_events,
            batch_events=metering.batch_events,
            flush_interval_s=metering.flush_interval_s,
            spool_dir=spool_dir,
            loop=self.loop,
            clock=self.clock,
        )
        router = Router.from_settings(settings.routes, settings.api_key_header)
        self.app = ProxyApp(settings, router, self.edge_state, self.meter, metrics, self.loop,
                            clock=self.clock, wall_clock=self.wall_clock)
        if self.leases is not None:
            self.app.leases = self.leases
            self.app.throttles = self.throttles
            self.leases.schedule_returns()
        metrics.watch(self.app, self.meter, self.edge_state)
        app, leases, buses = self.app, self.leases, self.buses
        metrics.watch_degraded(lambda: app.stale, lambda: any(bus.breaker.tripped for bus in buses),
                               lambda: 0 if leases is None else leases.unledgered_total)
        sock = listening_socket(settings.listen.host, settings.listen.port)
        self.port = sock.getsockname()[1]
        self.server = await self.loop.create_server(lambda: ClientConnection(self.app), sock=sock)
        admin = settings.admin_of(self.worker_index)
        self.admin = await start_admin_server(admin.host, admin.port, metrics, self.ready)
        self.admin_port = self.admin.sockets[0].getsockname()[1]
        self.meter_task = self.loop.create_task(self.meter.run())
        if hasattr(self.edge_state, "follow"):
            self.watch_task = self.loop.create_task(self.edge_state.follow())
        elif hasattr(self.edge_state, "watch"):
            self.watch_task = self.loop.create_task(self.edge_state.watch(settings.edge_state.reload_interval_s))
        self.app.schedule_sweeps()
        log.info("worker %d listening on %s:%d (admin %s:%d)", self.worker_index,
                 settings.listen.host, self.port, settings.admin.host, self.admin_port)

    def ready(self):
        """(ready, reason) for /readyz: serving, edge state loaded, not shutting down;
        the reason says when the edge state is stale (degraded)."""
        if self.app is None or self.app.closing:
            return False, "shutting down" if self.app is not None else "starting"
        if not self.edge_state.ready:
            return False, "edge state not loaded"
        if self.app.stale:
            # Still serving (from the last state, or 503 on routes that fail closed):
            # said, not taken out of the load balancer, which would take every proxy out.
            return True, (f"ready, degraded: edge state {self.edge_state.age_s():.0f} s old, beyond the "
                          f"staleness budget of {self.settings.degraded.staleness_budget_s:g} s")
        return True, "ready"

    async def stop(self, grace_s=None):
        """Stop accepting, let in-flight requests finish for up to `grace_s` seconds
        (settings.limits.shutdown_grace_s by default), close the rest, flush meters."""
        grace_s = self.settings.limits.shutdown_grace_s if grace_s is None else grace_s
        app = self.app
        self.server.close()
        app.begin_shutdown()
        deadline = self.clock() + grace_s
        while app.connections and self.clock() < deadline:
            await asyncio.sleep(0.05)
            app.begin_shutdown()
        for connection in list(app.connections):
            if connection.transport is not None:
                connection.transport.abort()
        app.stop_sweeps()
        for pool in app.pools.values():
            pool.close()
        if self.leases is not None:
            self.leases.stop()
            await self.leases.give_back()           # what this worker did not use, for the others
            await self.leases.ledger.close()
        if self.watch_task is not None:
            self.watch_task.cancel()
            await asyncio.gather(self.watch_task, return_exceptions=True)
        # close() delivers what is buffered and ends run(); nothing is cancelled mid-write.
        await self.meter.close(METER_CLOSE_TIMEOUT_S)
        await asyncio.gather(self.meter_task, return_exceptions=True)
        await self.sink.close()
        if hasattr(self.edge_state, "close"):
            await self.edge_state.close()
        for bus in self.buses:
            await bus.close()
        self.admin.close()
        await self.admin.wait_closed()
        self.stopped.set()


def run_worker(settings_path, worker_index=0, load=load_proxy_settings):
    """Run one worker process until SIGTERM or SIGINT; returns the exit status.
    `load(settings_path)` reads its ProxySettings (a module-level function: workers
    are spawned)."""
    configure_logging()
    uvloop.install()
    settings = load(settings_path)

    async def main():
        loop = asyncio.get_running_loop()
        worker = ProxyWorker(settings, worker_index=worker_index, loop=loop)
        await worker.start()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("worker %d shutting down", worker_index)
        await worker.stop()

    asyncio.run(main())
    return 0


# A worker that exits on its own is started again (same index: same admin port, meter
# file and spool, whose leftovers it replays). One that dies within QUICK_EXIT_S of
# starting waits before the next try, RESTART_DELAY_S doubling up to RESTART_DELAY_MAX_S;
# after GIVE_UP_AFTER quick exits in a row the proxy stops with status 1 (a worker that
# cannot start is a configuration or environment problem, not a crash to ride out).
QUICK_EXIT_S = 10.0
RESTART_DELAY_S = 0.25
RESTART_DELAY_MAX_S = 30.0
GIVE_UP_AFTER = 5
_SUPERVISE_TICK_S = 0.5


def _status(exitcode):
    # A worker killed by a signal has a negative exit code: reported as a shell does
    # (128 + signal number), never as success.
    exitcode = exitcode or 0
    return 128 - exitcode if exitcode < 0 else exitcode


class Supervisor:
    """The parent of `workers` worker processes: starts them, replaces any that exits
    while the proxy is running, and on SIGTERM / SIGINT tells every worker to shut down
    gracefully and waits for them."""

    def __init__(self, settings_path, workers, load=load_proxy_settings):
        self.settings_path = settings_path
        self.load = load
        self.context = multiprocessing.get_context("spawn")
        self.children = [None] * workers
        self.started_at = [0.0] * workers
        self.quick_exits = [0] * workers
        self.restart_at = {}                # worker index -> monotonic time of its restart
        self.stopping = False
        self.gave_up = False

    def run(self):
        for index in range(len(self.children)):
            self._start(index)
        signal.signal(signal.SIGTERM, self._stop_all)
        signal.signal(signal.SIGINT, self._stop_all)
        while True:
            running = [child for child in self.children if child.exitcode is None]
            if self.stopping and not running:
                break
            multiprocessing.connection.wait([child.sentinel for child in running], _SUPERVISE_TICK_S)
            if not self.stopping:
                self._replace_exited()
        if self.gave_up:
            return 1
        return max(_status(child.exitcode) for child in self.children)

    def _start(self, index):
        child = self.context.Process(target=run_worker, args=(self.settings_path, index, self.load),
                                     name=f"aforo-worker-{index}")
        child.start()
        self.children[index] = child
        self.started_at[index] = time.monotonic()
        if self.stopping:                       # a signal came while it was starting
            self._stop_all(None, None)

    def _replace_exited(self):
        now = time.monotonic()
        for index, child in enumerate(self.children):
            if child.exitcode is None or index in self.restart_at:
                continue
            quick = now - self.started_at[index] < QUICK_EXIT_S
            self.quick_exits[index] = self.quick_exits[index] + 1 if quick else 0
            if self.quick_exits[index] >= GIVE_UP_AFTER:
                log.error("worker %d exited with status %d %d times in a row within %.0f s of starting; "
                          "stopping the proxy", index, _status(child.exitcode), GIVE_UP_AFTER, QUICK_EXIT_S)
                self.gave_up = True
                self._stop_all(None, None)
                return
            delay = RESTART_DELAY_S * 2 ** (self.quick_exits[index] - 1) if quick else 0.0
            delay = min(delay, RESTART_DELAY_MAX_S)
            log.error("worker %d (pid %d) exited with status %d; starting a new one in %.1f s",
                      index, child.pid, _status(child.exitcode), delay)
            self.restart_at[index] = now + delay
        for index, when in list(self.restart_at.items()):
            if now >= when and not self.stopping:
                del self.restart_at[index]
                self._start(index)

    def stop(self):
        """Tell every worker to shut down gracefully (safe from any thread)."""
        self._stop_all(None, None)

    def _stop_all(self, _signum, _frame):
        # Runs as a signal handler too: nothing may raise here, or the workers after it
        # are never told.
        self.stopping = True
        self.restart_at.clear()
        for child in self.children:
            if child is not None and child.exitcode is None:
                try:
                    os.kill(child.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass


def run_proxy(settings_path, redis_url=None):
    """`aforo proxy`: run settings.workers workers sharing the listen port (more than
    one: under a supervisor that replaces a worker that dies); on SIGTERM / SIGINT every
    worker shuts down gracefully. With `redis_url` the proxy runs on that Redis edge
    bus (config.proxy_settings.on_the_bus). Returns the exit status."""
    load = load_proxy_settings if redis_url is None else functools.partial(load_proxy_settings, redis_url=redis_url)
    settings = load(settings_path)
    if settings.workers == 1:
        return run_worker(settings_path, 0, load)
    # A bad edge state file is reported here, once, rather than by every worker.
    if settings.edge_state is not None and settings.edge_state.file is not None:
        FileEdgeState(settings.edge_state.file)
    return Supervisor(settings_path, settings.workers, load).run()
