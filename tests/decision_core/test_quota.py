import pytest

from decision_core import InvalidStateError, Quota
from decision_core.quota import QUOTA_AT_LIMIT, QUOTA_OVERAGE, QUOTA_UNDER

MONTH_S = 30 * 86400


@pytest.mark.parametrize(
    "limit, used, hard, units, admitted",
    [
        (100, 0, True, 1, True),
        (100, 99, True, 1, True),       # the last unit fits
        (100, 100, True, 1, False),     # at the limit
        (100, 99, True, 2, False),      # would overshoot
        (100, 100, True, 0, True),      # a zero-unit request never overshoots
        (0, 0, True, 1, False),         # a zero quota admits nothing
        (100, 100, False, 1, True),     # soft: overage allowed (billed)
        (100, 5000, False, 10, True),
    ],
)
def test_hard_quotas_stop_at_the_limit_and_soft_ones_never(limit, used, hard, units, admitted):
    assert Quota("api_calls", limit, used, hard, MONTH_S).admits(units) is admitted


@pytest.mark.parametrize(
    "limit, used, remaining, state",
    [(100, 0, 100, QUOTA_UNDER), (100, 100, 0, QUOTA_AT_LIMIT), (100, 150, 0, QUOTA_OVERAGE)],
)
def test_remaining_never_goes_negative(limit, used, remaining, state):
    quota = Quota("ai_tokens", limit, used, False, MONTH_S)
    assert quota.remaining() == remaining
    assert quota.state() == state


def test_headers_follow_the_ietf_ratelimit_draft():
    quota = Quota("api_calls", 1000, 250, True, MONTH_S)
    assert quota.policy_header == '"api_calls";q=1000;w=2592000'
    assert quota.ratelimit_header(3600) == '"api_calls";r=750;t=3600'


def test_local_usage_counts_at_once():
    quota = Quota("api_calls", 2, 0, True, MONTH_S)
    quota.add_usage(1)
    quota.add_usage(1)
    assert not quota.admits(1)
    assert quota.ratelimit_header(10) == '"api_calls";r=0;t=10'


@pytest.mark.parametrize("limit, used, window_s", [(-1, 0, MONTH_S), (10, -1, MONTH_S), (10, 0, 0)])
def test_impossible_quotas_are_refused(limit, used, window_s):
    with pytest.raises(InvalidStateError):
        Quota("api_calls", limit, used, True, window_s)
