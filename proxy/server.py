# Running the proxy: one ProxyWorker per process (uvloop, its own SO_REUSEPORT
# listening socket, admin port, edge state watcher, meter buffer), and run_proxy()
# that starts `workers` of them and stops them all on SIGTERM / SIGINT: stop
# accepting, finish in-flight requests within the grace period, flush meter events.
import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import time
from pathlib import Path

import uvloop

from config.proxy_settings import load_proxy_settings
from proxy.admin import start_admin_server
from proxy.app import ProxyApp
from proxy.connection import ClientConnection
from proxy.edge_state import FileEdgeState
from proxy.metering import MeterBuffer, NdjsonFileSink
from proxy.metrics import new_proxy_metrics
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
    first file raises ConfigError), and begins serving; stop(grace_s) shuts down
    gracefully and returns once every meter event is with the sink or the spool.
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
        self.edge_state = None
        self.meter_task = None
        self.watch_task = None
        self.port = None
        self.admin_port = None
        self.stopped = asyncio.Event()

    async def start(self):
        settings = self.settings
        workers = settings.workers
        metrics = new_proxy_metrics()
        self.edge_state = self.given_edge_state or FileEdgeState(
            settings.edge_state.file, clock=self.wall_clock, on_reload_error=metrics.count_reload_error)
        metering = settings.metering
        sink = NdjsonFileSink(_per_worker(metering.path, self.worker_index, workers))
        self.meter = MeterBuffer(
            sink,
            capacity_events=metering.buffer_events,
            batch_events=metering.batch_events,
            flush_interval_s=metering.flush_interval_s,
            spool_dir=_per_worker(metering.spool_dir, self.worker_index, workers),
            loop=self.loop,
            clock=self.clock,
        )
        router = Router.from_settings(settings.routes)
        self.app = ProxyApp(settings, router, self.edge_state, self.meter, metrics, self.loop,
                            clock=self.clock, wall_clock=self.wall_clock)
        metrics.watch(self.app, self.meter, self.edge_state)
        sock = listening_socket(settings.listen.host, settings.listen.port)
        self.port = sock.getsockname()[1]
        self.server = await self.loop.create_server(lambda: ClientConnection(self.app), sock=sock)
        admin_port = settings.admin.port + self.worker_index if settings.admin.port else 0
        self.admin = await start_admin_server(settings.admin.host, admin_port, metrics, self.ready)
        self.admin_port = self.admin.sockets[0].getsockname()[1]
        self.meter_task = self.loop.create_task(self.meter.run())
        if hasattr(self.edge_state, "watch"):
            self.watch_task = self.loop.create_task(self.edge_state.watch(settings.edge_state.reload_interval_s))
        self.app.schedule_sweeps()
        log.info("worker %d listening on %s:%d (admin %s:%d)", self.worker_index,
                 settings.listen.host, self.port, settings.admin.host, self.admin_port)

    def ready(self):
        """(ready, reason) for /readyz: serving, edge state loaded, not shutting down."""
        if self.app is None or self.app.closing:
            return False, "shutting down" if self.app is not None else "starting"
        if not self.edge_state.ready:
            return False, "edge state not loaded"
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
        if self.watch_task is not None:
            self.watch_task.cancel()
            await asyncio.gather(self.watch_task, return_exceptions=True)
        # close() delivers what is buffered and ends run(); nothing is cancelled mid-write.
        await self.meter.close(METER_CLOSE_TIMEOUT_S)
        await asyncio.gather(self.meter_task, return_exceptions=True)
        self.admin.close()
        await self.admin.wait_closed()
        self.stopped.set()


def run_worker(settings_path, worker_index=0):
    """Run one worker process until SIGTERM or SIGINT; returns the exit status."""
    uvloop.install()
    settings = load_proxy_settings(settings_path)

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


def run_proxy(settings_path):
    """`aforo proxy`: run settings.workers workers sharing the listening port; on
    SIGTERM / SIGINT every worker shuts down gracefully. Returns the exit status."""
    settings = load_proxy_settings(settings_path)
    if settings.workers == 1:
        return run_worker(settings_path, 0)
    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=run_worker, args=(settings_path, index), name=f"aforo-worker-{index}")
                for index in range(settings.workers)]
    for child in children:
        child.start()

    def forward(signum, _frame):
        # Runs inside join(): a worker join() has reaped but not yet recorded is gone
        # already. Nothing may raise here, or the workers after it are never told.
        for child in children:
            if child.exitcode is None:
                try:
                    os.kill(child.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()
    # A worker killed by a signal has a negative exit code: report it as a shell does
    # (128 + signal number), never as success.
    codes = [child.exitcode or 0 for child in children]
    return max((128 - code if code < 0 else code) for code in codes)
