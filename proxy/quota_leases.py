# Hard quotas with several proxy workers: each worker admits requests only against
# units of a customer's hard quota leased to it from a QuotaLedger shared by all of
# them (proxy.quota_ledger: the control plane's, or the Redis edge bus's), so all
# workers together never admit more than the limit. For a leased metric a customer's
# usage counter holds `limit - units this worker still holds`: decide() is unchanged
# and admits while the lease lasts. What the customer is told it used (RateLimit) is
# kept apart (CustomerState.report_usage): at each answer of the ledger, all it has
# leased this period but what this worker still holds, then counted on with every
# request here; so other workers' requests show in it at this worker's next lease,
# and their unused units count as used until they give them back.
#
# A request that finds no lease left waits for one (a customer's first request of a
# period, and near the limit, where leases shrink to single requests), for at most the
# ledger's timeout; a lease running low is topped up in the background; units unused
# for LEASE_IDLE_S go back, so another worker can use them.
#
# When the ledger cannot be asked, a worker spends the units it holds as usual. A
# request that needs more is answered 503 on a route with `when_quota_unknown:
# closed`; on one with `open` (the default) the worker leases to itself, by the
# ledger's rule, from the usage recorded in its last state plus what it leased itself
# so, at most one chunk per customer and metric in each outage, and
# adds those units to the ledger (as debt) once it answers again; beyond that chunk
# the request is answered 503 too. So during one outage all workers together admit at
# most the limit plus one chunk per worker (a twentieth of the limit each), and with
# `closed` never more than the limit.
from __future__ import annotations

import logging
import time

from decision_core.quota import grant_size
from proxy.quota_ledger import LedgerUnavailable

log = logging.getLogger("aforo.proxy")

# A lease asks for this share of the limit (the ledger gives less near it).
CHUNK_SHARE = 20
# Topped up when what is left falls below this share of a chunk.
LOW_WATER_SHARE = 4
LEASE_IDLE_S = 1.0
# After "not enough left" for some units, a worker asks again for as many at most
# this often (others may give back); fewer units are asked for at once.
DENIED_RETRY_S = 0.5


# Who settled a lease (QuotaLeases._lease).
_LEDGER, _LAST_STATE, _UNKNOWN = "ledger", "last state", "unknown"


class _Held:
    __slots__ = ("customer_id", "metric", "period", "period_end", "last_used")

    def __init__(self, customer_id, metric, period, period_end, now):
        self.customer_id = customer_id
        self.metric = metric
        self.period = period                # the ledger's name for the period
        self.period_end = period_end
        self.last_used = now


class _Unledgered:
    # Units leased from the last state while the ledger could not be asked, in the
    # period ending at `period_end`: `taken` in all, `debt` not yet in the ledger,
    # `in_outage` since the ledger last answered (None: it answered last time).
    __slots__ = ("period_end", "taken", "debt", "in_outage")

    def __init__(self, period_end):
        self.period_end = period_end
        self.taken = 0
        self.debt = 0
        self.in_outage = None


class QuotaLeases:
    """The hard-quota leases of one worker, from `ledger` (a QuotaLedger), for the
    customers of `edge_state` (a FollowedEdgeState). `unledgered_total`: units
    leased from the last state while the ledger could not be asked."""

    def __init__(self, ledger, edge_state, loop, clock=time.monotonic) -> None:
        self.ledger = ledger
        self.edge_state = edge_state
        self.loop = loop
        self.clock = clock
        self._waiting: dict[tuple[str, str], list] = {}     # asked for: exchanges waiting on it
        self._held: dict[tuple[str, str], _Held] = {}
        # Told "not enough left": until when, and for how many units (fewer may fit).
        self._denied: dict[tuple[str, str], tuple[float, int]] = {}
        self._unledgered: dict[tuple[str, str], _Unledgered] = {}
        self.unledgered_total = 0
        self._sweeper = None

    @staticmethod
    def leased(customer, metric) -> bool:
        """Whether `metric` is a hard quota of `customer`'s plan (leased)."""
        slot = customer.quotas.slot(metric)
        return slot >= 0 and customer.quotas.limit_at(slot).hard

    def wait(self, exchange, customer, facts) -> bool:
        """A request refused for quota: ask for a lease and `exchange.lease_settled(ok)`
        when the answer comes (ok False: the quota cannot be checked now, answer 503).
        False when the refusal stands (no hard quota, or this worker was told just now
        that no more than it lacks is left)."""
        key = (customer.customer_id, facts.metric)
        if not self.leased(customer, facts.metric):
            return False
        # What this worker lacks: the request's units beyond those it holds.
        limit = customer.quotas.limit_at(customer.quotas.slot(facts.metric)).limit
        needed = max(facts.units - max(limit - customer.quota_used(facts.metric), 0), 1)
        denied = self._denied.get(key)
        if denied is not None and denied[0] > self.clock() and needed >= denied[1]:
            return False
        waiting = self._waiting.get(key)
        if waiting is None:
            self._waiting[key] = [exchange]
            self.loop.create_task(self._ask(customer, facts.metric, needed))
        else:
            waiting.append(exchange)
        return True

    def admitted(self, customer, facts) -> None:
        """A request was admitted: note the lease in use, and top it up in the
        background when it runs low."""
        key = (customer.customer_id, facts.metric)
        held = self._held.get(key)
        if held is None:
            return
        held.last_used = self.clock()
        limit = customer.quotas.limit_at(customer.quotas.slot(facts.metric)).limit
        left = limit - customer.quota_used(facts.metric)
        if left * LOW_WATER_SHARE * CHUNK_SHARE < limit and key not in self._waiting:
            self._waiting[key] = []
            # Any units help (none need be whole requests' worth): "nothing left" then
            # means the ledger has none at all.
            self.loop.create_task(self._ask(customer, facts.metric, 1))

    async def _ask(self, customer, metric, needed) -> None:
        key = (customer.customer_id, metric)
        answer = _UNKNOWN
        try:
            answer = await self._lease(customer, metric, needed, key)
        except Exception:  # noqa: BLE001 - whatever happens, the waiting requests get an answer
            log.exception("quota lease for %s %s failed", customer.customer_id, metric)
        finally:
            for exchange in self._waiting.pop(key, ()):
                exchange.lease_settled(answer is _LEDGER or answer is _LAST_STATE
                                       and not exchange.route.quota_unknown_closed)

    async def _lease(self, customer, metric, needed, key):
        # Who settled it: _LEDGER (units granted, or none left), _LAST_STATE (the
        # ledger cannot be asked; units leased from the last state, or none left in
        # it) or _UNKNOWN (the ledger cannot be asked and no route waiting may decide
        # from the last state, or this outage's chunk is spent).
        limit = customer.quotas.limit_at(customer.quotas.slot(metric)).limit
        recorded = self.edge_state.recorded_usage(customer.customer_id, metric)
        unledgered = self._unledgered.get(key)
        if unledgered is not None and unledgered.period_end != customer.period_end:
            del self._unledgered[key]           # a new period: the old one's debt is moot
            unledgered = None
        debt = 0 if unledgered is None else unledgered.debt
        try:
            granted, period, leased = await self.ledger.lease(
                customer.customer_id, metric, needed=needed, wanted=max(needed, limit // CHUNK_SHARE), limit=limit,
                period_end=customer.period_end, recorded=recorded, debt=debt)
        except LedgerUnavailable as error:
            if unledgered is None:
                unledgered = self._unledgered[key] = _Unledgered(customer.period_end)
            if unledgered.in_outage is None:        # said once per outage and customer
                unledgered.in_outage = 0
                log.warning("quota lease for %s %s: %s; routes with when_quota_unknown: open admit at most %d more "
                            "from the last state until it answers", customer.customer_id, metric, error,
                            max(limit // CHUNK_SHARE, 1))
            allowed = max(needed, limit // CHUNK_SHARE) - unledgered.in_outage
            if needed > allowed or all(exchange.route.quota_unknown_closed for exchange in self._waiting.get(key, ())):
                return _UNKNOWN
            # Leased from the last state, by the ledger's own rule.
            granted = grant_size(limit, recorded + unledgered.taken, needed, allowed)
            period = leased = None
            unledgered.taken += granted
            unledgered.debt += granted
            unledgered.in_outage += granted
            self.unledgered_total += granted
            answer = _LAST_STATE
        else:
            if unledgered is not None:
                unledgered.debt -= debt
                unledgered.in_outage = None
            answer = _LEDGER
        # Into the customer's state in force now (a new snapshot may have come meanwhile).
        current = self.edge_state.snapshot.customer_by_id(customer.customer_id) or customer
        told = current.reported_usage(metric)
        current.add_usage(metric, -granted)
        # What the customer has used, as the ledger knows it: all it leased, but what
        # this worker still holds (other workers' unused units count as used until
        # they give them back). Without the ledger, what it was told so far.
        current.report_usage(metric, told if leased is None else leased - (limit - current.quota_used(metric)))
        if not granted:
            self._denied[key] = (self.clock() + DENIED_RETRY_S, needed)
            return answer
        held = self._held.get(key)
        if held is None or held.period_end != current.period_end or (held.period is None and period is not None):
            self._held[key] = _Held(customer.customer_id, metric, period, current.period_end, self.clock())
        self._denied.pop(key, None)
        return answer

    def schedule_returns(self) -> None:
        """Give back idle leases every LEASE_IDLE_S until stop()."""
        def tick():
            self.loop.create_task(self._give_back_idle())
            self._sweeper = self.loop.call_later(LEASE_IDLE_S, tick)
        self._sweeper = self.loop.call_later(LEASE_IDLE_S, tick)

    async def _give_back_idle(self) -> None:
        try:
            await self.give_back(idle_for_s=LEASE_IDLE_S)
        except Exception:  # noqa: BLE001 - the next tick tries again
            log.exception("giving back idle quota leases failed")

    async def give_back(self, idle_for_s: float = 0.0) -> None:
        """Return every lease unused for `idle_for_s` seconds (0: all of them, the
        worker is stopping). Units the ledger cannot take back now stay with the
        worker (while it runs) and go back at a later sweep; so do units it leased
        itself from its last state until the ledger has counted them."""
        now = self.clock()
        for key, held in list(self._held.items()):
            if key in self._waiting or now - held.last_used < idle_for_s or held.period is None:
                continue
            del self._held[key]
            customer = self.edge_state.snapshot.customer_by_id(held.customer_id)
            if customer is None or customer.period_end != held.period_end:
                continue                # gone, or a new period: that period's lease is moot
            limit = customer.quotas.limit_at(customer.quotas.slot(held.metric)).limit
            left = limit - customer.quota_used(held.metric)
            if left <= 0:
                continue
            customer.add_usage(held.metric, left)          # no longer usable here
            customer.report_usage(held.metric, customer.reported_usage(held.metric) - left)   # nor used
            try:
                await self.ledger.give_back(held.customer_id, held.metric, held.period, left)
            except LedgerUnavailable as error:
                if not idle_for_s:
                    log.warning("could not give back %d %s of %s: %s (they stay leased until the period ends)",
                                left, held.metric, held.customer_id, error)
                    continue
                # Still this worker's: usable here again, given back at a later sweep.
                current = self.edge_state.snapshot.customer_by_id(held.customer_id)
                if current is not None and current.period_end == held.period_end:
                    current.add_usage(held.metric, -left)
                    current.report_usage(held.metric, current.reported_usage(held.metric) + left)
                    self._held.setdefault(key, held)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
