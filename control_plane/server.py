# Running the control plane from its settings: the store (migrated at start), the
# guard file (watched), the webhook sender and the REST API. start_control_plane
# starts them inside any asyncio program and returns a handle to stop them;
# serve_control_plane is the command's wrapper, running until SIGTERM / SIGINT. A
# store without any admin token gets one at first start, shown once (only its sha256
# is kept).
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping

import redis.asyncio as redis
import uvloop
from aiohttp import web

from config.control_plane_settings import ControlPlaneSettings, signing_secrets
from config.guards import watch_guards
from control_plane.api import (
    FEED,
    INTAKE,
    RATER,
    ControlPlaneMetrics,
    create_app,
)
from control_plane.edge_bus import BusQuotaLedger, EdgeBusPublisher
from control_plane.meter_stream import MeterStreamConsumer
from control_plane.store import Store, open_store
from control_plane.tokens import command_author, create_token
from control_plane.webhooks import WebhookSender

log = logging.getLogger("aforo.control_plane")

GUARD_RELOAD_INTERVAL_S = 2.0
GC_YOUNG_THRESHOLD = 10_000
REDIS_TIMEOUT_S = 2.0


class RunningControlPlane:
    """A started control plane: `host` and `port` it listens on (the bound port when
    the settings asked for 0), `url`, its `store`, `webhooks` (the WebhookSender),
    `metrics`, and `admin_token`, the first admin token when this start created
    one (None otherwise). `await stop()` stops serving, delivering and watching,
    and closes the store; calling it again does nothing."""

    def __init__(self, host: str, port: int, store: Store, runner: web.AppRunner, tasks: list[asyncio.Task],
                 webhooks: WebhookSender, metrics: ControlPlaneMetrics, admin_token: str | None) -> None:
        self.host = host
        self.port = port
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        self.store = store
        self.webhooks = webhooks
        self.metrics = metrics
        self.admin_token = admin_token
        self._runner = runner
        self._tasks = tasks
        self._stopped = False

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        # The background work first: the runner's cleanup wakes the edge feed's
        # waiters, and a publisher still running would read the store as it closes.
        await _cancel(self._tasks)
        await self._runner.cleanup()
        await self.store.close()


async def start_control_plane(settings: ControlPlaneSettings, *, environ: Mapping[str, str] | None = None,
                              clock: Callable[[], float] = time.time) -> RunningControlPlane:
    """Start the control plane `settings` describe, in the running event loop, and
    return once it serves. `environ` (default os.environ) holds the channels'
    signing secrets; `clock` gives epoch seconds (ingest, guards and webhooks).

    Raises ConfigError for an unset secret or a bad first guard file, StoreError
    when the store cannot be opened, OSError when the address cannot be bound;
    nothing is left running then."""
    secrets = signing_secrets(settings, environ)
    metrics = ControlPlaneMetrics()
    guards = None
    if settings.guards is not None:
        guards = watch_guards(settings.guards, on_reload_error=metrics.count_reload_error)
        _warn_of_unknown_channels(guards.value, settings)
    store = await open_store(settings.database)
    tasks: list[asyncio.Task] = []
    runner = None
    try:
        webhooks = WebhookSender(store, settings.notify, secrets, settings.webhooks, clock=clock,
                                 metrics=metrics.webhooks)
        app = create_app(store, clock, guards=guards, metrics=metrics, webhooks=webhooks,
                         reporting=settings.reporting)
        feed = app[FEED]
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, settings.listen.host, settings.listen.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        admin_token = None
        # Only once serving: a start that fails must not use up the one showing of the token.
        if await store.admin_tokens_count() == 0:
            _, admin_token = await create_token(store, "first", clock(), author=command_author("aforo control-plane (first start)"))
        tasks.append(asyncio.create_task(webhooks.run(), name="aforo webhooks"))
        tasks.append(asyncio.create_task(feed.watch(clock), name="aforo edge feed"))
        if settings.redis_url is not None:
            bus = redis.from_url(settings.redis_url, socket_timeout=REDIS_TIMEOUT_S,
                                 socket_connect_timeout=REDIS_TIMEOUT_S)
            # Host and pid alone can repeat: containers sharing the host's network (and
            # so its hostname) each run the control plane as pid 1, and two consumers
            # of one name would read each other's pending entries.
            consumer_name = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"
            consumer = MeterStreamConsumer(bus, app[INTAKE], consumer_name,
                                           claim_idle_ms=int(settings.meter_claim_idle_s * 1000),
                                           block_ms=int(REDIS_TIMEOUT_S * 500),
                                           count_dead_letters=metrics.dead_letters.inc)
            publisher = EdgeBusPublisher(bus, feed, clock, resync_interval_s=settings.edge_resync_interval_s)
            ledger = app[INTAKE].ledger = BusQuotaLedger(bus)
            tasks.append(asyncio.create_task(_on_the_bus(bus, consumer.run(), publisher.run(),
                                                         ledger.keep_rebuilt(store, app[RATER], clock)),
                                             name="aforo edge bus"))
        if guards is not None:
            tasks.append(asyncio.create_task(guards.watch(GUARD_RELOAD_INTERVAL_S), name="aforo guards"))
            tasks.append(asyncio.create_task(app[INTAKE].judge_on_new_guards(GUARD_RELOAD_INTERVAL_S),
                                             name="aforo guard judging"))
    except BaseException:
        if runner is not None:
            await runner.cleanup()
        await _cancel(tasks)
        await store.close()
        raise
    return RunningControlPlane(settings.listen.host, port, store, runner, tasks, webhooks, metrics, admin_token)


async def serve_control_plane(settings: ControlPlaneSettings) -> None:
    """Run the control plane until SIGTERM / SIGINT, printing the first admin token
    (when this start created it) and the address it serves. Raises as
    start_control_plane does."""
    control_plane = await start_control_plane(settings)
    try:
        if control_plane.admin_token is not None:
            print(f"admin token (shown once, keep it): {control_plane.admin_token}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        # What startup built lives as long as the process: kept out of the cyclic
        # collector's full passes, which would otherwise walk it again and again as
        # ingest's short-lived objects come and go. And a batch makes thousands of
        # objects that live only while it is handled: collecting the youngest every
        # GC_YOUNG_THRESHOLD allocations (not 700) lets them die first instead of being
        # walked, promoted and walked again (about a tenth of ingest's CPU otherwise).
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        print(f"control plane API on {control_plane.url} (OpenAPI at /openapi.json)", flush=True)
        await stop.wait()
        log.info("control plane shutting down")
    finally:
        await control_plane.stop()


def run_control_plane(settings: ControlPlaneSettings) -> None:
    """serve_control_plane() on uvloop, as the proxy runs (aiohttp and asyncpg do less
    work per request on it); returns when it stops."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve_control_plane(settings))


def _warn_of_unknown_channels(guard_set, settings: ControlPlaneSettings) -> None:
    # A guard may name a channel the settings lack: its webhooks are kept as failed,
    # and said here at start, once per channel.
    named = {channel for _, channel in guard_set.channels()}
    for name in sorted(named - set(settings.notify)):
        log.warning("guards in %s notify `%s`, which is not a notify channel in the control plane settings: "
                    "its webhooks will fail", guard_set.source, name)


async def _on_the_bus(bus: redis.Redis, *work) -> None:
    # The meter stream read, the edge state published and the quota ledgers kept
    # rebuilt, until cancelled; then the bus's connections are closed.
    try:
        await asyncio.gather(*work)
    finally:
        await bus.aclose()


async def _cancel(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
