# Edge state followed from a source that serves a whole state and then a stream of
# changes to it (the control plane's API today). Requests read the snapshot in force,
# which is restated in place for small changes and replaced whole for others; the
# usage a worker counted itself is never lowered by a state built before the source
# heard of it.
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

import msgspec

from config.edge_state_file import Customer, EdgeStateFile
from decision_core import CustomerState
from proxy.edge_snapshot import EdgeSnapshot, build_snapshot

log = logging.getLogger("aforo.proxy")

WAIT_FOR_CHANGES_S = 20.0
RETRY_INITIAL_S = 0.2
RETRY_MAX_S = 5.0
# Kept changes are folded into a new kept state once they outgrow it (and this).
KEPT_CHANGES_MIN_BYTES = 1 << 20


class EdgeStateUnavailable(Exception):
    """The source did not answer, or answered what cannot be read."""


class WireState(msgspec.Struct):
    """The whole edge state at `version`."""

    version: str
    state: EdgeStateFile


class WireChanges(msgspec.Struct):
    """What changed after a version: whole entries of changed `customers`, ids
    `removed`; or `resync`: pull the whole state again. The same `version` and
    nothing else: nothing changed."""

    version: str
    customers: list[Customer] = []
    removed: list[str] = []
    resync: bool = False


class EdgeStateSource(Protocol):
    """Where followed edge state comes from. `where` names it in messages;
    `pull()` returns the whole state; `changes(since, wait_s)` waits up to `wait_s`
    for changes after version `since`. Both raise EdgeStateUnavailable."""

    where: str

    async def pull(self) -> WireState: ...

    async def changes(self, since: str, wait_s: float) -> WireChanges: ...

    async def close(self) -> None: ...


class FollowedEdgeState:
    """Edge state followed from a `source` (an EdgeState): the control plane's API
    (proxy.control_plane_link.ControlPlaneSource) or another that speaks the same
    change stream (see EdgeStateSource).

    `start(timeout_s)` pulls the whole state and returns once it is served (raises
    EdgeStateUnavailable when it cannot within the time); `follow()` then waits for
    changes until cancelled, riding out outages with the last state in force
    (`age_s()` says for how long it has not heard from the source).

    A changed customer whose plan, keys and period are as before is restated in place
    (its usage counted here and unchanged throttle buckets stay); any other change
    builds a new snapshot, into which usage counted here since the last pull is
    carried (a customer's count is never lowered by a state the control plane built
    before it ingested this proxy's latest events).

    With `leased_quotas`, hard quotas are admitted against leases (see
    proxy.quota_leases): their counters start at the limit (nothing leased yet) and
    are carried into a new snapshot exactly as they stand; and enforcing level-2
    throttles are fed from the deployment's shared buckets (proxy.throttle_leases).

    Each wait for changes lasts at most `wait_s`, so while the source is there
    `age_s()` stays below it.

    With a `keeper` (proxy.kept_edge_state.EdgeStateKeeper), every state and change
    served is kept on disk, and a start that cannot reach the source at its first try
    serves the kept state at once (its age counted from when it was heard, so the
    routes' `when_stale` rules apply) and keeps trying the source in follow().
    """

    def __init__(self, source: EdgeStateSource, clock: Callable[[], float] = time.time,
                 leased_quotas: bool = False, wait_s: float = WAIT_FOR_CHANGES_S, keeper=None) -> None:
        self.source = source
        self.keeper = keeper
        self.clock = clock
        self.leased_quotas = leased_quotas
        self.wait_s = wait_s
        self.ready = False
        self.version = ""
        self.snapshot: EdgeSnapshot = build_snapshot({}, (), 0.0, 1.0, 0.0, "empty")
        self._state: EdgeStateFile | None = None
        self._customers: dict[str, Customer] = {}
        self._heard_at = time.monotonic()
        self.errors = 0

    def customer_for_key(self, api_key: bytes) -> CustomerState | None:
        return self.snapshot.customer_for_key(api_key)

    def counting(self, customer: CustomerState, api_key: bytes) -> CustomerState:
        """The customer's state in force now (found by `api_key`, as requests find
        it) when it is in the same period as `customer`: a rebuilt snapshot carried
        the usage counted here into it. Else `customer` itself."""
        current = self.snapshot.customer_for_key(api_key)
        if current is None or current.customer_id != customer.customer_id \
                or current.period_end != customer.period_end:
            return customer
        return current

    def recorded_usage(self, customer_id: str, metric: str) -> int:
        """The usage of `metric` the source says was recorded for the customer this
        period (0 for a customer it does not know)."""
        customer = self._customers.get(customer_id)
        return 0 if customer is None else customer.usage.get(metric, 0)

    def age_s(self) -> float:
        """Seconds since the source last answered."""
        return time.monotonic() - self._heard_at

    async def start(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        delay = RETRY_INITIAL_S
        while True:
            try:
                await self.pull()
                return
            except EdgeStateUnavailable as error:
                if self.keeper is not None and self._serve_kept(error):
                    return
                if time.monotonic() + delay > deadline:
                    raise EdgeStateUnavailable(f"no edge state from {self.source.where}: {error}") from error
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    def _serve_kept(self, error: EdgeStateUnavailable) -> bool:
        # Serve the state kept on disk, the changes kept after it applied; False when
        # none is kept.
        kept = self.keeper.load()
        if kept is None:
            return False
        wire, changes, kept_at = kept
        self._take_whole(wire)
        version = wire.version
        for change in changes:
            self._customers.update((customer.id, customer) for customer in change.customers)
            for customer_id in change.removed:
                self._customers.pop(customer_id, None)
            version = change.version
        self._rebuild(version)
        self._heard_at = time.monotonic() - max(0.0, time.time() - kept_at)
        self.ready = True
        log.warning("edge state: %s; serving version %s kept on disk (%.0f s old) until it answers",
                    error, version, self.age_s())
        return True

    async def pull(self) -> None:
        """Pull and serve the whole state."""
        wire = await self.source.pull()
        self._heard_at = time.monotonic()
        self._take_whole(wire)
        self._rebuild(wire.version)
        self.ready = True
        if self.keeper is not None:
            self.keeper.keep_whole(wire)

    def _take_whole(self, wire: WireState) -> None:
        self._state = wire.state
        self._customers = {customer.id: customer for customer in wire.state.customers}

    async def follow(self) -> None:
        """Apply the change stream until cancelled; on any failure wait (backing off)
        and go on, pulling everything again when the stream says so."""
        delay = RETRY_INITIAL_S
        while True:
            try:
                if not self.ready:
                    await self.pull()
                await self.apply_next_changes(self.wait_s)
                delay = RETRY_INITIAL_S
            except EdgeStateUnavailable as error:
                self.errors += 1
                log.warning("edge state: %s; serving version %s (%.0f s old), retrying in %.1f s",
                            error, self.version, self.age_s(), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            except Exception:  # noqa: BLE001 - following must outlive a state it cannot build
                self.errors += 1
                log.exception("edge state: a change could not be applied; serving version %s, pulling "
                              "everything again in %.1f s", self.version, delay)
                self.version = ""           # an unknown version: the next poll says resync
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def apply_next_changes(self, wait_s: float) -> None:
        """One wait: up to `wait_s` for changes after the version served, then apply
        them (or pull everything on `resync`)."""
        changes = await self.source.changes(self.version, wait_s)
        self._heard_at = time.monotonic()
        if changes.resync:
            await self.pull()
            return
        if changes.version == self.version:
            return
        now = self.clock()
        rebuild = bool(changes.removed)
        for customer in changes.customers:
            old = self._customers.get(customer.id)
            self._customers[customer.id] = customer
            if rebuild or old is None or (old.plan, old.api_keys, old.period_end) != (
                    customer.plan, customer.api_keys, customer.period_end):
                rebuild = True
            elif old != customer:
                self.snapshot.restate(customer, now, old.levels)
        for customer_id in changes.removed:
            self._customers.pop(customer_id, None)
        if rebuild:
            self._rebuild(changes.version)
        self.version = changes.version
        keeper = self.keeper
        if keeper is not None:
            keeper.keep_changes(changes)
            if keeper.changes_bytes > max(keeper.state_bytes, KEPT_CHANGES_MIN_BYTES):
                # The log outgrew the state: keep the state as it now stands instead.
                keeper.keep_whole(WireState(self.version, msgspec.structs.replace(
                    self._state, customers=list(self._customers.values()))))
        log.info("edge state: now serving version %s (%d changed, %d removed)", changes.version,
                 len(changes.customers), len(changes.removed))

    def _rebuild(self, version: str) -> None:
        state = self._state
        old = self.snapshot
        customers = self._customers.values()
        now = self.clock()
        period = state.period_at(now)
        new = build_snapshot(state.plans, customers, period.start.epoch_s, period.end.epoch_s,
                             now, version, shared=self.leased_quotas)
        for seen in old.seen_customers():
            carried = new.customer_by_id(seen.customer_id)
            if carried is None or carried.period_end != seen.period_end:
                continue
            for metric, slot in carried.quotas.slots.items():
                here, there = seen.quota_used(metric), carried.quota_used(metric)
                exact = self.leased_quotas and carried.quotas.limit_at(slot).hard
                if here != there and (exact or here > there):
                    carried.add_usage(metric, here - there)
                if exact:
                    # The customer is told the most it is known to have used: what the
                    # new state recorded, or what this worker had told it.
                    carried.report_usage(metric, max(self.recorded_usage(seen.customer_id, metric),
                                                     seen.reported_usage(metric)))
        self.snapshot = new
        self.version = version

    async def close(self) -> None:
        await self.source.close()
        if self.keeper is not None:
            self.keeper.close()



