# A guard file drives the decision core end to end: resolve the guard for a customer,
# judge the period's margin against its thresholds, and enforce the resulting level.
from pathlib import Path

import pytest

import config
from control_plane.guard_levels import guard_standing, level_thresholds
from decision_core import (
    ALLOW,
    ALLOW_THROTTLED,
    NO_QUOTAS,
    REJECT,
    CustomerState,
    Graduated,
    PerUnit,
    RequestFacts,
    Tier,
    decide,
    event_revenue,
    margin_level,
    margin_pct,
)

EXAMPLE = Path(config.__file__).parent / "examples" / "guards.yaml"
NOW = 1_700_000_000.0
NANOS = 1_000_000_000


@pytest.fixture(scope="module")
def guards():
    return config.load_guards(EXAMPLE)


def pro_customer(metric, standing, features=("large_models",)):
    return CustomerState("cus_1", "pro", "active", frozenset(features), NO_QUOTAS, {}, {metric: standing}, NOW + 86400)


@pytest.mark.parametrize(
    "margin, current, expected",
    [
        (31, 0, 0), (29, 0, 1), (19, 0, 2), (9, 0, 3),
        (33, 1, 1),   # recovery from level 1 needs 30% + the 5% band
        (35, 1, 0),
        (24, 2, 2), (25, 2, 1),
    ],
)
def test_a_guards_thresholds_and_band_set_the_level(guards, margin, current, expected):
    guard = guards.resolve("cus_1", "pro", "ai_reasoning_tokens")
    assert guard.id == "reasoning-token-safety"
    assert margin_level(margin, level_thresholds(guard), current) == expected


def test_a_guard_without_a_level_2_goes_from_warning_to_blocking(guards):
    guard = guards.resolve("cus_9", "free", "egress_bytes")
    assert guard.id == "default-margin-floor"
    thresholds = level_thresholds(guard)
    assert margin_level(0, thresholds, 0) == 1
    assert margin_level(-11, thresholds, 0) == 3


def test_margin_falling_with_cost_walks_the_ladder_to_a_block(guards):
    # 1M reasoning tokens at $10 per 1M earn $10; provider cost grows call by call.
    guard = guards.resolve("cus_1", "pro", "ai_reasoning_tokens")
    price = PerUnit(10 * NANOS, per_units=1_000_000)
    revenue = sum(event_revenue(price, used, 100_000) for used in range(0, 1_000_000, 100_000))
    level = 0
    seen = []
    for cost_dollars in (5, 7.5, 8.5, 9.5):
        level = margin_level(margin_pct(revenue, cost_dollars * NANOS), level_thresholds(guard), level)
        seen.append(level)
    assert seen == [0, 1, 2, 3]
    state = pro_customer("ai_reasoning_tokens", guard_standing(guard, level, NOW))
    decision = decide(state, RequestFacts(("large_models",), "ai_reasoning_tokens", 1), NOW)
    assert (decision.status, decision.title, decision.retry_after_s) == (429, "Margin Limit Exceeded", 86400)


def test_level_2_throttles_at_the_guards_rate(guards):
    guard = guards.resolve("cus_1", "pro", "ai_reasoning_tokens")   # 5req/sec, burst 5
    state = pro_customer("ai_reasoning_tokens", guard_standing(guard, 2, NOW))
    facts = RequestFacts((), "ai_reasoning_tokens", 1)
    outcomes = [decide(state, facts, NOW).outcome for _ in range(6)]
    assert outcomes == [ALLOW_THROTTLED] * 5 + [REJECT]


def test_a_lock_suspends_only_the_named_features(guards):
    guard = guards.resolve("cus_acme", "enterprise", "api_calls")
    assert guard.id == "acme-compute-lock"
    state = pro_customer("api_calls", guard_standing(guard, 3, NOW), features=("premium_compute",))
    locked = decide(state, RequestFacts(("premium_compute",), "api_calls", 1), NOW)
    core_route = decide(state, RequestFacts((), "api_calls", 1), NOW)
    assert (locked.status, locked.reason) == (429, "feature_locked")
    assert core_route.outcome == ALLOW


def test_a_shadow_guard_reports_and_never_acts(guards):
    guard = guards.resolve("cus_2", "free", "ai_tokens", "shadow")
    assert guard.mode == "shadow"
    state = pro_customer("ai_tokens", guard_standing(guard, 3, NOW))
    decision = decide(state, RequestFacts((), "ai_tokens", 1), NOW)
    assert decision.outcome == ALLOW
    assert decision.shadow == "margin_blocked; guard=free-tier-tokens-trial"


def test_a_shadow_guard_beside_an_enforcing_one_leaves_its_block_in_force(guards):
    enforcing = guards.resolve("cus_2", "free", "ai_tokens")
    shadow = guards.resolve("cus_2", "free", "ai_tokens", "shadow")
    state = pro_customer("ai_tokens", (guard_standing(enforcing, 3, NOW), guard_standing(shadow, 2, NOW)))
    decision = decide(state, RequestFacts((), "ai_tokens", 1), NOW)
    assert (decision.status, decision.guard_id) == (429, "default-margin-floor")
    # Enforcing at 2, shadow at 3: throttled for real, the block only reported.
    state = pro_customer("ai_tokens", (guard_standing(guards.resolve("cus_1", "pro", "ai_reasoning_tokens"), 2, NOW),
                                       guard_standing(shadow, 3, NOW)))
    decision = decide(state, RequestFacts((), "ai_tokens", 1), NOW)
    assert (decision.outcome, decision.guard_id) == (ALLOW_THROTTLED, "reasoning-token-safety")
    assert decision.shadow == "margin_blocked; guard=free-tier-tokens-trial"


def test_graduated_revenue_feeds_margin_exactly():
    # 1,000 free units then 1 cent each: 3,000 units earn $20, cost $5 -> 75% margin.
    price = Graduated([Tier(1000, 0), Tier(None, NANOS // 100)])
    revenue = sum(event_revenue(price, used, 500) for used in range(0, 3000, 500))
    assert revenue == 20 * NANOS
    assert margin_pct(revenue, 5 * NANOS) == 75.0
