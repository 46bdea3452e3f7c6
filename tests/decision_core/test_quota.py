import pytest

from decision_core import (
    MAX_QUOTA_METRICS,
    CustomerState,
    InvalidStateError,
    PlanQuotas,
    QuotaLimit,
)
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
    assert QuotaLimit("api_calls", limit, hard, MONTH_S).admits(used, units) is admitted


@pytest.mark.parametrize(
    "limit, used, remaining, state",
    [(100, 0, 100, QUOTA_UNDER), (100, 100, 0, QUOTA_AT_LIMIT), (100, 150, 0, QUOTA_OVERAGE)],
)
def test_remaining_never_goes_negative(limit, used, remaining, state):
    quota = QuotaLimit("ai_tokens", limit, False, MONTH_S)
    assert quota.remaining(used) == remaining
    assert quota.state(used) == state


def test_headers_follow_the_ietf_ratelimit_draft():
    quota = QuotaLimit("api_calls", 1000, True, MONTH_S)
    assert quota.policy_header == '"api_calls";q=1000;w=2592000'
    assert quota.ratelimit_header(250, 3600) == '"api_calls";r=750;t=3600'


def test_local_usage_counts_at_once_per_metric():
    plan = PlanQuotas([QuotaLimit("api_calls", 2, True, MONTH_S), QuotaLimit("ai_tokens", 10, False, MONTH_S)])
    state = CustomerState("cus_1", "pro", "active", (), plan, {"api_calls": 1}, {}, 1e12)
    state.add_usage("api_calls", 1)
    state.add_usage("ai_tokens", 7)
    state.add_usage("egress_bytes", 100)     # no quota on it: not counted here
    assert (state.quota_used("api_calls"), state.quota_used("ai_tokens"), state.quota_used("egress_bytes")) == (2, 7, 0)


def test_every_quota_slot_holds_its_own_counter():
    plan = PlanQuotas([QuotaLimit(f"metric_{n}", 100, True, MONTH_S) for n in range(MAX_QUOTA_METRICS)])
    usage = {f"metric_{n}": 3 * n + 1 for n in range(MAX_QUOTA_METRICS)}
    state = CustomerState("cus_1", "pro", "active", (), plan, usage, {}, 1e12)
    assert {metric: state.quota_used(metric) for metric in usage} == usage


def test_customers_on_one_plan_count_separately():
    plan = PlanQuotas([QuotaLimit("api_calls", 10, True, MONTH_S)])
    first = CustomerState("cus_1", "pro", "active", (), plan, {}, {}, 1e12)
    second = CustomerState("cus_2", "pro", "active", (), plan, {"api_calls": 4}, {}, 1e12)
    first.add_usage("api_calls", 3)
    assert (first.quota_used("api_calls"), second.quota_used("api_calls")) == (3, 4)


@pytest.mark.parametrize(
    "build",
    [
        lambda: QuotaLimit("api_calls", -1, True, MONTH_S),
        lambda: QuotaLimit("api_calls", 10, True, 0),
        lambda: PlanQuotas([QuotaLimit("api_calls", 1, True, MONTH_S)] * 2),
        lambda: PlanQuotas([QuotaLimit(f"m{n}", 1, True, MONTH_S) for n in range(MAX_QUOTA_METRICS + 1)]),
        lambda: CustomerState("cus_1", "pro", "active", (), PlanQuotas([]), {"api_calls": -1}, {}, 1e12),
        lambda: CustomerState("cus_1", "pro", "active", (), {"api_calls": 1}, {}, {}, 1e12),
    ],
)
def test_impossible_quotas_are_refused(build):
    with pytest.raises(InvalidStateError):
        build()
