# Running the control plane: its store (migrated at start) and its REST API until
# SIGTERM / SIGINT. A store without any admin token gets one at first start, printed
# once (only its sha256 is kept).
from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time

from aiohttp import web

from config.guards import watch_guards
from control_plane.api import ControlPlaneMetrics, create_admin_token, create_app
from control_plane.store import open_store

log = logging.getLogger("aforo.control_plane")


GUARD_RELOAD_INTERVAL_S = 2.0
GC_YOUNG_THRESHOLD = 10_000


async def serve_control_plane(database: str, host: str, port: int, guards_path: str | None = None) -> None:
    """Serve the API for the store at `database` on host:port (0: a free port, printed)
    until SIGTERM / SIGINT. With `guards_path`, the guard file is loaded (a bad first
    file raises ConfigError) and checked for changes every GUARD_RELOAD_INTERVAL_S."""
    metrics = ControlPlaneMetrics()
    guards = None if guards_path is None else watch_guards(guards_path, on_reload_error=metrics.count_reload_error)
    store = await open_store(database)
    watching = None
    try:
        if guards is not None:
            watching = asyncio.create_task(guards.watch(GUARD_RELOAD_INTERVAL_S))
        if await store.admin_tokens_count() == 0:
            token = await create_admin_token(store, "first", time.time())
            print(f"admin token (shown once, keep it): {token}", flush=True)
        runner = web.AppRunner(create_app(store, guards=guards, metrics=metrics), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
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
        print(f"control plane API on http://{host}:{port} (OpenAPI at /openapi.json)", flush=True)
        await stop.wait()
        log.info("control plane shutting down")
        await runner.cleanup()
    finally:
        if watching is not None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        await store.close()
