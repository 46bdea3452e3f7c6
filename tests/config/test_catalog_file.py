# The catalog file: how the example reads, and the exact message and path for each
# mistake an operator could write.
from pathlib import Path

import msgspec
import pytest

from config import ConfigError
from config.catalog_file import document_of, load_catalog_file, parse_catalog_file
from config.proxy_settings import AiMetering

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


def test_the_example_prices_models_and_tools():
    catalog = load_catalog_file(EXAMPLE)
    models = {price.key: price for price in catalog.model_prices}
    assert {"gpt-4o", "gpt-4o-mini"} <= set(models) and any(model.startswith("claude") for model in models)
    assert (models["gpt-4o"].input.nanos, models["gpt-4o"].cached_input.nanos) == (2_500_000_000, 1_250_000_000)
    assert document_of(models["gpt-4o-mini"]) == {"input": "0.15", "output": "0.6", "cached_input": "0.075",
                                                  "cache_write": None, "reasoning": None}
    assert models["claude-sonnet-4-5"].cache_write.nanos == 3_750_000_000
    # Reasoning tokens are metered apart from output tokens, so they cost the output rate.
    assert models["o3-mini"].reasoning == models["o3-mini"].output
    assert {metric.key: metric.priced_by for metric in catalog.metrics if metric.priced_by} == {
        "ai_input_tokens": "input_tokens", "ai_cached_tokens": "cached_input_tokens",
        "ai_cache_write_tokens": "cache_write_tokens", "ai_output_tokens": "output_tokens",
        "ai_reasoning_tokens": "reasoning_tokens", "mcp_tool_calls": "tool_calls"}
    assert {price.key: str(price.per_call) for price in catalog.tool_prices}["web_search"] == "0.01"


def test_the_example_prices_every_metric_an_llm_route_meters_by_default():
    # A route with `ai: {format: ...}` and nothing else meters these metrics.
    route_metrics = set(msgspec.convert({"format": "openai_chat"}, AiMetering).metrics)
    priced = {metric.key for metric in load_catalog_file(EXAMPLE).metrics if metric.priced_by}
    assert route_metrics <= priced


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
     ["catalog.yaml:5: Invalid price: the last tier must be unbounded (up_to: null) - at "
      "`$.plans[0].charges[0].tiers[0].up_to`"]),
    ("plans:\n  - {key: p, tier: t, period: quarter}\n",
     ["catalog.yaml:2: Expected one of `day`, `week`, `month`, `year`, got `quarter` - at `$.plans[0].period`"]),
    ("plans:\n  - {key: p, tier: t, currency: usd}\n",
     ["catalog.yaml:2: Expected a three-letter currency code like `USD`, got `usd` - at `$.plans[0].currency`"]),
    ("plans:\n  - {key: p, tier: t, currency: ABC}\n",
     ["catalog.yaml:2: `ABC` is not an ISO 4217 currency code (like `USD`, `EUR`, `JPY`) - at `$.plans[0].currency`"]),
    ("plans:\n  - {key: p, tier: t, allocated_value: \"-1\"}\n",
     ["catalog.yaml:2: Expected an amount >= 0, got `-1` - at `$.plans[0].allocated_value`"]),
    ("customers:\n  - {key: cus_1, nmae: Acme}\n",
     ["catalog.yaml:2: Object contains unknown field `nmae` - at `$.customers[0]`"]),
    ("subscriptions:\n  - {key: s, customer: c, plan: p, period_anchor: \"2026-11-01T00:00:00\"}\n",
     ["catalog.yaml:2: Timestamp `2026-11-01T00:00:00` has no timezone; add `Z` (UTC) or an offset like "
      "`+01:00` - at `$.subscriptions[0].period_anchor`"]),
    # Price tables and the metrics priced by them.
    ("model_prices:\n  - {key: gpt-4o, input: \"2.50\", cache_read: \"0.30\"}\n",
     ["catalog.yaml:2: Object contains unknown field `cache_read` - at `$.model_prices[0]`"]),
    ("model_prices:\n  - key: gpt-4o\n    input: \"2.50\"\n    output: \"-10\"\n",
     ["catalog.yaml:4: Expected an amount >= 0, got `-10` - at `$.model_prices[0].output`"]),
    ("model_prices:\n  - {key: gpt-4o}\n",
     ["catalog.yaml:2: A model price needs at least one of `input`, `output`, `cached_input`, `cache_write`, "
      "`reasoning` - at `$.model_prices[0]`"]),
    ("model_prices:\n  - {key: gpt-4o, input: \"2.50\"}\n  - {key: gpt-4o, output: \"10\"}\n",
     ["catalog.yaml:3: Duplicate model price `gpt-4o`; first used by `$.model_prices[0]` - at `$.model_prices[1].key`"]),
    ("model_prices:\n  - {key: \"gpt 4o\", input: \"2.50\"}\n",
     ["catalog.yaml:2: Expected a model or tool name (letters, digits, `_`, `.`, `:`, `@`, `/`, `-`), got `gpt 4o` "
      "- at `$.model_prices[0].key`"]),
    ("model_prices:\n  - {key: gpt-4o, input: 2.5e-12}\n",
     ["catalog.yaml:2: Amount `2.5E-12` has more than 9 decimal places - at `$.model_prices[0].input`"]),
    ("tool_prices:\n  - {key: web_search}\n",
     ["catalog.yaml:2: Object missing required field `per_call` - at `$.tool_prices[0]`"]),
    ("tool_prices:\n  - {key: web_search, per_call: free}\n",
     ["catalog.yaml:2: Expected an amount like `\"49.00\"`, got `free` - at `$.tool_prices[0].per_call`"]),
    ("metrics:\n  - {key: t, priced_by: tokens}\n",
     ["catalog.yaml:2: Expected one of `input_tokens`, `output_tokens`, `cached_input_tokens`, "
      "`cache_write_tokens`, `reasoning_tokens`, `tool_calls`, got `tokens` - at `$.metrics[0].priced_by`"]),
    ("metrics:\n  - {key: t, aggregation: max, priced_by: input_tokens}\n",
     ["catalog.yaml:2: `priced_by: input_tokens` prices the quantity of every event; it needs `aggregation: sum`, "
      "not `max` - at `$.metrics[0]`"]),
    ("metrics:\n  - {key: t, aggregation: count, priced_by: reasoning_tokens}\n",
     ["catalog.yaml:2: `priced_by: reasoning_tokens` prices the quantity of every event; it needs "
      "`aggregation: sum`, not `count` - at `$.metrics[0]`"]),
    ("metrics:\n  - {key: t, aggregation: max, priced_by: tool_calls}\n",
     ["catalog.yaml:2: `priced_by: tool_calls` prices the quantity of every event; it needs "
      "`aggregation: sum or count`, not `max` - at `$.metrics[0]`"]),
])
def test_each_mistake_is_reported_with_its_line_and_path(text, expected):
    assert errors_of(text) == expected
