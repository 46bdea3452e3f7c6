# Money a finance team can trust, on both stores: amounts in different currencies are
# never added (per-currency P&L totals; one grand total only at rates the operator set,
# stated in the answer), and a plan that earns nothing is governed by the value
# allocated to it, never blocked for the month by its first cent of cost.
import pytest
from running_api import Api

from config.control_plane_settings import Reporting
from config.guards import watch_guards
from config.values import Money

ANCHOR = "2027-01-01T00:00:00Z"          # NOW (2027-01-15) is in the January period
CATALOG = {
    "metric": {"api_calls": {"aggregation": "count"}},
    "plan": {
        "usd_pro": {"tier": "pro", "currency": "USD", "fixed_fee": "100.00"},
        "eur_pro": {"tier": "pro", "currency": "EUR", "fixed_fee": "50.00"},
        "free": {"tier": "free"},
        "free_allocated": {"tier": "free", "allocated_value": "1.00"},
    },
    "customer": {"cus_us": {}, "cus_eu": {}, "cus_free": {}, "cus_alloc": {}},
    "subscription": {
        "sub_us": {"customer": "cus_us", "plan": "usd_pro", "period_anchor": ANCHOR},
        "sub_eu": {"customer": "cus_eu", "plan": "eur_pro", "period_anchor": ANCHOR},
        "sub_free": {"customer": "cus_free", "plan": "free", "period_anchor": ANCHOR},
        "sub_alloc": {"customer": "cus_alloc", "plan": "free_allocated", "period_anchor": ANCHOR},
    },
}
# The seeds' rule: the free tier gets a 5 % margin floor, blocked below it.
FREE_TIER_FLOOR = """\
guards:
  - id: free-floor
    metric: overall
    scope: {tier: free}
    min_margin: 5%
    actions:
      level_3: {threshold: 5%, action: block_request}
"""


async def with_catalog(api):
    for kind, entries in CATALOG.items():
        for key, document in entries.items():
            status, _, body = await api.call("PUT", f"/v1/{kind}s/{key}", document)
            assert status == 201, body


def cost(event_id, customer, amount):
    return [{"id": event_id, "customer_id": customer, "amount": amount, "timestamp": "2027-01-15T07:00:00Z"}]


def run_api(backend, scenario, **options):
    async def run(open_store):
        api = Api(await open_store())
        api.app_options = options
        async with api:
            await with_catalog(api)
            await scenario(api)
    backend.run(run)


def test_the_pnl_never_adds_two_currencies_without_a_rate(backend):
    async def scenario(api):
        await api.call("POST", "/v1/costs", cost("c1", "cus_us", "30.00"))
        await api.call("POST", "/v1/costs", cost("c2", "cus_eu", "10.00"))
        status, _, pnl = await api.call("GET", "/v1/reports/pnl")
        assert status == 200
        by_currency = {row["currency"]: row for row in pnl["by_currency"]}
        assert (by_currency["USD"]["revenue_nanos"], by_currency["USD"]["cogs_nanos"]) == (100 * 10**9, 30 * 10**9)
        assert (by_currency["EUR"]["revenue_nanos"], by_currency["EUR"]["cogs_nanos"]) == (50 * 10**9, 10 * 10**9)
        assert by_currency["EUR"]["margin_pct"] == 80.0
        # No grand total: it would add dollars to euros.
        assert (pnl["currency"], pnl["revenue_nanos"], pnl["cogs_nanos"]) == (None, None, None)
        assert pnl["missing_rates"] == ["EUR", "USD"]
        assert {row["customer_id"]: row["currency"] for row in pnl["customers"]}["cus_eu"] == "EUR"
        status, _, margin = await api.call("GET", "/v1/customers/cus_eu/margin")
        assert (margin["currency"], margin["revenue_nanos"]) == ("EUR", 50 * 10**9)
    run_api(backend, scenario)


def test_a_cost_in_another_currency_than_the_plans_is_kept_unrated_with_why(backend):
    async def scenario(api):
        events = [{**cost("c1", "cus_eu", "10.00")[0], "currency": "USD"},
                  {**cost("c2", "cus_eu", "4.00")[0], "currency": "EUR"},
                  {**cost("c3", "cus_eu", "1.00")[0], "currency": "ABC"}]
        status, _, report = await api.call("POST", "/v1/costs", events)
        assert status == 200
        results = {result["id"]: result for result in report["results"]}
        assert results["c1"]["status"] == "unrated"
        assert results["c1"]["reason"] == ("a cost in USD, but customer `cus_eu`'s plan `eur_pro` bills in EUR "
                                           "(amounts in two currencies are never added; send it in EUR)")
        assert results["c2"]["status"] == "accepted"
        assert results["c3"]["status"] == "rejected" and "not an ISO 4217 currency code" in results["c3"]["reason"]
        _, _, margin = await api.call("GET", "/v1/customers/cus_eu/margin")
        assert margin["cogs_nanos"] == 4 * 10**9                       # the dollars are not in it
        _, _, unrated = await api.call("GET", "/v1/events/unrated")
        assert [item["event_id"] for item in unrated["items"]] == ["c1"]
    run_api(backend, scenario)


@pytest.mark.parametrize("rates, total", [
    ({"EUR": "1.10"}, (100 * 10**9 + 55 * 10**9, 30 * 10**9 + 11 * 10**9)),
    ({}, None),
])
def test_the_pnl_converts_at_the_operators_rates_and_says_which(backend, rates, total):
    reporting = Reporting(currency="USD", exchange_rates={code: Money.parse(rate) for code, rate in rates.items()})

    async def scenario(api):
        await api.call("POST", "/v1/costs", cost("c1", "cus_us", "30.00"))
        await api.call("POST", "/v1/costs", cost("c2", "cus_eu", "10.00"))
        _, _, pnl = await api.call("GET", "/v1/reports/pnl")
        if total is None:
            assert (pnl["currency"], pnl["revenue_nanos"], pnl["missing_rates"]) == (None, None, ["EUR"])
            return
        assert pnl["currency"] == "USD" and pnl["exchange_rates"] == {"EUR": "1.1"}
        assert (pnl["revenue_nanos"], pnl["cogs_nanos"]) == total
        assert len(pnl["by_currency"]) == 2                 # the unconverted totals stay beside it
    run_api(backend, scenario, reporting=reporting)


def test_one_currency_needs_no_rate(backend):
    async def scenario(api):
        for key in ("cus_eu", "cus_free", "cus_alloc"):
            assert (await api.call("DELETE", f"/v1/subscriptions/sub_{key.removeprefix('cus_')}"))[0] == 204
        await api.call("POST", "/v1/costs", cost("c1", "cus_us", "30.00"))
        _, _, pnl = await api.call("GET", "/v1/reports/pnl")
        assert (pnl["currency"], pnl["revenue_nanos"], pnl["cogs_nanos"]) == ("USD", 100 * 10**9, 30 * 10**9)
        assert pnl["margin_pct"] == 70.0 and pnl["missing_rates"] == []
    run_api(backend, scenario)


def test_a_free_tier_is_held_to_its_floor_against_its_allocated_value_and_never_blocked_without_one(
        backend, tmp_path):
    guard_file = tmp_path / "guards.yaml"
    guard_file.write_text(FREE_TIER_FLOOR)

    async def scenario(api):
        # A cent of cost on a plan that earns nothing and allocates nothing: no margin
        # to judge, so no block (it once meant an unbounded loss: blocked for the month).
        await api.call("POST", "/v1/costs", cost("c1", "cus_free", "0.01"))
        _, _, margin = await api.call("GET", "/v1/customers/cus_free/margin")
        assert (margin["revenue_nanos"], margin["allocated_nanos"], margin["margin_pct"]) == (0, 0, None)
        # Against an allocated value of 1.00 a month: 0.50 of cost is a 50 % margin...
        await api.call("POST", "/v1/costs", cost("c2", "cus_alloc", "0.50"))
        _, _, margin = await api.call("GET", "/v1/customers/cus_alloc/margin")
        assert (margin["revenue_nanos"], margin["allocated_nanos"], margin["margin_pct"]) == (0, 10**9, 50.0)
        _, _, trail = await api.call("GET", "/v1/actions")
        assert trail["items"] == []
        # ...and past 0.95 the 5 % floor blocks.
        await api.call("POST", "/v1/costs", cost("c3", "cus_alloc", "0.46"))
        _, _, trail = await api.call("GET", "/v1/actions")
        assert [(item["customer_id"], item["level_to"], round(item["margin_pct"], 2)) for item in trail["items"]] == [
            ("cus_alloc", 3, 4.0)]
        # The P&L keeps the allocated value apart from what is invoiced.
        _, _, pnl = await api.call("GET", "/v1/reports/pnl")
        usd = next(row for row in pnl["by_currency"] if row["currency"] == "USD")
        assert (usd["revenue_nanos"], usd["allocated_nanos"]) == (100 * 10**9, 10**9)
    run_api(backend, scenario, guards=watch_guards(guard_file))
