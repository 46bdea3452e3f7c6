# Edge state: what a proxy holds in memory about one customer, as the control plane
# computed it. Built once per snapshot and swapped whole; between snapshots only the
# throttle buckets and the local quota counters change.

from decision_core.bucket import TokenBucket
from decision_core.errors import InvalidStateError
from decision_core.quota import PlanQuotas

# Subscription statuses that may send traffic; every other known status is refused.
OPEN_STATUSES = frozenset(("active", "trialing"))
SUBSCRIPTION_STATUSES = frozenset(("active", "trialing", "past_due", "canceled", "paused", "expired"))

# Key of the customer's overall margin standing (across all metrics) in guard_levels.
OVERALL = "overall"


class GuardStanding:
    """A customer's standing under one guard: its margin level (0..3), whether the
    guard enforces or only shadows, the level-2 throttle bucket and model downgrades
    (`model_map`: requested model -> the model to serve instead, None for none), and
    for the level-3 lock variant the features it suspends (empty = block every request).

    Raises InvalidStateError for a level outside 0..3, level 2 without a bucket, or
    a model map at another level.
    """

    def __init__(self, guard_id, level, enforce=True, bucket=None, locked_features=frozenset(), model_map=None):
        if level < 0 or level > 3:
            raise InvalidStateError(f"guard {guard_id!r}: margin level must be 0..3, got {level}")
        if level == 2 and bucket is None:
            raise InvalidStateError(f"guard {guard_id!r}: level 2 needs a throttle bucket")
        if bucket is not None and not isinstance(bucket, TokenBucket):
            raise InvalidStateError(f"guard {guard_id!r}: bucket must be a TokenBucket")
        if model_map and level != 2:
            raise InvalidStateError(f"guard {guard_id!r}: model downgrades only apply at level 2, not level {level}")
        self.guard_id = guard_id
        self.level = level
        self.enforce = bool(enforce)
        self.bucket = bucket
        self.locked_features = frozenset(locked_features)
        self.model_map = dict(model_map) if model_map else None
        # Problem details are fixed per standing, so they are built with the snapshot.
        self.block_detail = f"margin guard {guard_id!r} blocks requests until the next billing period"
        self.throttle_detail = f"margin guard {guard_id!r} limits this customer's request rate"


class CustomerState:
    """Everything the proxy decides on for one customer.

    - subscription_status: one of SUBSCRIPTION_STATUSES; only OPEN_STATUSES send traffic.
    - features: the plan's entitlements (share one frozenset per plan).
    - quotas: the plan's PlanQuotas (shared per plan); usage: metric -> units used
      this period (metrics without a quota are not counted).
    - guard_levels: metric (or OVERALL) -> GuardStanding, already resolved per metric,
      or a tuple of two: the enforcing guard's and a shadow guard's standing beside it.
    - period_end: end of the current billing period, seconds on the caller's clock.
    Raises InvalidStateError for an unknown subscription status or negative usage.
    """

    def __init__(self, customer_id, tier, subscription_status, features, quotas, usage, guard_levels, period_end):
        if subscription_status not in SUBSCRIPTION_STATUSES:
            raise InvalidStateError(
                f"customer {customer_id!r}: unknown subscription status {subscription_status!r}"
            )
        self.customer_id = customer_id
        self.tier = tier
        self.subscription_status = subscription_status
        self.subscription_open = subscription_status in OPEN_STATUSES
        self.features = frozenset(features)
        if not isinstance(quotas, PlanQuotas):
            raise InvalidStateError(f"customer {customer_id!r}: quotas must be a PlanQuotas")
        self.quotas = quotas
        # Counters inline in this object (a C array of MAX_QUOTA_METRICS when compiled,
        # spelled out for Cython): a quota check reads no other per-customer memory.
        self.used = [0, 0, 0, 0, 0, 0, 0, 0]
        # What the RateLimit header reports minus `used`: 0 unless the quota is leased
        # (then `used` counts what this worker holds, not what the customer used).
        self.report_offset = [0, 0, 0, 0, 0, 0, 0, 0]
        for metric, units in usage.items():
            if units < 0:
                raise InvalidStateError(f"customer {customer_id!r}: negative usage {units} of {metric!r}")
            slot = quotas.slot(metric)
            if slot >= 0:
                self.used[slot] = units
        self.period_end = float(period_end)
        self.guard_levels = dict(guard_levels)
        # The hot path only looks at standings that can act on a request (level 2 or 3;
        # level 1 warns by webhook, not here), and finds None when there are none:
        # enforcing ones in acting_levels, shadow ones (which only report) apart.
        self.acting_levels, self.shadow_levels = _acting(self.guard_levels)

    def restate(self, subscription_status, guard_levels):
        """Take a new subscription status and guard standings (the control plane
        changed them) in place; usage counted so far stays. Raises InvalidStateError
        for an unknown status (and then changes nothing)."""
        if subscription_status not in SUBSCRIPTION_STATUSES:
            raise InvalidStateError(
                f"customer {self.customer_id!r}: unknown subscription status {subscription_status!r}"
            )
        self.subscription_status = subscription_status
        self.subscription_open = subscription_status in OPEN_STATUSES
        self.guard_levels = dict(guard_levels)
        self.acting_levels, self.shadow_levels = _acting(self.guard_levels)

    def quota_used(self, metric):
        """Units of `metric` counted this period (0 for a metric without a quota)."""
        slot = self.quotas.slot(metric)
        return self.used[slot] if slot >= 0 else 0

    def add_usage(self, metric, units):
        """Count `units` of `metric` at once (the proxy's local counter between
        snapshots); metrics without a quota are not counted here."""
        slot = self.quotas.slot(metric)
        if slot >= 0:
            self.used[slot] += units

    def reported_usage(self, metric):
        """The usage of `metric` the customer is told of (RateLimit): the counter,
        unless report_usage() said otherwise since (0 for a metric without a quota)."""
        slot = self.quotas.slot(metric)
        return self.used[slot] + self.report_offset[slot] if slot >= 0 else 0

    def report_usage(self, metric, units):
        """From now on tell the customer it used `units` of `metric`, plus what is
        counted from here on: for a leased quota, whose counter holds what this
        worker has left of its leases rather than the customer's usage."""
        slot = self.quotas.slot(metric)
        if slot >= 0:
            self.report_offset[slot] = units - self.used[slot]


def _acting(guard_levels):
    # (enforcing, shadow): metric -> the standing at level 2 or 3, or None for none.
    acting = {}
    shadows = {}
    for metric, standings in guard_levels.items():
        for standing in standings if isinstance(standings, tuple) else (standings,):
            if not isinstance(standing, GuardStanding):
                raise InvalidStateError(f"the standing of {metric!r} must be a GuardStanding, got {standing!r}")
            if standing.level >= 2:
                into = acting if standing.enforce else shadows
                if metric in into:
                    raise InvalidStateError(
                        f"{metric!r} has two {'enforcing' if standing.enforce else 'shadow'} standings "
                        f"({into[metric].guard_id!r}, {standing.guard_id!r}); one per mode")
                into[metric] = standing
    return acting or None, shadows or None


class RequestFacts:
    """What a request asks for: the features its route requires, the metric it meters
    and the units it will use (known up front, or an estimate), and the other metrics
    it meters once answered (an LLM call's tokens), whose guards act on it too.
    Routes build it once."""

    def __init__(self, features, metric, units=1, other_metrics=()):
        if units < 0:
            raise InvalidStateError(f"a request cannot use negative units, got {units}")
        self.features = tuple(features)
        self.metric = metric
        self.units = units
        self.other_metrics = tuple(other_metrics)
