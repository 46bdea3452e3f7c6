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

# Near the limit no worker gets more than this share of what is left.
LEASE_SPREAD = 8


class LeaseRequest(msgspec.Struct, forbid_unknown_fields=True):
    """`needed`: units the request waiting for the lease takes; `wanted`: the chunk
    the worker would like (at least `needed`)."""

    customer_id: str
    metric: str
    needed: int
    wanted: int


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


def grant_size(limit: int, leased: int, needed: int, wanted: int) -> int:
    """How much to lease now: 0 when fewer than `needed` units are left; otherwise
    `wanted`, but no more than 1/LEASE_SPREAD of what is left (at least `needed`)."""
    left = limit - leased
    if needed > left or needed < 0:
        return 0
    return max(needed, min(wanted, left // LEASE_SPREAD))


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
    granted = await store.lease_quota(
        asked.customer_id, asked.metric, period_start,
        lambda leased: grant_size(quota.limit, leased, asked.needed, max(asked.wanted, asked.needed)))
    return Lease(granted, period_start, quota.limit)
