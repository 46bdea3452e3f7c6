# Where the proxy finds a customer by API key: the EdgeState role, and FileEdgeState,
# which serves a YAML file. A change is rebuilt into a complete new snapshot and
# swapped in with one assignment; on any error the old snapshot stays in force.
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from os import PathLike
from typing import Protocol

from config import ConfigError
from config.documents import content_version, decode_document
from config.edge_state_file import parse_edge_state_file
from decision_core import CustomerState, DecisionCoreError
from proxy.edge_snapshot import (
    EdgeSnapshot,
    build_snapshot,
    hash_api_key,
    snapshot_from_file,
)

__all__ = [
    "EdgeSnapshot",
    "EdgeState",
    "FileEdgeState",
    "build_snapshot",
    "hash_api_key",
    "snapshot_from_file",
]

log = logging.getLogger("aforo.edge_state")

# A file modified this close to when it was last read may have changed again within
# the file system's timestamp granularity without its size changing; until it is
# older than that, its content hash decides (as git treats "racily clean" files).
RACY_WINDOW_NS = 2_000_000_000

ReloadErrorCallback = Callable[[str, Exception], object]


class EdgeState(Protocol):
    """What the request path asks of edge state, whatever feeds it (a file today,
    the control plane later).

    `snapshot`: the EdgeSnapshot in force, replaced whole (one assignment) when the
    state changes; the request path looks customers up in it directly.
    `customer_for_key(api_key)`: the CustomerState for a plain API key (hashed
    inside), or None when the key is unknown. `version`: the version being served.
    `ready`: False until the first complete state has arrived; a proxy that is not
    ready should answer 503 rather than 401 to every key.
    """

    snapshot: EdgeSnapshot
    version: str
    ready: bool

    def customer_for_key(self, api_key: bytes) -> CustomerState | None: ...


class FileEdgeState:
    """Edge state served from a YAML file, reloaded when the file changes.

    `path`: the edge state file. `clock`: epoch seconds (time.time), the clock
    decide() gets; it stamps the throttle buckets of each new snapshot.
    `on_reload_error(path, error)`: called after each failed reload (e.g. to count
    it in a metric); it may also be set after construction.

    The first load happens here and raises ConfigError when the file cannot be read
    or is invalid. Later failures keep the last good snapshot; each is logged with
    file, line and path, counted in `reload_errors` and passed to `on_reload_error`.

    `age_s()` says how long ago the state served was last known to match the file
    (for an alert when a broken file has kept the proxy on old state for long).

    Usage counted by the proxy since the last load lives in the old snapshot's
    CustomerState objects and is NOT carried into a new one: the file is the source
    of truth, and the usage it lists replaces the local count. Throttle buckets
    start full again for the same reason.
    """

    def __init__(
        self,
        path: str | PathLike[str],
        clock: Callable[[], float] = time.time,
        on_reload_error: ReloadErrorCallback | None = None,
    ) -> None:
        self.path = str(path)
        self.clock = clock
        self.on_reload_error = on_reload_error
        self.reload_errors = 0
        self.reloads = 0
        self.ready = True
        # The file signature last read, and the last read failure: each is acted on
        # once, not on every check.
        self._seen: tuple[int, int, int] | None = None
        self._read_at_ns = 0
        self._read_failure: str | None = None
        try:
            self._seen = _file_signature(self.path)
            self._read_at_ns = time.time_ns()
            raw = _read(self.path)
        except OSError as err:
            raise _unreadable(self.path, err) from err
        self._content = hashlib.sha256(raw).digest()
        self.snapshot: EdgeSnapshot = self._build(raw)
        self._served_content = self._content
        self._confirmed_at = clock()

    @property
    def version(self) -> str:
        """The version of the snapshot in force (a hash of the file it was built from)."""
        return self.snapshot.version

    def customer_for_key(self, api_key: bytes) -> CustomerState | None:
        """The customer for a plain API key in the snapshot in force, or None."""
        return self.snapshot.customer_for_key(api_key)

    def age_s(self) -> float:
        """Seconds (on `clock`) since the state served was last known to match the
        file: it grows while the file is broken or unreadable, not while the file is
        merely unchanged and still being checked."""
        return max(0.0, self.clock() - self._confirmed_at)

    def reload_if_changed(self) -> bool:
        """Rebuild and swap in the snapshot if the file changed since it was last read.

        A change is noticed by modification time, size or inode (and a file changed
        within RACY_WINDOW_NS of its last read is read again), then confirmed by the
        content's hash, so a touch or a rewrite with the same bytes rebuilds nothing.
        Returns True when a new snapshot was swapped in, False when nothing changed or
        the reload failed (the old snapshot stays; see the class docstring). A broken
        file is reported once, not on every call, until it changes again.
        """
        raw = self._read_if_changed()
        if raw is None:
            return False
        content = hashlib.sha256(raw).digest()
        if content == self._served_content:  # touched, or back to the served bytes
            self._content = content
            self._confirmed_at = self.clock()
            return False
        if content == self._content:  # the same broken bytes, already reported
            return False
        self._content = content
        try:
            snapshot = self._build(raw)
        except ConfigError as err:
            self._failed(err)
            return False
        self.snapshot = snapshot
        self._served_content = content
        self._confirmed_at = self.clock()
        self.reloads += 1
        log.info("edge state %s: now serving version %s (%d customers)", self.path, snapshot.version, len(snapshot))
        return True

    async def watch(
        self,
        interval_s: float,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        """Every `interval_s` seconds, reload_if_changed(), forever (until cancelled).

        The rebuild runs in a worker thread so a large file does not stall the
        event loop; the swap is still one assignment, and `on_reload_error` is then
        called from that thread. An unexpected exception is logged and counted as a
        reload error, and watching goes on.
        """
        while True:
            await sleep(interval_s)
            try:
                await asyncio.to_thread(self.reload_if_changed)
            except Exception as err:  # noqa: BLE001 - the watcher must outlive any bug
                log.exception("edge state %s: reload failed unexpectedly", self.path)
                self._count(err)

    def _read_if_changed(self) -> bytes | None:
        # The file's bytes, or None when its signature says it is unchanged (then the
        # served state is confirmed current) or it cannot be read (reported once).
        try:
            signature = _file_signature(self.path)
            if signature == self._seen and signature[0] < self._read_at_ns - RACY_WINDOW_NS:
                if self._content == self._served_content:
                    self._confirmed_at = self.clock()
                return None
            read_at_ns = time.time_ns()
            raw = _read(self.path)
        except OSError as err:
            failure = _unreadable(self.path, err)
            self._seen = None
            if failure.message != self._read_failure:
                self._read_failure = failure.message
                self._failed(failure)
            return None
        self._seen, self._read_at_ns, self._read_failure = signature, read_at_ns, None
        return raw

    def _build(self, raw: bytes) -> EdgeSnapshot:
        # ConfigError for anything that keeps the file from becoming a snapshot.
        state = parse_edge_state_file(decode_document(raw, self.path), self.path)
        try:
            return snapshot_from_file(state, content_version(raw), self.clock())
        except DecisionCoreError as err:
            raise ConfigError(f"Cannot build the edge state: {err}", self.path) from err

    def _failed(self, error: ConfigError) -> None:
        for problem in error.errors:
            log.error("edge state reload failed, keeping version %s: %s", self.version, problem)
        self._count(error)

    def _count(self, error: Exception) -> None:
        self.reload_errors += 1
        if self.on_reload_error is not None:
            try:
                self.on_reload_error(self.path, error)
            except Exception:  # noqa: BLE001 - a failing callback must not stop reloads
                log.exception("edge state %s: on_reload_error callback failed", self.path)


def _file_signature(path: str) -> tuple[int, int, int]:
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def _unreadable(path: str, err: OSError) -> ConfigError:
    return ConfigError(f"Cannot read the edge state file: {err.strerror or err}", path)
