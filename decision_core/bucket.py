# Token bucket for the level-2 throttle, in exact integer arithmetic.
# Credit is counted in token-nanoseconds: time adds `tokens_per_period` credit per
# nanosecond and one token costs `period_ns`, so refills never drift or round.
# The bucket never holds more than `burst` tokens and a clock that goes backwards
# refills nothing.
#
# A bucket can instead be fed: time adds nothing, and tokens arrive only from a
# bucket shared by every worker of a deployment (proxy.throttle_leases), whose rule
# is shared_take() below, so one customer's throttle holds across all of them.

import cython

from decision_core.errors import RateError

NS_PER_S = 1_000_000_000
# Credit values stay far below 2**63 so integer products never overflow.
MAX_CAPACITY = 1 << 62


def _to_ns(now):
    # Seconds -> whole nanoseconds, truncated (exact for any clock within +-292 years of 0).
    if cython.compiled:
        return cython.cast(cython.longlong, now * NS_PER_S)
    return int(now * NS_PER_S)


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


class TokenBucket:
    """Admit up to `tokens` requests per `period_s` seconds with bursts of `burst`.

    The bucket starts full at `now` (seconds, any epoch the caller uses consistently).
    Raises RateError when tokens, period or burst are not positive or too large.
    """

    def __init__(self, tokens, period_s, burst, now, fed=False):
        if tokens < 1 or period_s <= 0 or burst < 1:
            raise RateError(
                f"throttle rate needs tokens >= 1, period > 0 and burst >= 1, "
                f"got {tokens} per {period_s}s, burst {burst}"
            )
        period_ns = int(round(period_s * NS_PER_S))
        divisor = _gcd(int(tokens), period_ns)
        rate_tokens = int(tokens) // divisor
        period_ns = period_ns // divisor
        capacity = int(burst) * period_ns
        if capacity >= MAX_CAPACITY or rate_tokens >= MAX_CAPACITY // NS_PER_S:
            raise RateError(f"throttle rate {tokens} per {period_s}s with burst {burst} is too large")
        self.tokens_per_period = rate_tokens
        self.period_ns = period_ns
        self.capacity = capacity
        self.burst = int(burst)
        self.fed = bool(fed)
        self.credit = 0 if self.fed else capacity
        self.updated_ns = _to_ns(now)

    def _refill(self, now_ns):
        if self.fed:
            return
        elapsed_ns = now_ns - self.updated_ns
        if elapsed_ns <= 0:
            # Same instant or a clock that stepped back: nothing to add, keep the later mark.
            return
        missing = self.capacity - self.credit
        if elapsed_ns > missing // self.tokens_per_period:
            self.credit = self.capacity
        else:
            self.credit += elapsed_ns * self.tokens_per_period
        self.updated_ns = now_ns

    def take(self, now):
        """Take one token at `now` (seconds).

        Returns 0.0 when the token was taken, otherwise the seconds until the next
        token is available (> 0; the caller's Retry-After is its ceiling).
        """
        self._refill(_to_ns(now))
        if self.credit >= self.period_ns:
            self.credit -= self.period_ns
            return 0.0
        # Ceil division: the first whole nanosecond at which a full token exists.
        wait_ns = (self.period_ns - self.credit + self.tokens_per_period - 1) // self.tokens_per_period
        return wait_ns / NS_PER_S

    def feed(self, tokens):
        """Add `tokens` from the shared bucket (never beyond the burst)."""
        credit = self.credit + tokens * self.period_ns
        self.credit = credit if credit < self.capacity else self.capacity

    def drain(self):
        """Drop every token held (fed tokens nobody took: they are not kept for later)."""
        self.credit = 0

    def run_on_time(self, now, fed):
        """From `now` on, refill by time (fed False: the shared bucket cannot be
        asked; the bucket starts full, as a new one does) or only when fed (empty)."""
        self.fed = bool(fed)
        self.credit = 0 if self.fed else self.capacity
        self.updated_ns = _to_ns(now)

    def available(self, now):
        """Tokens available at `now` (fractional), never more than the burst."""
        self._refill(_to_ns(now))
        return self.credit / self.period_ns


US_PER_S = 1_000_000


def shared_interval_us(tokens, period_s):
    """Whole microseconds between two tokens of a shared bucket for `tokens` per
    `period_s` (rounded up: the shared rate is never above the guard's)."""
    period_us = int(round(period_s * US_PER_S))
    return max(1, (period_us + int(tokens) - 1) // int(tokens))


def shared_take(tat_us, now_us, interval_us, burst, wanted):
    """One take from a bucket shared by many workers, kept as the time its tokens are
    spent up to (`tat_us`, the generic cell rate algorithm; 0 = a full bucket) at
    `now_us`: returns (granted, new tat, wait). Grants up to `wanted` tokens of those
    there are (the bucket holds `burst` at most, one more every `interval_us`), so in
    any span of L microseconds no more than burst + L / interval_us are granted; with
    none there, 0 and the microseconds until one is (the tat unchanged). The Redis
    ledger's script (proxy.redis_quota_ledger) applies the same rule."""
    base = tat_us if tat_us > now_us else now_us
    there = (now_us + burst * interval_us - base) // interval_us
    if there < 1:
        return 0, tat_us, base + interval_us - burst * interval_us - now_us
    granted = wanted if wanted < there else there
    if granted < 1:
        return 0, tat_us, 0                     # nothing asked for
    return granted, base + granted * interval_us, 0
