# Hard quotas shared by several proxy workers. A worker admits requests only against
# units the control plane has leased to it, so the units admitted by all workers
# together never exceed what was leased, and what was leased never exceeds the
# limit. Leases come in chunks while much is left and shrink to what one request
# needs near the limit; a worker gives back what it does not use.
from __future__ import annotations

import datetime

import msgspec

from control_plane.rating import Rater
from control_plane.store import Store
from decision_core.quota import grant_size


class LeaseRequest(msgspec.Struct, forbid_unknown_fields=True):
    """`needed`: units the request waiting for the lease takes; `wanted`: the chunk
    the worker would like (at least `needed`); `debt`: units the worker admitted from
    its last state while the ledger could not be reached, added to the ledger first."""

    customer_id: str
    metric: str
    needed: int
    wanted: int
    debt: int = 0


class Lease(msgspec.Struct):
    """`granted` units of `metric` for the billing period starting at `period_start`
    (epoch seconds), under the plan's `limit`. 0 granted: nothing is left."""

    granted: int
    period_start: float
    limit: int


class LeaseReturn(msgspec.Struct, forbid_unknown_fields=True):
    customer_id: str
    metric: str
    period_start: float
    units: int


class NoHardQuota(Exception):
    """The customer has no subscription in force, or its plan sets no hard quota on
    the metric: there is nothing to lease."""


async def lease(store: Store, rater: Rater, asked: LeaseRequest, now: float) -> Lease:
    """Lease units of the customer's hard quota for its billing period at `now`, as
    the catalog `rater` was loaded from says. Raises NoHardQuota when there is no
    hard quota to lease from."""
    at = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    subscription = rater.subscription_in_force(asked.customer_id, at)
    quota = None if subscription is None else rater.plans[subscription.plan].plan.quotas.get(asked.metric)
    if quota is None or not quota.hard:
        raise NoHardQuota(f"customer `{asked.customer_id}` has no hard quota on `{asked.metric}` now")
    start, _ = rater.period_of(subscription, at)
    period_start = start.timestamp()
    debt = max(asked.debt, 0)
    taken = await store.lease_quota(
        asked.customer_id, asked.metric, period_start,
        lambda leased: debt + grant_size(quota.limit, leased + debt, asked.needed, max(asked.wanted, asked.needed)))
    return Lease(taken - debt, period_start, quota.limit)
