# Feeding the proxies (the embedded bus): the edge state every proxy decides from, in
# the edge state file's own schema, and a change stream over it. A proxy pulls the
# whole state once (GET /v1/edge/state), then long-polls GET /v1/edge/changes with the
# version it holds and gets the customers that changed since, or `resync` when it must
# pull everything again (the control plane restarted, it fell too far behind, or
# something changed for every customer: the catalog, the guard file, a new period).
#
# What a proxy gets per customer: the plan and status of the subscription in force,
# the digests of its live API keys, its usage this period, and its guard standings
# (per metric the enforcing guard's and a shadow guard's beside it).
# A standing belongs to the billing period it was reached in; a new period starts at
# level 0. Usage is what the control plane has ingested; a proxy counts its own
# traffic on top between pulls.
from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import secrets
from collections.abc import Iterable

import msgspec

from config.edge_state_file import (
    Customer,
    EdgeStateFile,
    Period,
    Plan,
    Quota,
    Standing,
    calendar_month,
)
from config.values import Timestamp
from control_plane.rating import CurrentRater
from control_plane.store import Store, StoreError

log = logging.getLogger("aforo.control_plane")

# Changes remembered for proxies that are behind; one further behind resyncs.
HISTORY = 4096
LONG_POLL_MAX_S = 30.0
CHECK_INTERVAL_S = 1.0

_UTC = datetime.timezone.utc


class EdgeChanges(msgspec.Struct):
    """What changed since a version: `customers` (their whole new entries) and
    `removed` (ids no longer served); or `resync`: pull the whole state again."""

    version: str
    customers: list[Customer] = []
    removed: list[str] = []
    resync: bool = False


class EdgeFeed:
    """The versions of the edge state proxies follow.

    A version is `<epoch>.<sequence>`: the epoch is new at every start of the control
    plane (a proxy holding an older one resyncs), the sequence moves with every
    change. `changed(customers)` records a change for those customer ids (None: for
    everyone) and wakes the proxies waiting in `changes()`. `watch()` notices what
    changes without an API call: a reloaded guard file, the catalog written by
    `aforo apply`, a billing period that ends.
    """

    def __init__(self, store: Store, guards=None, rater: CurrentRater | None = None) -> None:
        self.store = store
        self.rater = rater or CurrentRater(store)
        self.guards = guards            # a WatchedFile[GuardSet], or None
        self.epoch = secrets.token_hex(4)
        self.sequence = 0
        self._log: collections.deque[tuple[int, frozenset[str] | None]] = collections.deque(maxlen=HISTORY)
        self._moved = asyncio.Event()
        self._next_period_end = float("inf")
        self._seen_guards = guards.value.version if guards is not None else None
        self._seen_catalog = None

    @property
    def version(self) -> str:
        return f"{self.epoch}.{self.sequence}"

    def close(self) -> None:
        """Answer every waiting long poll now (the control plane is stopping)."""
        self.changed()

    def changed(self, customers: Iterable[str] | None = None) -> None:
        """Record a change for `customers` (None: every customer)."""
        ids = None if customers is None else frozenset(customers)
        if ids is not None and not ids:
            return
        self.sequence += 1
        self._log.append((self.sequence, ids))
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    async def changes(self, since: str, wait_s: float, now: float) -> EdgeChanges:
        """What changed after version `since`, waiting up to `wait_s` seconds for a
        change when there is none yet (then the same version and nothing)."""
        if since == self.version and wait_s > 0:
            try:
                await asyncio.wait_for(self._moved.wait(), min(wait_s, LONG_POLL_MAX_S))
            except asyncio.TimeoutError:
                pass
        version = self.version
        ids = self._changed_since(since)
        if ids is None:
            return EdgeChanges(version, resync=True)
        if not ids:
            return EdgeChanges(version)
        state = await self.state(now, ids)
        served = {customer.id for customer in state.customers}
        return EdgeChanges(version, list(state.customers), sorted(ids - served))

    def _changed_since(self, since: str) -> set[str] | None:
        epoch, _, sequence = since.partition(".")
        if epoch != self.epoch or not sequence.isdigit() or int(sequence) > self.sequence:
            return None
        after = int(sequence)
        if after < self.sequence and (not self._log or self._log[0][0] > after + 1):
            return None                 # older than what is remembered
        ids: set[str] = set()
        for sequence_number, changed in self._log:
            if sequence_number > after:
                if changed is None:
                    return None
                ids |= changed
        return ids

    async def state(self, now: float, only: set[str] | None = None) -> EdgeStateFile:
        """The edge state at `now` (epoch seconds): every customer with a subscription,
        or only those in `only`."""
        store = self.store
        rater = await self.rater.get()
        guards = {guard.id: guard for guard in self.guards.value.guards} if self.guards is not None else {}
        at = datetime.datetime.fromtimestamp(now, _UTC)
        plans = {key: Plan(tier=pricing.plan.tier, features=pricing.plan.features,
                           quotas={metric: Quota(limit=quota.limit, hard=quota.hard)
                                   for metric, quota in pricing.plan.quotas.items()})
                 for key, pricing in rater.plans.items()}
        wanted = sorted(rater.by_customer if only is None else set(rater.by_customer) & only)
        if only is None:            # everyone: one read of each
            live_keys = await store.live_api_keys()
            totals = await store.period_totals(now)
            standing = await store.guard_levels()
        else:                       # the few that changed: only theirs
            live_keys = [key for customer_id in wanted for key in await store.api_keys(customer_id)
                         if key.revoked_at is None]
            totals = await store.period_totals_of(now, wanted)
            standing = await store.guard_levels_of(wanted)
        keys: dict[str, list[str]] = {}
        for key in live_keys:
            keys.setdefault(key.customer_id, []).append(key.key_hash)
        usage: dict[str, dict[str, int]] = {}
        for row in totals:
            usage.setdefault(row.customer_id, {})[row.metric] = row.units
        levels: dict[str, list] = {}
        for level in standing:
            levels.setdefault(level.customer_id, []).append(level)
        customers = []
        earliest_end = float("inf")
        for customer_id in wanted:
            subscription = rater.subscription_in_force(customer_id, at)
            if subscription is None:
                continue
            start, end = rater.period_of(subscription, at)
            earliest_end = min(earliest_end, end.timestamp())
            quotas = plans[subscription.plan].quotas
            standings: dict[str, Standing | tuple[Standing, ...]] = {}
            for level in levels.get(customer_id, ()):
                standing = _standing(level, guards.get(level.guard_id)) if level.changed_at >= start.timestamp() else None
                if standing is not None:
                    beside = standings.get(level.metric)        # the other mode's, at most one
                    standings[level.metric] = standing if beside is None else (beside, standing)
            customers.append(Customer(
                id=customer_id, plan=subscription.plan, status=subscription.status,
                api_keys=tuple(keys.get(customer_id, ())),
                usage={metric: units for metric, units in usage.get(customer_id, {}).items() if metric in quotas},
                levels=standings, period_end=Timestamp(end)))
        if only is None:
            self._next_period_end = earliest_end
        month_start, month_end = calendar_month(at)
        return EdgeStateFile(period=Period(start=Timestamp(month_start), end=Timestamp(month_end)),
                             plans=plans, customers=tuple(customers))

    async def watch(self, now_fn, interval_s: float = CHECK_INTERVAL_S) -> None:
        """Until cancelled, every `interval_s`: a new guard file version, a catalog
        changed behind the API's back, or a billing period that has ended is a change
        for everyone."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                catalog = await self.store.catalog_version()
            except StoreError as error:
                log.warning("edge feed: cannot read the catalog version (%s); trying again", error)
                continue
            guards = self.guards.value.version if self.guards is not None else None
            if self._seen_catalog is None:
                self._seen_catalog = catalog
            if catalog != self._seen_catalog or guards != self._seen_guards or now_fn() >= self._next_period_end:
                self._seen_catalog, self._seen_guards = catalog, guards
                self._next_period_end = float("inf")        # until the next full state says
                self.changed()


def _standing(level, guard) -> Standing | None:
    # A level under a guard that is no longer in the file, or no longer in the mode
    # the level was reached in, is not enforced (the next evaluation judges the
    # customer under the guard that applies now).
    if guard is None or level.level == 0 or guard.mode != level.mode:
        return None
    actions = guard.actions
    if level.level == 2:
        if actions.level_2 is None:
            return None
        return Standing(guard=guard.id, level=2, mode=guard.mode,
                        throttle_rate=actions.level_2.throttle_rate, burst=actions.level_2.burst,
                        downgrade_models=actions.level_2.downgrade_models)
    if level.level == 3:
        if actions.level_3 is None:
            return None
        locked = actions.level_3.features if actions.level_3.action == "lock_features" else ()
        return Standing(guard=guard.id, level=3, mode=guard.mode, locked_features=locked)
    return Standing(guard=guard.id, level=level.level, mode=guard.mode)
