# Quotas: usage this billing period against the plan's limit for one metric.
# A hard quota admits a request only while used + units <= limit; a soft quota always
# admits (the overage is billed). Limits belong to the plan and are shared by all its
# customers (PlanQuotas); each customer's usage is counted in its own edge state.
# Header values follow the IETF httpapi ratelimit-headers draft:
# `RateLimit-Policy: "<metric>";q=<limit>;w=<period s>` and
# `RateLimit: "<metric>";r=<remaining>;t=<seconds to reset>`.

from decision_core.errors import InvalidStateError

QUOTA_UNDER = 0       # usage below the limit
QUOTA_AT_LIMIT = 1    # usage exactly at the limit: a hard quota admits nothing more
QUOTA_OVERAGE = 2     # usage above the limit: only a soft quota gets here (billed overage)

# Usage counters live inline in each customer's state, one slot per quota metric.
MAX_QUOTA_METRICS = 8


class QuotaLimit:
    """A plan's quota on one metric: `limit` whole units per billing period of
    `window_s` seconds, `hard` (block at the limit) or soft (allow billed overage).
    Raises InvalidStateError for a negative limit or a non-positive window.
    """

    def __init__(self, metric, limit, hard, window_s):
        if limit < 0 or window_s <= 0:
            raise InvalidStateError(
                f"quota for {metric!r} needs limit >= 0 and window > 0, got limit={limit} window={window_s}"
            )
        self.metric = metric
        self.limit = limit
        self.hard = bool(hard)
        self.window_s = int(window_s)
        self.policy_header = f'"{metric}";q={limit};w={self.window_s}'
        self.remaining_prefix = f'"{metric}";r='

    def admits(self, used, units):
        """Whether `units` more fit after `used`: always for a soft quota; for a hard
        one only while used + units <= limit (zero units fit even at the limit)."""
        if not self.hard:
            return True
        return used + units <= self.limit

    def remaining(self, used):
        """Units left this period after `used`, never negative."""
        left = self.limit - used
        return left if left > 0 else 0

    def state(self, used):
        """QUOTA_UNDER, QUOTA_AT_LIMIT or QUOTA_OVERAGE for `used` units."""
        if used < self.limit:
            return QUOTA_UNDER
        if used == self.limit:
            return QUOTA_AT_LIMIT
        return QUOTA_OVERAGE

    def ratelimit_header(self, used, reset_s):
        """The `RateLimit` field value after `used` units, `reset_s` seconds before reset."""
        return f"{self.remaining_prefix}{self.remaining(used)};t={reset_s}"


class PlanQuotas:
    """The quota limits of one plan, by metric; built once per plan and shared by its
    customers. Raises InvalidStateError for two limits on one metric or more than
    MAX_QUOTA_METRICS metrics."""

    def __init__(self, limits):
        self.limits = tuple(limits)
        if len(self.limits) > MAX_QUOTA_METRICS:
            raise InvalidStateError(
                f"a plan can set quotas on at most {MAX_QUOTA_METRICS} metrics, got {len(self.limits)}"
            )
        self.slots = {}
        for slot, limit in enumerate(self.limits):
            if limit.metric in self.slots:
                raise InvalidStateError(f"two quotas for metric {limit.metric!r}")
            self.slots[limit.metric] = slot

    def slot(self, metric):
        """The usage slot of `metric`, or -1 when the plan sets no quota on it."""
        return self.slots.get(metric, -1)

    def limit_at(self, slot):
        """The QuotaLimit in `slot` (from slot())."""
        return self.limits[slot]


NO_QUOTAS = PlanQuotas(())


# Hard quotas shared by several workers are leased: a ledger counts the units leased
# this period and each worker admits only against units leased to it. Near the limit
# no worker gets more than this share of what is left.
LEASE_SPREAD = 8


def grant_size(limit, leased, needed, wanted):
    """How many units to lease now out of `limit`, `leased` being already out: 0 when
    fewer than `needed` are left (or `needed` is negative); otherwise `wanted`, but no
    more than 1/LEASE_SPREAD of what is left, and never less than `needed`. The Redis
    ledger's script (proxy.redis_quota_ledger) applies the same rule."""
    left = limit - leased
    if needed > left or needed < 0:
        return 0
    return max(needed, min(wanted, left // LEASE_SPREAD))
