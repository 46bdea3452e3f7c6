# Quotas: usage this billing period against the plan's limit for one metric.
# A hard quota admits a request only while used + units <= limit; a soft quota always
# admits (the overage is billed). Header values follow the IETF httpapi
# ratelimit-headers draft: `RateLimit-Policy: "<metric>";q=<limit>;w=<period s>` and
# `RateLimit: "<metric>";r=<remaining>;t=<seconds to reset>`.

from decision_core.errors import InvalidStateError

QUOTA_UNDER = 0       # usage below the limit
QUOTA_AT_LIMIT = 1    # usage exactly at the limit: a hard quota admits nothing more
QUOTA_OVERAGE = 2     # usage above the limit: only a soft quota gets here (billed overage)

# Customers on one plan share their quota's header texts, so the hot path reads one
# shared object instead of one per customer. Bounded: cleared when it grows past this.
POLICY_CACHE_MAX = 100_000
_POLICY_TEXTS = {}


def _policy_texts(metric, limit, window_s):
    key = (metric, limit, window_s)
    texts = _POLICY_TEXTS.get(key)
    if texts is None:
        if len(_POLICY_TEXTS) >= POLICY_CACHE_MAX:
            _POLICY_TEXTS.clear()
        texts = (("RateLimit-Policy", f'"{metric}";q={limit};w={window_s}'), f'"{metric}";r=')
        _POLICY_TEXTS[key] = texts
    return texts


class Quota:
    """One metric's quota for a customer's current period.

    `limit` and `used` are whole units of the metric; `window_s` is the billing
    period length in seconds (advertised as the policy window). Raises
    InvalidStateError for a negative limit, negative usage or a non-positive window.
    """

    def __init__(self, metric, limit, used, hard, window_s):
        if limit < 0 or used < 0 or window_s <= 0:
            raise InvalidStateError(
                f"quota for {metric!r} needs limit >= 0, used >= 0 and window > 0, "
                f"got limit={limit} used={used} window={window_s}"
            )
        self.metric = metric
        self.limit = limit
        self.used = used
        self.hard = bool(hard)
        self.window_s = int(window_s)
        # policy_field: the shared ("RateLimit-Policy", value) pair for this quota.
        self.policy_field, self.remaining_prefix = _policy_texts(metric, limit, self.window_s)

    def admits(self, units):
        """Whether `units` more fit: always for a soft quota; for a hard one only
        while used + units <= limit (a zero-unit request fits even at the limit)."""
        if not self.hard:
            return True
        return self.used + units <= self.limit

    @property
    def policy_header(self):
        """The `RateLimit-Policy` field value."""
        return self.policy_field[1]

    def remaining(self):
        """Units left this period, never negative (0 once a soft quota is in overage)."""
        left = self.limit - self.used
        return left if left > 0 else 0

    def state(self):
        """QUOTA_UNDER, QUOTA_AT_LIMIT or QUOTA_OVERAGE."""
        if self.used < self.limit:
            return QUOTA_UNDER
        if self.used == self.limit:
            return QUOTA_AT_LIMIT
        return QUOTA_OVERAGE

    def ratelimit_header(self, reset_s):
        """The `RateLimit` field value with `reset_s` seconds until the period resets."""
        return f"{self.remaining_prefix}{self.remaining()};t={reset_s}"

    def add_usage(self, units):
        """Count `units` used at once (the proxy's local counter between syncs)."""
        self.used += units
