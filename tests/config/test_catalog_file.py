# The catalog file: how the example reads, and the exact message and path for each
# mistake an operator could write.
from pathlib import Path

import pytest

from config import ConfigError
from config.catalog_file import document_of, load_catalog_file, parse_catalog_file

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "examples" / "catalog.yaml"


def test_the_example_reads_with_exact_money():
    catalog = load_catalog_file(EXAMPLE)
    pro = {plan.key: plan for plan in catalog.plans}["pro"]
    assert pro.fixed_fee.nanos == 49_000_000_000
    assert str(pro.fixed_fee) == "49"
    assert pro.charges[0].pricing().revenue(2_000_000) == 16_000_000_000      # 2M tokens at 8.00 per 1M
    assert pro.charges[1].pricing().revenue(10_500) == 500_000_000            # 500 calls past the free 10,000
    tokens = {metric.key: metric for metric in catalog.metrics}["ai_tokens"]
    assert (tokens.unit_cost.nanos, tokens.cost_per_units) == (2_500_000_000, 1_000_000)
    assert document_of(catalog.subscriptions[0]) == {
        "customer": "cus_acme", "plan": "enterprise", "period_anchor": "2026-11-01T00:00:00Z", "status": "active"}


def errors_of(text):
    with pytest.raises(ConfigError) as caught:
        parse_catalog_file(text, "catalog.yaml")
    return [str(error) for error in caught.value.errors]


@pytest.mark.parametrize("text, expected", [
    ("metrics:\n  - {key: a}\n  - {key: a}\n",
     ["catalog.yaml:3: Duplicate metric `a`; first used by `$.metrics[0]` - at `$.metrics[1].key`"]),
    ("plans:\n  - {key: p, tier: t, fee_allocation: {a: 60%, b: 30%}}\n",
     ["catalog.yaml:2: Fee allocation shares add up to 90%, not 100% - at `$.plans[0].fee_allocation`"]),
    ("plans:\n  - {key: p, tier: t, fixed_fee: \"1.0000000001\"}\n",
     ["catalog.yaml:2: Amount `1.0000000001` has more than 9 decimal places - at `$.plans[0].fixed_fee`"]),
    ("plans:\n  - {key: p, tier: t, fixed_fee: -1}\n",
     ["catalog.yaml:2: Expected an amount >= 0, got `-1` - at `$.plans[0].fixed_fee`"]),
    ("plans:\n  - key: p\n    tier: t\n    charges:\n      - {metric: a, model: per_unit}\n",
     ["catalog.yaml:5: `model: per_unit` needs a `price` - at `$.plans[0].charges[0]`"]),
    ("plans:\n  - key: p\n    tier: t\n    charges:\n      - {metric: a, model: graduated, tiers: [{up_to: 10, price: \"1\"}]}\n",
     ["catalog.yaml:5: Invalid price: the last tier must be unbounded (up_to: null) - at `$.plans[0].charges[0]`"]),
    ("plans:\n  - {key: p, tier: t, period: quarter}\n",
     ["catalog.yaml:2: Invalid enum value 'quarter' - at `$.plans[0].period`"]),
    ("plans:\n  - {key: p, tier: t, currency: usd}\n",
     ["catalog.yaml:2: Expected a three-letter currency code like `USD`, got `usd` - at `$.plans[0].currency`"]),
    ("customers:\n  - {key: cus_1, nmae: Acme}\n",
     ["catalog.yaml:2: Object contains unknown field `nmae` - at `$.customers[0]`"]),
    ("subscriptions:\n  - {key: s, customer: c, plan: p, period_anchor: \"2026-11-01T00:00:00\"}\n",
     ["catalog.yaml:2: Timestamp `2026-11-01T00:00:00` has no timezone; add `Z` (UTC) or an offset like "
      "`+01:00` - at `$.subscriptions[0].period_anchor`"]),
])
def test_each_mistake_is_reported_with_its_line_and_path(text, expected):
    assert errors_of(text) == expected
