# Where the proxy finds a customer by API key: the EdgeState role, and FileEdgeState,
# which serves a YAML file. A change is rebuilt into a complete new snapshot and
# swapped in with one assignment; on any error the old snapshot stays in force.
from __future__ import annotations

import time
from collections.abc import Callable
from os import PathLike
from typing import Protocol

from config import ConfigError
from config.documents import content_version, decode_document
from config.edge_state_file import parse_edge_state_file
from config.watched_file import ReloadErrorCallback, WatchedFile
from config.yaml_source import no_cyclic_gc
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


class EdgeState(Protocol):
    """What the request path asks of edge state, whatever feeds it (a file today,
    the control plane later).

    `snapshot`: the EdgeSnapshot in force, replaced whole (one assignment) when the
    state changes; the request path looks customers up in it directly.
    `customer_for_key(api_key)`: the CustomerState for a plain API key (hashed
    inside), or None when the key is unknown. `version`: the version being served.
    `ready`: False until the first complete state has arrived; a proxy that is not
    ready should answer 503 rather than 401 to every key. `counting(customer, key)`:
    the CustomerState whose counters now hold the usage counted here for `customer`,
    found earlier by its API `key` (a refund or a settlement goes there).
    """

    snapshot: EdgeSnapshot
    version: str
    ready: bool

    def customer_for_key(self, api_key: bytes) -> CustomerState | None: ...

    def counting(self, customer: CustomerState, api_key: bytes) -> CustomerState: ...


class FileEdgeState(WatchedFile):
    """Edge state served from a YAML file, reloaded when the file changes (see
    config.watched_file.WatchedFile: rebuild, validate, swap; a broken file keeps the
    last good snapshot, logged with file, line and path, counted in `reload_errors`
    and passed to `on_reload_error`).

    `path`: the edge state file. `clock`: epoch seconds (time.time), the clock
    decide() gets; it stamps the throttle buckets of each new snapshot. The first
    load happens here and raises ConfigError when the file cannot be read or is
    invalid. `age_s()` says how long ago the state served was last known to match the
    file (for an alert when a broken file has kept the proxy on old state for long).

    Usage counted by the proxy since the last load lives in the old snapshot's
    CustomerState objects and is NOT carried into a new one: the file is the source
    of truth, and the usage it lists replaces the local count. Throttle buckets
    start full again for the same reason.

    A file with `period: monthly` is built for the calendar month `clock` is in;
    once that month has ended, the next reload check builds it again from the file
    for the new month, just as a new file for the next period would be loaded
    (local counts reset to the file's usage, standings restated). Until that check
    (every reload interval) decide() treats the ended period as over: quotas and
    standings do not apply.
    """

    ready = True

    def __init__(
        self,
        path: str | PathLike[str],
        clock: Callable[[], float] = time.time,
        on_reload_error: ReloadErrorCallback | None = None,
    ) -> None:
        super().__init__(path, self._build_snapshot, what="edge state", clock=clock, on_reload_error=on_reload_error)

    def _serve(self, value: EdgeSnapshot) -> None:
        # A plain attribute: the request path reads it once per request.
        self.value = self.snapshot = value

    def customer_for_key(self, api_key: bytes) -> CustomerState | None:
        """The customer for a plain API key in the snapshot in force, or None."""
        return self.snapshot.customer_for_key(api_key)

    def counting(self, customer: CustomerState, api_key: bytes) -> CustomerState:
        """`customer` itself: a new file's usage replaces what was counted here."""
        return customer

    def _build_snapshot(self, raw: bytes) -> EdgeSnapshot:
        # ConfigError for anything that keeps the file from becoming a snapshot.
        with no_cyclic_gc():
            state = parse_edge_state_file(decode_document(raw, self.path), self.path)
            try:
                return snapshot_from_file(state, content_version(raw), self.clock())
            except DecisionCoreError as err:
                raise ConfigError(f"Cannot build the edge state: {err}", self.path) from err
