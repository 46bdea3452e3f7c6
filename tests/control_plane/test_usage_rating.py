# Rating usage events from stored catalog documents: marginal revenue that sums
# exactly to the period's rated total, unit COGS, and the fixed fee's allocation.
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from config.catalog_file import document_of, load_catalog_file
from control_plane.rating import PlanPricing, metric_from_document, unit_cogs_nanos

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "examples" / "catalog.yaml"
CATALOG = load_catalog_file(EXAMPLE)
PLANS = {plan.key: PlanPricing.from_document(plan.key, document_of(plan)) for plan in CATALOG.plans}
METRICS = {metric.key: metric_from_document(metric.key, document_of(metric)) for metric in CATALOG.metrics}


def test_a_stored_plan_rates_like_the_file_it_came_from():
    pro = PLANS["pro"]
    # 2M tokens at 8.00 per 1M; COGS 2.50 per 1M.
    assert pro.rate(METRICS["ai_tokens"], 0, 2_000_000) == (16_000_000_000, 5_000_000_000)
    # Calls: the first 10,000 free (graduated), then 0.001 each; COGS 0.0001 each.
    assert pro.rate(METRICS["api_calls"], 9_990, 20) == (10_000_000, 2_000_000)
    # No charge for reasoning tokens on pro: no revenue, still a cost.
    assert pro.rate(METRICS["ai_reasoning_tokens"], 0, 1_000_000) == (0, 10_000_000_000)
    assert pro.rate(None, 0, 5) == (0, 0)


def test_the_fixed_fee_is_allocated_as_the_plan_says():
    pro = PLANS["pro"]
    assert pro.fixed_fee_share_nanos("ai_tokens") == 39_200_000_000      # 80% of 49.00
    assert pro.fixed_fee_share_nanos("api_calls") == 9_800_000_000       # 20%
    assert pro.fixed_fee_share_nanos("ai_reasoning_tokens") == 0
    assert PLANS["free"].fixed_fee_share_nanos("api_calls") == 0


@given(st.lists(st.integers(min_value=0, max_value=5_000_000), max_size=40))
def test_event_revenues_sum_exactly_to_the_periods_rated_total(quantities):
    enterprise = PLANS["enterprise"]
    total = 0
    earned = 0
    for quantity in quantities:
        earned += enterprise.rate(METRICS["ai_tokens"], total, quantity).revenue_nanos
        total += quantity
    assert earned == enterprise.charges["ai_tokens"].revenue(total)


def test_unit_cost_is_exact_and_rounds_down_to_a_nano():
    tokens = METRICS["ai_tokens"]          # 2.50 per 1,000,000
    assert unit_cogs_nanos(tokens, 1) == 2_500
    assert unit_cogs_nanos(tokens, 3) == 7_500
    assert unit_cogs_nanos(None, 10) == 0
