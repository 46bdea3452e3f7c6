# Per-model and per-tool COGS: each usage event of a metric `priced_by` tokens or tool
# calls costs its model's price per million tokens or its tool's price per call, at the
# catalog's prices at ingest; a model or tool without a price falls back to the unit
# cost and is flagged in the event's provenance, never rejected. Through the REST API
# on both stores, the customer's margin moves with every event.
import json
from pathlib import Path

import pytest
from running_api import Api, api_test

from config.catalog_file import load_catalog_file, parse_catalog_file
from control_plane.catalog import apply_catalog
from control_plane.price_tables import PriceTables

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "examples" / "catalog.yaml"

TABLES = parse_catalog_file("""\
metrics:
  - {key: input, priced_by: input_tokens, unit_cost: "5.00", cost_per_units: 1000000}
  - {key: cached, priced_by: cached_input_tokens}
  - {key: output, priced_by: output_tokens}
  - {key: reasoning, priced_by: reasoning_tokens}
  - {key: calls, aggregation: count, priced_by: tool_calls, unit_cost: "0.002"}
  - {key: plain, unit_cost: "0.5", cost_per_units: 1000}
model_prices:
  - {key: gpt-4o, input: "2.50", cached_input: "1.25", output: "10.00"}
  - {key: o3-mini, input: "1.10", output: "4.40", reasoning: "4.40"}
  - {key: meta-llama/Llama-3.3-70B, input: "0.000000001"}
tool_prices:
  - {key: web_search, per_call: "0.01"}
""", "catalog.yaml")
METRICS = {metric.key: metric for metric in TABLES.metrics}
PRICES = PriceTables({price.key: price for price in TABLES.model_prices},
                     {price.key: price for price in TABLES.tool_prices})


@pytest.mark.parametrize("metric, quantity, dimensions, cogs_nanos, basis", [
    # Each kind of token at its model's price per million.
    ("input", 1_000_000, {"model": "gpt-4o"}, 2_500_000_000,
     {"priced_by": "input_tokens", "model": "gpt-4o", "price_nanos": 2_500_000_000}),
    ("output", 1_500, {"model": "gpt-4o"}, 15_000_000,
     {"priced_by": "output_tokens", "model": "gpt-4o", "price_nanos": 10_000_000_000}),
    ("reasoning", 250_000, {"model": "o3-mini", "route": "chat"}, 1_100_000_000,
     {"priced_by": "reasoning_tokens", "model": "o3-mini", "price_nanos": 4_400_000_000}),
    # Cached input at the cached price; the same count uncached at the input price.
    ("cached", 1_000_000, {"model": "gpt-4o"}, 1_250_000_000,
     {"priced_by": "cached_input_tokens", "model": "gpt-4o", "price_nanos": 1_250_000_000}),
    ("input", 1_000_000, {"model": "o3-mini"}, 1_100_000_000,
     {"priced_by": "input_tokens", "model": "o3-mini", "price_nanos": 1_100_000_000}),
    # Exact, rounded down to a nano once per event (3 tokens at 2.50 per 1M: 7,500 nanos).
    ("input", 3, {"model": "gpt-4o"}, 7_500,
     {"priced_by": "input_tokens", "model": "gpt-4o", "price_nanos": 2_500_000_000}),
    ("input", 999_999, {"model": "meta-llama/Llama-3.3-70B"}, 0,
     {"priced_by": "input_tokens", "model": "meta-llama/Llama-3.3-70B", "price_nanos": 1}),
    # Tool calls at the tool's price per call.
    ("calls", 3, {"tool": "web_search"}, 30_000_000,
     {"priced_by": "tool_calls", "tool": "web_search", "price_nanos": 10_000_000}),
    # Unknown model: the metric's unit cost when it has one, else nothing; flagged.
    ("input", 2_000_000, {"model": "gpt-9"}, 10_000_000_000,
     {"priced_by": "input_tokens", "model": "gpt-9", "price_missing": True, "fallback": "unit_cost"}),
    ("output", 2_000_000, {"model": "gpt-9"}, 0,
     {"priced_by": "output_tokens", "model": "gpt-9", "price_missing": True, "fallback": "none"}),
    # A known model without a price for this kind of token, and an event with no model.
    ("cached", 1_000, {"model": "o3-mini"}, 0,
     {"priced_by": "cached_input_tokens", "model": "o3-mini", "price_missing": True, "fallback": "none"}),
    ("input", 1_000, {}, 5_000_000,
     {"priced_by": "input_tokens", "model": None, "price_missing": True, "fallback": "unit_cost"}),
    # Unknown tool, and a tool call carrying a model but no tool.
    ("calls", 5, {"tool": "delete_everything"}, 10_000_000,
     {"priced_by": "tool_calls", "tool": "delete_everything", "price_missing": True, "fallback": "unit_cost"}),
    ("calls", 1, {"model": "gpt-4o"}, 2_000_000,
     {"priced_by": "tool_calls", "tool": None, "price_missing": True, "fallback": "unit_cost"}),
    # A metric not priced by the tables: its unit cost, as before, with nothing to record.
    ("plain", 3_000, {"model": "gpt-4o"}, 1_500_000_000, None),
])
def test_each_event_is_priced_by_its_model_or_tool(metric, quantity, dimensions, cogs_nanos, basis):
    cost = PRICES.cost(METRICS[metric], quantity, dimensions)
    assert cost.cogs_nanos == cogs_nanos
    assert (dict(cost.basis) if cost.basis is not None else None) == basis


def test_an_unknown_metric_costs_nothing():
    assert PRICES.cost(None, 10, {"model": "gpt-4o"}) == (0, None)


# NOW (running_api) is 2027-01-15T08:00Z: cus_globex is on pro, in its Jan 15 - Feb 15 period.
def usage(event_id, metric, quantity, **dimensions):
    return {"id": event_id, "customer_id": "cus_globex", "metric": metric, "quantity": quantity,
            "timestamp": "2027-01-15T07:00:00Z", "dimensions": dimensions}


def test_the_margin_moves_with_every_priced_event_and_a_missing_price_is_flagged(backend):
    async def scenario(api):
        await apply_catalog(api.store, load_catalog_file(EXAMPLE), "catalog.yaml", author="test")
        _, _, margin = await api.call("GET", "/v1/customers/cus_globex/margin")
        assert (margin["revenue_nanos"], margin["cogs_nanos"]) == (49_000_000_000, 0)
        cogs = 0
        for event, cost in (
                (usage("e1", "ai_input_tokens", 1_000_000, model="gpt-4o"), 2_500_000_000),
                (usage("e2", "ai_cached_tokens", 1_000_000, model="gpt-4o"), 1_250_000_000),
                (usage("e3", "ai_output_tokens", 200_000, model="gpt-4o-mini"), 120_000_000),
                (usage("e4", "ai_reasoning_tokens", 50_000, model="o3-mini"), 220_000_000),
                (usage("e4w", "ai_cache_write_tokens", 100_000, model="claude-sonnet-4-5"), 375_000_000),
                (usage("e5", "mcp_tool_calls", 3, tool="web_search"), 30_000_000),
                (usage("e6", "ai_input_tokens", 1_000, model="mystery-1"), 2_500_000),     # the unit cost
                (usage("e7", "ai_cached_tokens", 1_000, model="mystery-1"), 0)):     # no unit cost
            status, _, report = await api.call("POST", "/v1/events", [event])
            assert (status, report["accepted"]) == (200, 1)
            cogs += cost
            _, _, margin = await api.call("GET", "/v1/customers/cus_globex/margin")
            assert margin["cogs_nanos"] == cogs
            assert margin["margin_pct"] == pytest.approx((49_000_000_000 - cogs) / 49_000_000_000 * 100)
        by_metric = {row["metric"]: row for row in margin["metrics"]}
        assert by_metric["ai_input_tokens"]["cogs_nanos"] == 2_502_500_000
        assert by_metric["ai_input_tokens"]["units"] == 1_001_000
        assert by_metric["mcp_tool_calls"]["cogs_nanos"] == 30_000_000
        # Every kept event says how its cost was found; the unpriced ones are flagged.
        kept = {event.event_id: json.loads(event.provenance)["pricing"]
                for event in await api.store.events("usage", "cus_globex")}
        assert kept["e1"] == {"subscription": "sub_globex", "plan": "pro", "period_start": "2027-01-15T00:00:00+00:00",
                              "period_end": "2027-02-15T00:00:00+00:00", "priced_by": "input_tokens",
                              "model": "gpt-4o", "price_nanos": 2_500_000_000, "revenue_nanos": 0,
                              "cogs_nanos": 2_500_000_000}
        assert kept["e5"]["tool"] == "web_search" and kept["e5"]["price_nanos"] == 10_000_000
        assert sorted(event_id for event_id, pricing in kept.items() if pricing.get("price_missing")) == ["e6", "e7"]
        assert (kept["e6"]["fallback"], kept["e7"]["fallback"]) == ("unit_cost", "none")
        # A new price applies from the next event on (the catalog version moved); the
        # events already kept keep what they cost.
        status, _, _ = await api.call("PUT", "/v1/model_prices/mystery-1", {"input": "4.00"})
        assert status == 201
        await api.call("POST", "/v1/events", [usage("e8", "ai_input_tokens", 1_000, model="mystery-1")])
        _, _, margin = await api.call("GET", "/v1/customers/cus_globex/margin")
        assert margin["cogs_nanos"] == cogs + 4_000_000
        pricing = json.loads({event.event_id: event for event in await api.store.events("usage", "cus_globex")}
                             ["e8"].provenance)["pricing"]
        assert (pricing.get("price_missing"), pricing["price_nanos"]) == (None, 4_000_000_000)
    api_test(backend, scenario)


def test_a_price_changed_behind_the_apis_back_prices_the_next_batch(backend):
    async def scenario(open_store):
        store = await open_store()
        other = await open_store()            # `aforo apply` or another control plane, on the same database
        await apply_catalog(store, load_catalog_file(EXAMPLE), "catalog.yaml", author="test")
        async with Api(store) as api:
            await api.call("POST", "/v1/events", [usage("t1", "mcp_tool_calls", 2, tool="web_search")])
            await other.put_catalog("tool_price", "web_search", {"per_call": "0.05"}, author="test")
            await api.call("POST", "/v1/events", [usage("t2", "mcp_tool_calls", 2, tool="web_search")])
            await other.delete_catalog("tool_price", "web_search", author="test")
            await api.call("POST", "/v1/events", [usage("t3", "mcp_tool_calls", 2, tool="web_search")])
            costs = {event.event_id: json.loads(event.provenance)["pricing"]["cogs_nanos"]
                     for event in await store.events("usage", "cus_globex")}
            assert costs == {"t1": 20_000_000, "t2": 100_000_000, "t3": 2_000_000}    # t3: the unit cost 0.001
            _, _, margin = await api.call("GET", "/v1/customers/cus_globex/margin")
            assert margin["cogs_nanos"] == 122_000_000
    backend.run(scenario)


def test_model_and_tool_prices_round_trip_through_the_api(backend):
    async def scenario(api):
        gpt = {"input": "2.50", "cached_input": "1.25", "output": "10.00"}
        status, _, body = await api.call("PUT", "/v1/model_prices/gpt-4o", gpt)
        assert (status, body) == (201, {"key": "gpt-4o", "result": "created", "input": "2.5", "output": "10",
                                        "cached_input": "1.25", "cache_write": None, "reasoning": None})
        status, _, body = await api.call("PUT", "/v1/model_prices/gpt-4o", gpt)
        assert (status, body["result"]) == (200, "unchanged")
        status, _, body = await api.call("PUT", "/v1/model_prices/meta-llama%2FLlama-3.3-70B", {"input": "0.59"})
        assert (status, body["key"]) == (201, "meta-llama/Llama-3.3-70B")
        status, _, body = await api.call("GET", "/v1/model_prices/meta-llama%2FLlama-3.3-70B")
        assert (status, body["input"]) == (200, "0.59")
        status, _, body = await api.call("GET", "/v1/model_prices")
        assert [item["key"] for item in body["items"]] == ["gpt-4o", "meta-llama/Llama-3.3-70B"]
        status, _, body = await api.call("PUT", "/v1/tool_prices/web_search", {"per_call": "0.01"})
        assert (status, body) == (201, {"key": "web_search", "result": "created", "per_call": "0.01"})
        status, _, body = await api.call("GET", "/v1/tool_prices")
        assert body == {"items": [{"key": "web_search", "per_call": "0.01"}]}
        for path, document, detail in (
                ("/v1/model_prices/gpt-4o", {"input": "-1"},
                 "invalid model_price: Expected an amount >= 0, got `-1` - at `$.input`"),
                ("/v1/model_prices/gpt-4o", {"cache_read": "1"},
                 "invalid model_price: Object contains unknown field `cache_read`"),
                ("/v1/model_prices/gpt-4o", {},
                 "invalid model_price: A model price needs at least one of `input`, `output`, `cached_input`, "
                 "`cache_write`, `reasoning`"),
                ("/v1/tool_prices/web_search", {"per_call": "0.0000000001"},
                 "invalid tool_price: Amount `1E-10` has more than 9 decimal places - at `$.per_call`"),
                ("/v1/tool_prices/web%20search", {"per_call": "1"},
                 "invalid tool_price: Expected a model or tool name (letters, digits, `_`, `.`, `:`, `@`, `/`, `-`), "
                 "got `web search` - at `$.key`"),
                ("/v1/metrics/tokens", {"aggregation": "max", "priced_by": "output_tokens"},
                 "invalid metric: `priced_by: output_tokens` prices the quantity of every event; it needs "
                 "`aggregation: sum`, not `max`")):
            status, content_type, body = await api.call("PUT", path, document)
            assert (status, content_type, body["detail"]) == (422, "application/problem+json", detail)
        assert (await api.call("GET", "/v1/model_prices/gpt-4o"))[2]["input"] == "2.5"      # unchanged
        assert (await api.call("DELETE", "/v1/model_prices/gpt-4o"))[0] == 204
        assert (await api.call("DELETE", "/v1/model_prices/gpt-4o"))[0] == 404
        status, _, body = await api.call("GET", "/v1/tool_prices/nope")
        assert (status, body["detail"]) == (404, "no tool_price `nope`")
        _, _, document = await api.call("GET", "/openapi.json")
        put = document["paths"]["/v1/model_prices/{key}"]["put"]
        assert put["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ModelPrice"}
        assert {"input", "output", "cached_input", "cache_write", "reasoning"} <= set(
            document["components"]["schemas"]["ModelPrice"]["properties"])
        assert set(document["paths"]["/v1/tool_prices/{key}"]) == {"get", "put", "delete"}
        assert "per_call" in document["components"]["schemas"]["ToolPrice"]["required"]
    api_test(backend, scenario)
