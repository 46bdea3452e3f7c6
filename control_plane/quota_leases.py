# Hard quotas shared by several proxy workers. A worker admits requests only against
# units the control plane has leased to it, so the units admitted by all workers
# together never exceed what was leased, and what was leased never exceeds the
# limit. Leases come in chunks while much is left and shrink to what one request
# needs near the limit; a worker gives back what it does not use. A throttled
# customer's level-2 tokens come from one bucket per customer, guard and metric the same way,
# so the throttle rate holds across every worker.
from __future__ import annotations

import datetime
from typing import Annotated

import msgspec

from control_plane.rating import Rater
from control_plane.store import Store
from decision_core.bucket import US_PER_S, shared_interval_us, shared_take
from decision_core.quota import grant_size


Units = Annotated[int, msgspec.Meta(ge=0)]
# A worker asks for the tokens of the requests waiting on it, never more than this.
MAX_WANTED_TOKENS = 1000


class LeaseRequest(msgspec.Struct, forbid_unknown_fields=True):
    """`needed`: units the request waiting for the lease takes; `wanted`: the chunk
    the worker would like (at least `needed`); `debt`: units the worker admitted from
    its last state while the ledger could not be reached, added to the ledger first."""

    customer_id: str
    metric: str
    needed: Units
    wanted: Units
    debt: Units = 0


class Lease(msgspec.Struct):
    """`granted` units of `metric` for the billing period starting at `period_start`
    (epoch seconds), under the plan's `limit`; `leased`: units leased in all this
    period, to every worker, this grant included. 0 granted: nothing is left."""

    granted: int
    period_start: float
    limit: int
    leased: int


class LeaseReturn(msgspec.Struct, forbid_unknown_fields=True):
    customer_id: str
    metric: str
    period_start: float
    units: Units


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
    start, end = rater.period_of(subscription, at)
    period_start = start.timestamp()
    debt = max(asked.debt, 0)
    before = []

    def grant(leased):
        before.append(leased)
        return debt + grant_size(quota.limit, leased + debt, asked.needed, max(asked.wanted, asked.needed))

    taken = await store.lease_quota(asked.customer_id, asked.metric, period_start, grant, end.timestamp(),
                                    subscription.key)
    return Lease(taken - debt, period_start, quota.limit, before[-1] + taken)


class ThrottleRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Up to `wanted` tokens of `customer_id`'s level-2 throttle under `guard_id` for
    `metric` (or `overall`): `tokens` per `per_s` seconds with bursts of `burst`, as
    the guard's standing says."""

    customer_id: str
    guard_id: str
    metric: str
    tokens: Annotated[int, msgspec.Meta(ge=1)]
    per_s: Annotated[float, msgspec.Meta(gt=0)]
    burst: Annotated[int, msgspec.Meta(ge=1)]
    wanted: Annotated[int, msgspec.Meta(ge=1, le=MAX_WANTED_TOKENS)] = 1


class ThrottleTokens(msgspec.Struct):
    """`granted` tokens; with none, `wait_s` until one is there."""

    granted: int
    wait_s: float


async def take_tokens(store: Store, asked: ThrottleRequest, now: float) -> ThrottleTokens:
    """Take tokens from the customer's shared throttle bucket at `now` (the control
    plane's clock: every worker asking it shares one)."""
    interval_us = shared_interval_us(asked.tokens, asked.per_s)
    now_us = int(now * US_PER_S)

    def take(spent_until_us):
        granted, spent_until_us, wait_us = shared_take(spent_until_us, now_us, interval_us, asked.burst, asked.wanted)
        return spent_until_us, ThrottleTokens(granted, wait_us / US_PER_S)

    return await store.take_throttle(asked.customer_id, asked.guard_id, asked.metric, take)
