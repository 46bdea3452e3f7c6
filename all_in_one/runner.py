# `aforo up`: the control plane and the proxy workers together, from one settings
# file (config.up_settings), on one machine with no external service (SQLite by
# default). The parent prepares the store (migrations, the catalog, a token for the
# proxies), starts the control plane in a process of its own, waits until it answers,
# then runs the proxy workers under the proxy's supervisor.
#
# Ctrl-C (SIGINT) or SIGTERM stops the proxies first, which hand every meter event to
# the control plane as they stop, and the control plane last. The control plane runs
# in its own process group, so a Ctrl-C in the terminal reaches it only through the
# parent, after the proxies are done.
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from config.catalog_file import load_catalog_file
from config.check import check_file
from config.up_settings import UpSettings, load_up_settings, up_proxy_settings
from control_plane.catalog import apply_catalog, describe_apply
from control_plane.store import open_store
from control_plane.tokens import PROXY, command_author, create_token

log = logging.getLogger("aforo.up")

PROXY_TOKEN_NAME = "proxies of aforo up"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
_POLL_S = 0.1


def run_up(settings_path: str, *, announce: Callable[[str], None] = print,
           on_ready: Callable[[UpSettings, str], None] | None = None, extra_children=()) -> int:
    """Run everything `settings_path` describes until SIGINT / SIGTERM; returns the
    exit status (1 when the control plane cannot start or dies). `on_ready(settings,
    admin_token)` runs in a thread once the control plane and the proxies answer
    (the demo drives traffic from there); `extra_children` are (name, target, args)
    processes started before the proxies and stopped after them (the demo upstream).
    Raises ConfigError for invalid settings or any file they name (all checked
    before the store is migrated, the catalog applied or a token made) and
    StoreError when the store cannot be prepared, before anything is started."""
    from proxy.server import Supervisor

    check_file(settings_path, "all-in-one")      # every file it names, before the store is touched
    settings = load_up_settings(settings_path)
    _check_addresses_free(settings)
    admin_token, proxy_token = asyncio.run(_prepare_store(settings, announce))
    os.environ[settings.proxy.control_plane.token_env] = proxy_token
    context = multiprocessing.get_context("spawn")
    control_plane = context.Process(target=_run_control_plane, args=(settings_path,), name="aforo-control-plane")
    control_plane.start()
    children = []
    supervisor = None
    try:
        if not _wait_until_answering(settings.control_plane_url + "/healthz", control_plane):
            log.error("the control plane did not start (see its log above)")
            return 1
        for name, target, args in extra_children:
            child = context.Process(target=target, args=args, name=name)
            child.start()
            children.append(child)
        supervisor = Supervisor(settings_path, settings.proxy.workers, load=up_proxy_settings)
        failed = threading.Event()
        threading.Thread(target=_watch_control_plane, args=(control_plane, supervisor, failed), daemon=True).start()
        announce(f"proxy on http://{settings.proxy.listen} ({settings.proxy.workers} "
                 f"worker{'s' if settings.proxy.workers > 1 else ''}); health and metrics on "
                 f"http://{settings.proxy.admin}")
        announce("Ctrl-C stops everything (proxies first, every meter event kept)")
        if on_ready is not None:
            threading.Thread(target=_when_ready, args=(settings, admin_token, on_ready), daemon=True).start()
        status = supervisor.run()
        return 1 if failed.is_set() else status
    finally:
        for child in [*children, control_plane]:
            _stop(child)
        asyncio.run(_revoke_proxy_token(settings))


def _check_addresses_free(settings: UpSettings) -> None:
    # Every address `aforo up` will listen on (the control plane, the proxy, each
    # worker's admin port) can be bound now; OSError naming the first that cannot.
    proxy = settings.proxy
    addresses = [("the control plane", settings.control_plane.listen), ("the proxy", proxy.listen),
                 *((f"worker {index}'s health and metrics", proxy.admin_of(index)) for index in range(proxy.workers))]
    for what, address in addresses:
        if address.port == 0:
            continue
        try:
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((address.host, address.port))
        except OSError as err:
            raise OSError(f"{what} cannot listen on {address}: {err.strerror}") from err


async def _prepare_store(settings: UpSettings, announce) -> tuple[str | None, str]:
    # Migrations, the catalog, the first admin token when there is none (shown once)
    # and a fresh proxy-scoped token for this run's proxies (earlier runs' revoked).
    store = await open_store(settings.control_plane.database)
    author = command_author("aforo up")
    try:
        if settings.catalog is not None:
            written = await apply_catalog(store, load_catalog_file(settings.catalog), settings.catalog,
                                          author=author)
            announce(f"catalog {settings.catalog}: " + "; ".join(describe_apply(written)))
        admin_token = None
        if await store.admin_tokens_count() == 0:
            _, admin_token = await create_token(store, "first", time.time(), author=author)
            announce(f"admin token (shown once, keep it): {admin_token}")
        await store.revoke_tokens_named(PROXY_TOKEN_NAME, time.time(), author=author)
        _, proxy_token = await create_token(store, PROXY_TOKEN_NAME, time.time(), PROXY, author=author)
        return admin_token, proxy_token
    finally:
        await store.close()


async def _revoke_proxy_token(settings: UpSettings) -> None:
    store = await open_store(settings.control_plane.database)
    try:
        await store.revoke_tokens_named(PROXY_TOKEN_NAME, time.time(), author=command_author("aforo up"))
    finally:
        await store.close()


def _run_control_plane(settings_path: str) -> None:
    # The control plane's process: its own process group (a terminal's Ctrl-C goes
    # to the parent, which stops the proxies before this).
    os.setpgrp()
    from config.logs import configure_logging
    from control_plane.server import run_control_plane

    configure_logging()
    try:
        run_control_plane(load_up_settings(settings_path).control_plane)
    except OSError as err:
        log.error("the control plane cannot start: %s", err)
        raise SystemExit(1) from None


def _wait_until_answering(url: str, process=None, timeout_s: float = START_TIMEOUT_S) -> bool:
    """Whether `url` answers 2xx within `timeout_s` (False at once if `process` exits)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.exitcode is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status // 100 == 2:
                    return True
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(_POLL_S)
    return False


def _watch_control_plane(control_plane, supervisor, failed) -> None:
    control_plane.join()
    if not supervisor.stopping:
        log.error("the control plane exited with status %s; stopping the proxies", control_plane.exitcode)
        failed.set()
        supervisor.stop()


def _when_ready(settings: UpSettings, admin_token, on_ready) -> None:
    proxy = settings.proxy
    workers_ready = proxy.admin.port == 0 or all(_wait_until_answering(f"http://{proxy.admin_of(index)}/readyz")
                                                 for index in range(proxy.workers))
    if workers_ready:
        on_ready(settings, admin_token)
    else:
        log.error("the proxy workers did not become ready")


def _stop(process, timeout_s: float = STOP_TIMEOUT_S) -> None:
    if process.exitcode is None and process.pid is not None:
        try:
            os.kill(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        process.join(timeout_s)
        if process.exitcode is None:
            log.error("%s did not stop within %.0f s; killing it", process.name, timeout_s)
            process.kill()
            process.join()
