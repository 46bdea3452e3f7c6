import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decision_core import (
    ALLOW,
    ALLOW_THROTTLED,
    OVERALL,
    REJECT,
    CustomerState,
    GuardStanding,
    InvalidStateError,
    PlanQuotas,
    QuotaLimit,
    RequestFacts,
    TokenBucket,
    decide,
)
from decision_core.decide import quota_refusal

NOW = 1_700_000_000.0
PERIOD_END = NOW + 3600.5  # Retry-After to the period end: 3601 s
MONTH_S = 30 * 86400


def customer(status="active", features=("large_models",), quota=None, levels=None, period_end=PERIOD_END):
    # quota: (QuotaLimit on ai_tokens, units used) or None
    plan = PlanQuotas([] if quota is None else [quota[0]])
    usage = {} if quota is None else {"ai_tokens": quota[1]}
    return CustomerState("cus_1", "pro", status, features, plan, usage, levels or {}, period_end)


def standing(level, enforce=True, locked=(), rate=(5, 1, 5), guard_id="g-tokens"):
    bucket = TokenBucket(*rate, NOW) if level == 2 else None
    return GuardStanding(guard_id, level, enforce, bucket, frozenset(locked))


def hard_quota(used, limit=1000):
    return QuotaLimit("ai_tokens", limit, True, MONTH_S), used


FACTS = RequestFacts(("large_models",), "ai_tokens", 10)


def headers(decision):
    return dict(decision.headers)


# Each row: the state, then (outcome, status, reason, retry_after_s). Rows with several
# refusals at once pin down which one wins.
@pytest.mark.parametrize(
    "state, expected",
    [
        (customer(), (ALLOW, 0, "allowed", 0)),
        (customer(status="trialing"), (ALLOW, 0, "allowed", 0)),
        (customer(status="past_due"), (REJECT, 403, "subscription_inactive", 0)),
        (customer(status="canceled"), (REJECT, 403, "subscription_inactive", 0)),
        (customer(features=()), (REJECT, 403, "feature_not_entitled", 0)),
        (customer(quota=hard_quota(995)), (REJECT, 429, "quota_exceeded", 3601)),
        (customer(quota=hard_quota(990)), (ALLOW, 0, "allowed", 0)),
        (customer(levels={"ai_tokens": standing(3)}), (REJECT, 429, "margin_blocked", 3601)),
        (customer(levels={OVERALL: standing(3)}), (REJECT, 429, "margin_blocked", 3601)),
        (customer(levels={"ai_tokens": standing(2)}), (ALLOW_THROTTLED, 0, "throttle", 0)),
        (customer(levels={"ai_tokens": standing(1)}), (ALLOW, 0, "allowed", 0)),
        (customer(levels={"api_calls": standing(3)}), (ALLOW, 0, "allowed", 0)),   # other metric
        (customer(levels={"ai_tokens": standing(3, locked=["large_models"])}), (REJECT, 429, "feature_locked", 3601)),
        (customer(levels={"ai_tokens": standing(3, locked=["premium_compute"])}), (ALLOW, 0, "allowed", 0)),
        # precedence: subscription > entitlement > quota > margin block > throttle
        (customer(status="canceled", features=(), quota=hard_quota(1000), levels={"ai_tokens": standing(3)}),
         (REJECT, 403, "subscription_inactive", 0)),
        (customer(features=(), quota=hard_quota(1000), levels={"ai_tokens": standing(3)}),
         (REJECT, 403, "feature_not_entitled", 0)),
        (customer(quota=hard_quota(1000), levels={"ai_tokens": standing(3)}), (REJECT, 429, "quota_exceeded", 3601)),
        (customer(levels={"ai_tokens": standing(2), OVERALL: standing(3)}), (REJECT, 429, "margin_blocked", 3601)),
        # a period that has ended: its quota and margin state no longer apply
        (customer(quota=hard_quota(1000), levels={"ai_tokens": standing(3)}, period_end=NOW),
         (ALLOW, 0, "allowed", 0)),
        # shadow-mode guards never act
        (customer(levels={"ai_tokens": standing(3, enforce=False)}), (ALLOW, 0, "allowed", 0)),
        (customer(levels={"ai_tokens": standing(2, enforce=False)}), (ALLOW, 0, "allowed", 0)),
    ],
)
def test_decision_contract_and_precedence(state, expected):
    decision = decide(state, FACTS, NOW)
    assert (decision.outcome, decision.status, decision.reason, decision.retry_after_s) == expected
    if decision.retry_after_s:
        assert headers(decision)["Retry-After"] == str(decision.retry_after_s)
    else:
        assert "Retry-After" not in headers(decision)


def test_problem_details_say_what_is_wrong():
    assert decide(customer(status="past_due"), FACTS, NOW).detail == "subscription is past_due"
    no_feature = decide(customer(features=()), FACTS, NOW)
    assert no_feature.title == "Feature Not In Plan"
    assert "'large_models'" in no_feature.detail
    blocked = decide(customer(levels={"ai_tokens": standing(3)}), FACTS, NOW)
    assert blocked.title == "Margin Limit Exceeded"
    assert blocked.guard_id == "g-tokens"
    locked = decide(customer(levels={"ai_tokens": standing(3, locked=["large_models"])}), FACTS, NOW)
    assert locked.title == "Margin Limit Exceeded"
    assert "locks feature 'large_models'" in locked.detail


def test_allowed_requests_carry_the_quota_headers():
    decision = decide(customer(quota=hard_quota(250)), FACTS, NOW)
    assert headers(decision) == {
        "RateLimit-Policy": '"ai_tokens";q=1000;w=2592000',
        "RateLimit": '"ai_tokens";r=740;t=3601',   # after this request's 10 units
    }


def test_a_refused_quota_reports_what_is_left():
    decision = decide(customer(quota=hard_quota(995)), FACTS, NOW)
    assert headers(decision)["RateLimit"] == '"ai_tokens";r=5;t=3601'


def test_soft_quota_allows_overage():
    decision = decide(customer(quota=(QuotaLimit("ai_tokens", 1000, False, MONTH_S), 5000)), FACTS, NOW)
    assert decision.outcome == ALLOW
    assert headers(decision)["RateLimit"] == '"ai_tokens";r=0;t=3601'


def test_level_2_marks_allowed_requests_then_limits_the_rate():
    state = customer(levels={"ai_tokens": standing(2, rate=(2, 1, 2))})
    first, second, third = (decide(state, FACTS, NOW) for _ in range(3))
    assert headers(first)["X-Aforo-Throttle"] == "true"
    assert headers(second)["X-Aforo-Throttle"] == "true"
    assert (third.status, third.reason, third.retry_after_s) == (429, "throttled", 1)
    assert "X-Aforo-Throttle" not in headers(third)
    # Half a second later the bucket has refilled one token.
    assert decide(state, FACTS, NOW + 0.5).outcome == ALLOW_THROTTLED


def test_a_slow_throttle_rate_sets_retry_after_from_the_bucket():
    state = customer(levels={"ai_tokens": standing(2, rate=(1, 60, 1))})
    assert decide(state, FACTS, NOW).outcome == ALLOW_THROTTLED
    refused = decide(state, FACTS, NOW + 15)
    assert refused.retry_after_s == 45


def test_a_blocked_request_takes_no_throttle_token():
    throttle = standing(2, rate=(1, 60, 1))
    state = customer(levels={"ai_tokens": throttle, OVERALL: standing(3, guard_id="g-overall")})
    assert decide(state, FACTS, NOW).guard_id == "g-overall"
    assert throttle.bucket.available(NOW) == 1.0


def test_both_metric_and_overall_throttles_must_admit():
    state = customer(levels={"ai_tokens": standing(2, rate=(10, 1, 10)),
                             OVERALL: standing(2, rate=(1, 60, 1), guard_id="g-overall")})
    assert decide(state, FACTS, NOW).outcome == ALLOW_THROTTLED
    refused = decide(state, FACTS, NOW)
    assert (refused.reason, refused.guard_id) == ("throttled", "g-overall")


@pytest.mark.parametrize(
    "shadow_standing, header",
    [
        (standing(3, enforce=False, guard_id="g-shadow"), "margin_blocked; guard=g-shadow"),
        (standing(3, enforce=False, locked=["large_models"], guard_id="g-shadow"), "feature_locked; guard=g-shadow"),
        (standing(2, enforce=False, guard_id="g-shadow"), "throttle; guard=g-shadow"),
        (standing(2, enforce=False, rate=(1, 60, 1), guard_id="g-shadow"), "throttle; guard=g-shadow"),
    ],
)
def test_shadow_guards_only_say_what_would_have_happened(shadow_standing, header):
    state = customer(levels={"ai_tokens": shadow_standing})
    decision = decide(state, FACTS, NOW)
    assert decision.outcome == ALLOW
    assert headers(decision)["X-Aforo-Shadow"] == header


def test_a_shadow_throttle_reports_the_refusal_it_would_have_made():
    state = customer(levels={"ai_tokens": standing(2, enforce=False, rate=(1, 60, 1), guard_id="g-shadow")})
    decide(state, FACTS, NOW)
    second = decide(state, FACTS, NOW)
    assert second.outcome == ALLOW
    assert headers(second)["X-Aforo-Shadow"] == "throttled; guard=g-shadow"


def test_retry_after_is_never_zero_at_the_end_of_a_period():
    state = customer(quota=hard_quota(1000), period_end=NOW + 0.001)
    assert decide(state, FACTS, NOW).retry_after_s == 1


def test_decide_does_not_count_usage():
    state = customer(quota=hard_quota(0, limit=10))
    for _ in range(5):
        decide(state, FACTS, NOW)
    assert state.quota_used("ai_tokens") == 0


@pytest.mark.parametrize(
    "build",
    [
        lambda: customer(status="unknown"),
        lambda: GuardStanding("g", 4),
        lambda: GuardStanding("g", 2),                # level 2 needs a bucket
        lambda: GuardStanding("g", 3, model_map={"gpt-4o": "gpt-4o-mini"}),   # downgrades are level 2's
        lambda: RequestFacts((), "ai_tokens", -1),
    ],
)
def test_state_that_cannot_be_decided_on_is_refused(build):
    with pytest.raises(InvalidStateError):
        build()


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(0, 200), sizes=st.lists(st.integers(0, 20), max_size=100))
def test_admitted_usage_never_exceeds_a_hard_quota(limit, sizes):
    state = customer(quota=hard_quota(0, limit=limit))
    for units in sizes:
        if decide(state, RequestFacts(("large_models",), "ai_tokens", units), NOW).outcome != REJECT:
            state.add_usage("ai_tokens", units)
    assert state.quota_used("ai_tokens") <= limit


def downgrading(models, enforce=True, guard_id="g-tokens"):
    return GuardStanding(guard_id, 2, enforce, TokenBucket(5, 1, 5, NOW), model_map=models)


def test_a_throttled_request_carries_the_model_downgrades_of_its_guard():
    assert decide(customer(), FACTS, NOW).model_map is None
    assert decide(customer(levels={"ai_tokens": standing(2)}), FACTS, NOW).model_map is None
    state = customer(levels={"ai_tokens": downgrading({"gpt-4o": "gpt-4o-mini"}),
                             OVERALL: downgrading({"gpt-4o": "gpt-3.5", "o3": "o3-mini"}, guard_id="g-all")})
    # The metric's guard speaks first.
    assert decide(state, FACTS, NOW).model_map == {"gpt-4o": "gpt-4o-mini"}
    state = customer(levels={OVERALL: downgrading({"o3": "o3-mini"}, guard_id="g-all")})
    assert decide(state, FACTS, NOW).model_map == {"o3": "o3-mini"}
    # A shadow guard downgrades nothing, and neither does a refusal.
    assert decide(customer(levels={OVERALL: downgrading({"o3": "o3-mini"}, enforce=False)}), FACTS, NOW).model_map \
        is None
    throttled = customer(levels={OVERALL: GuardStanding("g", 2, True, TokenBucket(1, 1, 1, NOW), model_map={"a": "b"})})
    decide(throttled, FACTS, NOW)
    refused = decide(throttled, FACTS, NOW)
    assert (refused.outcome, refused.model_map) == (REJECT, None)


def test_a_quota_refusal_for_units_known_after_the_decision():
    state = customer(quota=hard_quota(990))
    assert quota_refusal(state, "ai_tokens", 10, NOW) is None
    refusal = quota_refusal(state, "ai_tokens", 11, NOW)
    assert (refusal.outcome, refusal.status, refusal.reason, refusal.retry_after_s) == (REJECT, 429, "quota_exceeded",
                                                                                      3601)
    assert headers(refusal) == {"RateLimit-Policy": '"ai_tokens";q=1000;w=2592000',
                                "RateLimit": '"ai_tokens";r=10;t=3601', "Retry-After": "3601"}
    assert refusal.detail == decide(customer(quota=hard_quota(995)), FACTS, NOW).detail
    # No quota on the metric, a soft quota, or a period that has ended: nothing to refuse.
    assert quota_refusal(state, "ai_output_tokens", 10**9, NOW) is None
    assert quota_refusal(customer(quota=(QuotaLimit("ai_tokens", 10, False, MONTH_S), 50)), "ai_tokens", 5, NOW) is None
    assert quota_refusal(state, "ai_tokens", 11, PERIOD_END) is None
    assert state.quota_used("ai_tokens") == 990                 # it counts nothing


def test_the_guards_of_the_other_metrics_a_request_meters_act_on_it_too():
    # An LLM call counts api_calls up front and its tokens once answered.
    call = RequestFacts(("large_models",), "api_calls", 1, ("ai_input_tokens", "ai_output_tokens"))
    blocked = customer(levels={"ai_output_tokens": standing(3, guard_id="g-output")})
    decision = decide(blocked, call, NOW)
    assert (decision.outcome, decision.reason, decision.guard_id) == (REJECT, "margin_blocked", "g-output")
    throttled = customer(levels={"ai_input_tokens": downgrading({"gpt-4o": "gpt-4o-mini"}, guard_id="g-input")})
    decision = decide(throttled, call, NOW)
    assert (decision.outcome, decision.guard_id, decision.model_map) == (ALLOW_THROTTLED, "g-input",
                                                                          {"gpt-4o": "gpt-4o-mini"})
    # A guard on a metric the request does not meter leaves it alone.
    assert decide(customer(levels={"ai_reasoning_tokens": standing(3)}), call, NOW).outcome == ALLOW
