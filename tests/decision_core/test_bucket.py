import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decision_core import RateError, TokenBucket
from decision_core.bucket import shared_interval_us, shared_take

T0 = 1_700_000_000.0


def drain(bucket, now):
    taken = 0
    while bucket.take(now) == 0.0:
        taken += 1
    return taken


@pytest.mark.parametrize(
    "tokens, period_s, burst",
    [(5, 1, 5), (300, 60, 5), (1, 60, 1), (10, 1, 20), (3, 1, 1), (7, 3600, 7)],
)
def test_a_fresh_bucket_admits_exactly_its_burst(tokens, period_s, burst):
    bucket = TokenBucket(tokens, period_s, burst, T0)
    assert drain(bucket, T0) == burst


@pytest.mark.parametrize(
    "tokens, period_s, expected_wait_s",
    [(5, 1, 0.2), (300, 60, 0.2), (1, 60, 60.0), (3, 1, 1 / 3), (10, 1, 0.1)],
)
def test_retry_after_is_the_time_to_the_next_token(tokens, period_s, expected_wait_s):
    bucket = TokenBucket(tokens, period_s, 1, T0)
    assert bucket.take(T0) == 0.0
    wait_s = bucket.take(T0)
    assert wait_s == pytest.approx(expected_wait_s, abs=1e-9)
    # Just before that moment there is still no token; at it there is one.
    assert bucket.take(T0 + wait_s - 1e-3) > 0.0
    assert bucket.take(T0 + wait_s + 1e-6) == 0.0


def test_refill_is_exact_over_many_small_steps():
    # 3 tokens per second, observed every 1/3 s for an hour: exactly one token per step,
    # no drift from rounding (burst 2 so no refill is lost to the cap).
    bucket = TokenBucket(3, 1, 2, 0.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == 0.0
    admitted = 0
    for step in range(1, 3 * 3600 + 1):
        now = step / 3 + 1e-7
        if bucket.take(now) == 0.0:
            admitted += 1
    assert admitted == 3 * 3600


def test_a_clock_that_steps_back_adds_nothing():
    bucket = TokenBucket(1, 1, 1, T0)
    assert bucket.take(T0) == 0.0
    assert bucket.take(T0 - 50) > 0.0
    assert bucket.available(T0 - 100) == 0.0
    assert bucket.take(T0 + 1.0) == 0.0


def test_a_long_idle_period_refills_only_up_to_the_burst():
    bucket = TokenBucket(5, 1, 5, T0)
    drain(bucket, T0)
    assert bucket.available(T0 + 10 * 365 * 86400) == 5.0
    assert drain(bucket, T0 + 10 * 365 * 86400) == 5


@pytest.mark.parametrize(
    "tokens, period_s, burst",
    [(0, 1, 1), (1, 0, 1), (1, 1, 0), (-5, 1, 1), (1, 100 * 365 * 86400, 10**9)],
)
def test_rates_the_bucket_cannot_represent_are_refused(tokens, period_s, burst):
    with pytest.raises(RateError):
        TokenBucket(tokens, period_s, burst, T0)


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.integers(1, 1000),
    period_s=st.sampled_from([1, 60, 3600]),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=200),
)
def test_a_bucket_never_exceeds_its_burst_nor_its_rate(tokens, period_s, burst, gaps):
    bucket = TokenBucket(tokens, period_s, burst, T0)
    now = T0
    admitted = 0
    for gap in gaps:
        now += gap
        assert bucket.available(now) <= burst
        if bucket.take(now) == 0.0:
            admitted += 1
    # Over any run: at most the burst plus what the rate refilled (time quantised to ns).
    elapsed = now - T0
    assert admitted <= burst + math.floor(elapsed * tokens / period_s + 1e-6)


# -- fed buckets and the bucket shared by every worker ------------------------------------

def test_a_fed_bucket_admits_only_what_it_was_fed():
    bucket = TokenBucket(2, 1, 4, T0, fed=True)
    assert bucket.take(T0 + 3600) > 0                   # time adds nothing
    bucket.feed(3)
    assert [bucket.take(T0) for _ in range(4)][:3] == [0.0, 0.0, 0.0]
    bucket.feed(100)
    assert bucket.available(T0) == 4                    # never beyond the burst
    bucket.drain()
    assert bucket.take(T0) > 0
    bucket.run_on_time(T0, fed=False)                   # the shared bucket cannot be asked
    assert drain(bucket, T0) == 4 and bucket.take(T0 + 0.5) == 0.0


def test_the_shared_bucket_grants_its_burst_then_one_token_per_interval():
    interval = shared_interval_us(2, 1)                 # 2 per second
    assert interval == 500_000
    granted, tat, wait = shared_take(0, 10_000_000, interval, 3, 5)
    assert (granted, wait) == (3, 0)
    assert shared_take(tat, 10_000_000, interval, 3, 1) == (0, tat, 500_000)
    assert shared_take(tat, 10_400_000, interval, 3, 1) == (0, tat, 100_000)
    assert shared_take(tat, 10_500_000, interval, 3, 2)[:1] == (1,)
    assert shared_interval_us(3, 1) == 333_334           # rounded up: never above the rate


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.integers(1, 100),
    per_s=st.sampled_from([1, 60]),
    burst=st.integers(1, 20),
    asks=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3_000_000), st.integers(1, 10)),
                  min_size=1, max_size=200),
)
def test_workers_sharing_a_bucket_never_get_more_than_the_burst_plus_the_rate(tokens, per_s, burst, asks):
    # Any number of workers asking at any moments for any numbers of tokens: in every
    # span of time, the tokens granted are at most the burst plus the rate's worth.
    interval = shared_interval_us(tokens, per_s)
    tat, now = 0, 1_700_000_000_000_000
    grants = []
    for _worker, gap_us, wanted in asks:
        now += gap_us
        granted, tat, wait = shared_take(tat, now, interval, burst, wanted)
        assert 0 <= granted <= wanted and (granted > 0 or wait > 0)
        grants.append((now, granted))
    for first in range(len(grants)):
        total = 0
        for at, granted in grants[first:]:
            total += granted
            assert total <= burst + (at - grants[first][0]) // interval
