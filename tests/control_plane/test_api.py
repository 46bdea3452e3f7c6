# The REST API over real sockets, on both stores: admin tokens guard /v1, the catalog
# can be written and read back, API keys are shown once and kept hashed, ingest
# answers per event, and every error is problem+json.
import asyncio
import json

import aiohttp
import pytest
from running_api import NOW, TOKEN_GUARD, Api, api_test, catalog_for_cus_1, example_api, token_guards

from config import ConfigError
from config.catalog_file import parse_catalog_file
from control_plane.api import sha256_hex
from control_plane.ingest import REJECTED
from control_plane.store import ACCEPTED, DUPLICATE, DeadLetter


def test_v1_needs_an_admin_token_and_says_so_as_a_problem(backend):
    async def scenario(api):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
            async with aiohttp.ClientSession() as anonymous:
                async with anonymous.get(api.base + "/v1/plans", headers=headers) as response:
                    assert response.status == 401
                    assert response.headers["Content-Type"] == "application/problem+json"
                    assert response.headers["WWW-Authenticate"] == "Bearer"
                    assert (await response.json(content_type=None))["detail"] == \
                        "a bearer token is required (unknown or revoked tokens are refused)"
            async with aiohttp.ClientSession() as anonymous:
                async with anonymous.get(api.base + "/healthz") as response:
                    assert response.status == 200
        assert await api.store.live_token(sha256_hex(api.token)) is not None
    api_test(backend, scenario)


def test_the_catalog_is_written_and_read_back_through_the_api(backend):
    async def scenario(api):
        status, _, body = await api.call("PUT", "/v1/metrics/api_calls", {"aggregation": "count"})
        assert (status, body["result"]) == (201, "created")
        status, _, body = await api.call("PUT", "/v1/metrics/api_calls", {"aggregation": "count"})
        assert (status, body["result"]) == (200, "unchanged")
        plan = {"tier": "pro", "fixed_fee": "49.00", "quotas": {"api_calls": {"limit": 1000}},
                "charges": [{"metric": "api_calls", "model": "per_unit", "price": "0.001"}]}
        status, _, body = await api.call("PUT", "/v1/plans/pro", plan)
        assert status == 201 and body["fixed_fee"] == "49"
        status, _, body = await api.call("GET", "/v1/plans/pro")
        assert status == 200 and body["key"] == "pro" and body["quotas"]["api_calls"] == {"limit": 1000, "hard": True}
        status, _, body = await api.call("GET", "/v1/plans")
        assert [item["key"] for item in body["items"]] == ["pro"]
        status, content_type, body = await api.call("PUT", "/v1/plans/gold", {**plan, "features": ["nope"]})
        assert (status, content_type) == (422, "application/problem+json")
        assert body["errors"] == [{"message": "Unknown feature `nope`; define it under `features`",
                                   "path": "$.features"}]
        status, _, body = await api.call("PUT", "/v1/plans/gold", {**plan, "fixed_fee": "-1"})
        assert status == 422 and "Expected an amount >= 0" in body["detail"]
        status, _, body = await api.call("PUT", "/v1/plans/gold", {**plan, "fixed_fee": "-1", "period": "quarter"})
        assert status == 422 and [error["path"] for error in body["errors"]] == ["$.fixed_fee", "$.period"]
        status, _, body = await api.call("PUT", "/v1/plans/gold", {**plan, "key": "silver"})
        assert status == 422 and "not the key in the path" in body["detail"]
        status, _, body = await api.call("GET", "/v1/plans/gold")
        assert (status, body["title"]) == (404, "Not Found")
        status, _, body = await api.call("GET", "/v1/widgets")
        assert (status, body["title"]) == (404, "Not Found")
        status, _, body = await api.call("PUT", "/v1/plans/pro", raw=b"{not json")
        assert status == 400 and body["detail"].startswith("the body is not JSON")
        status, _, _ = await api.call("DELETE", "/v1/plans/pro")
        assert status == 204
        assert (await api.call("DELETE", "/v1/plans/pro"))[0] == 404
    api_test(backend, scenario)


# Plans `aforo apply` refuses, each with where its body goes wrong and why.
TIERS = [{"up_to": 1000, "price": "0.002"}, {"up_to": 500, "price": "0.001"}, {"up_to": None, "price": "0.0005"}]
BAD_PLANS = [
    ({"charges": [{"metric": "api_calls", "model": "graduated", "tiers": TIERS}]}, "$.charges[0].tiers[1].up_to",
     "Invalid price: tier bounds must ascend, tier 2 ends at 500 after 1000"),
    ({"charges": [{"metric": "api_calls", "model": "volume", "tiers": TIERS[:1]}]}, "$.charges[0].tiers[0].up_to",
     "Invalid price: the last tier must be unbounded (up_to: null)"),
    ({"charges": [{"metric": "api_calls", "model": "graduated", "tiers": [TIERS[2], TIERS[0]]}]},
     "$.charges[0].tiers[0].up_to", "Invalid price: only the last tier may be unbounded (tier 1)"),
    ({"fixed_fee": "10", "fee_allocation": {"api_calls": "60%"}}, "$.fee_allocation",
     "Fee allocation shares add up to 60%, not 100%"),
    ({"charges": [{"metric": "api_calls", "model": "per_unit", "price": "1"},
                  {"metric": "api_calls", "model": "package", "price": "5", "package_size": 10}]},
     "$.charges[1].metric", "Duplicate charge for metric `api_calls`; first used by `$.charges[0]`"),
    ({"period": "quarter"}, "$.period", "Expected one of `day`, `week`, `month`, `year`, got `quarter`"),
    ({"currency": "usd"}, "$.currency", "Expected a three-letter currency code like `USD`, got `usd`"),
    ({"currency": "XYZ"}, "$.currency", "`XYZ` is not an ISO 4217 currency code (like `USD`, `EUR`, `JPY`)"),
]


def test_a_plan_put_over_rest_is_held_to_the_rules_apply_holds_a_file_to(backend):
    # Such a plan was once accepted over REST, and from then on every ingest failed
    # (500) rating with it. Now each is a 422 naming the path, and nothing is kept.
    async def scenario(api):
        await api.call("PUT", "/v1/metrics/api_calls", {"aggregation": "count"})
        for fields, path, message in BAD_PLANS:
            status, content_type, body = await api.call("PUT", "/v1/plans/pro", {"tier": "pro", **fields})
            assert (status, content_type) == (422, "application/problem+json"), fields
            assert body["errors"] == [{"message": message, "path": path}]
            assert body["detail"] == f"invalid plan: {message} - at `{path}`"
            # The same plan in a catalog file: the same words, at the same place in it.
            with pytest.raises(ConfigError) as caught:
                parse_catalog_file(json.dumps({"plans": [{"key": "pro", "tier": "pro", **fields}]}), "catalog.yaml")
            assert [(error.message.replace("$.plans[0]", "$"), error.path.replace("$.plans[0]", "$"))
                    for error in caught.value.errors] == [(message, path)]
        assert (await api.call("GET", "/v1/plans/pro"))[0] == 404
        assert await api.store.list_catalog("plan") == []
        # A valid plan goes in, and usage rated by it is ingested.
        status, _, _ = await api.call("PUT", "/v1/plans/pro", {"tier": "pro", "charges": [
            {"metric": "api_calls", "model": "graduated", "tiers": [TIERS[0], TIERS[2]]}]})
        assert status == 201
        await api.call("PUT", "/v1/customers/cus_1", {})
        await api.call("PUT", "/v1/subscriptions/sub_1", {"customer": "cus_1", "plan": "pro",
                                                           "period_anchor": "2027-01-01T00:00:00Z"})
        status, _, report = await api.call("POST", "/v1/events", [usage("e1")])
        assert status == 200 and report["accepted"] == 1
    api_test(backend, scenario)


def test_an_api_key_is_shown_once_kept_hashed_listed_by_prefix_and_revoked(backend):
    async def scenario(api):
        assert (await api.call("POST", "/v1/customers/cus_1/api-keys"))[0] == 404     # no such customer yet
        await api.call("PUT", "/v1/customers/cus_1", {"name": "Acme"})
        status, _, created = await api.call("POST", "/v1/customers/cus_1/api-keys")
        assert status == 201 and created["key"].startswith("ak_live_")
        stored = await api.store.api_key_by_hash(sha256_hex(created["key"]))
        assert stored.id == created["id"] and stored.key_hash != created["key"]
        status, _, listed = await api.call("GET", "/v1/customers/cus_1/api-keys")
        assert [item["id"] for item in listed["items"]] == [created["id"]]
        assert "key" not in listed["items"][0] and created["key"].startswith(listed["items"][0]["prefix"])
        status, _, listed = await api.call("GET", "/v1/customers/cus_1/api-keys?prefix=ak_test_")
        assert listed["items"] == []
        assert (await api.call("DELETE", f"/v1/api-keys/{created['id']}"))[0] == 204
        assert (await api.call("DELETE", f"/v1/api-keys/{created['id']}"))[0] == 404
        _, _, listed = await api.call("GET", "/v1/customers/cus_1/api-keys")
        assert listed["items"][0]["revoked_at"] == NOW
    api_test(backend, scenario)


def usage(event_id, **fields):
    return {"id": event_id, "customer_id": "cus_1", "metric": "api_calls", "quantity": 1,
            "timestamp": "2027-01-15T08:00:00Z", **fields}


def test_events_are_ingested_with_a_result_each_as_json_or_ndjson(backend):
    async def scenario(api):
        await catalog_for_cus_1(api.store)
        batch = [usage("e1"), usage("e2", quantity=-5), usage("e1")]
        status, _, report = await api.call("POST", "/v1/events", batch)
        assert status == 200
        assert [result["status"] for result in report["results"]] == [ACCEPTED, REJECTED, DUPLICATE]
        assert (report["accepted"], report["rejected"], report["duplicate"]) == (1, 1, 1)
        ndjson = b"\n".join(json.dumps(event).encode() for event in (usage("e3"), usage("e1"))) + b"\n{oops\n"
        status, _, report = await api.call("POST", "/v1/events", raw=ndjson, content_type="application/x-ndjson")
        assert [result["status"] for result in report["results"]] == [ACCEPTED, DUPLICATE, REJECTED]
        status, _, report = await api.call("POST", "/v1/costs", {"events": [
            {"id": "c1", "customer_id": "cus_1", "amount": "0.25", "timestamp": "2027-01-15T08:00:00Z"}]})
        assert [result["status"] for result in report["results"]] == [ACCEPTED]
        status, _, body = await api.call("POST", "/v1/events", raw=b"{broken")
        assert status == 400 and "not a JSON array of events" in body["detail"]
        status, _, body = await api.call("POST", "/v1/events", raw=b"[]", content_type="text/csv")
        assert status == 415
        assert len(await api.store.events("usage", "cus_1")) == 2
    api_test(backend, scenario)


def test_hostile_events_are_rejected_alone_never_as_a_store_outage(backend):
    # On PostgreSQL a NUL once failed the whole batch as "retry" (503); 10^19 units or a
    # cost of 1e300 once gave 500 on both stores.
    async def scenario(api):
        await catalog_for_cus_1(api.store)
        batch = [usage("bad\u0000id"), usage("e1"), usage("huge", quantity=10**19)]
        status, _, report = await api.call("POST", "/v1/events", batch)
        assert status == 200
        assert [result["status"] for result in report["results"]] == [REJECTED, ACCEPTED, REJECTED]
        status, _, report = await api.call("POST", "/v1/costs", [
            {"id": "c1", "customer_id": "cus_1", "amount": "1e300", "timestamp": "2027-01-15T08:00:00Z"},
            {"id": "c2", "customer_id": "cus_1", "amount": "2.5", "timestamp": "2027-01-15T08:00:00Z"}])
        assert status == 200 and [result["status"] for result in report["results"]] == [REJECTED, ACCEPTED]
        status, _, body = await api.call("POST", "/v1/events", raw=b"[" * 100_000 + b"]" * 100_000)
        assert status == 400 and "deeper" in body["detail"]
        assert [event.event_id for event in await api.store.events("usage", "cus_1")] == ["e1"]
    api_test(backend, scenario)


def test_unrated_and_late_events_are_listed_and_unrated_ones_rated_once_the_catalog_knows_them(backend):
    async def scenario(api):
        await catalog_for_cus_1(api.store)
        status, _, report = await api.call("POST", "/v1/events", [
            usage("e1", metric="gpu_seconds"), usage("e2"), usage("e3", timestamp="2027-01-13T08:00:00Z")])
        assert [result["status"] for result in report["results"]] == ["unrated", ACCEPTED, "accepted_late"]
        assert report["unrated"] == 1
        status, _, listed = await api.call("GET", "/v1/events/unrated")
        assert [(item["event_id"], item["reason"]) for item in listed["items"]] == [
            ("e1", "no metric `gpu_seconds` in the catalog")]
        assert listed["items"][0]["event"]["metric"] == "gpu_seconds"
        status, _, late = await api.call("GET", "/v1/events?late=true")
        assert [item["event_id"] for item in late["items"]] == ["e3"]
        await api.call("PUT", "/v1/metrics/gpu_seconds", {"aggregation": "sum"})
        status, _, rerated = await api.call("POST", "/v1/events/unrated/rate")
        assert (status, rerated) == (200, {"rated": 1, "still_unrated": 0})
        assert (await api.call("GET", "/v1/events/unrated"))[2]["items"] == []
        metrics = await api.session.get(api.base + "/metrics")
        assert "aforo_events_unrated_total 1.0" in await metrics.text()
    api_test(backend, scenario)


def test_dead_letters_are_listed_with_why(backend):
    async def scenario(api):
        await api.store.add_dead_letters([DeadLetter("meter-stream", "1-0", b'{"id": "x"}', "too many units", NOW),
                                          DeadLetter("meter-stream", "1-0", b"{oops", "not valid JSON", NOW)])
        status, _, listed = await api.call("GET", "/v1/dead-letters")
        assert status == 200
        assert [(item["event"], item["reason"]) for item in listed["items"]] == [
            ('{"id": "x"}', "too many units"), ("{oops", "not valid JSON")]
        status, _, later = await api.call("GET", f"/v1/dead-letters?after={listed['items'][0]['seq']}")
        assert [item["reason"] for item in later["items"]] == ["not valid JSON"]
    api_test(backend, scenario)


def test_a_store_outage_is_a_503_problem_not_a_crash(tmp_path):
    from control_plane.sqlite_store import SqliteStore

    async def scenario():
        store = await SqliteStore.open(str(tmp_path / "aforo.db"))
        await store.migrate()
        async with Api(store) as api:
            await store.close()                          # the store goes away under the API
            status, content_type, body = await api.call("GET", "/v1/plans")
        assert (status, content_type) == (503, "application/problem+json")
    asyncio.run(scenario())


@pytest.fixture(autouse=True)
def _quiet_aiohttp_access_log(caplog):
    caplog.set_level("WARNING", logger="aiohttp.access")


def test_aforo_control_plane_prints_a_first_admin_token_serves_and_stops_on_sigterm(tmp_path):
    import re
    import signal
    import subprocess
    import sys
    import urllib.request

    database = tmp_path / "aforo.db"
    command = [sys.executable, "-m", "control_plane.cli", "control-plane", "--listen", "127.0.0.1:0",
               "--database", str(database)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        token = re.search(r"admin token \(shown once, keep it\): (\S+)", process.stdout.readline()).group(1)
        url = re.search(r"API on (http://\S+) ", process.stdout.readline()).group(1)
        request = urllib.request.Request(url + "/v1/plans", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read()) == {"items": []}
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
    # A second start on the same store prints no new token: the first one stays valid.
    again = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert again.stdout.readline().startswith("control plane API on http://127.0.0.1:")
        again.send_signal(signal.SIGTERM)
        assert again.wait(30) == 0
    finally:
        if again.poll() is None:
            again.kill()
        again.stdout.close()


GUARDS = """\
guards:
  - id: tokens-floor
    metric: ai_tokens
    min_margin: 25%
    actions:
      level_1: {threshold: 30%, notify: [finance]}
      level_3: {threshold: 10%}
"""


def test_the_guard_file_in_force_is_shown_and_a_bad_edit_keeps_it(tmp_path, caplog):
    from config.guards import watch_guards
    from control_plane.api import ControlPlaneMetrics
    from control_plane.sqlite_store import SqliteStore

    guard_file = tmp_path / "guards.yaml"
    guard_file.write_text(GUARDS)
    metrics = ControlPlaneMetrics()
    guards = watch_guards(guard_file, on_reload_error=metrics.count_reload_error)

    async def scenario():
        store = await SqliteStore.open(str(tmp_path / "aforo.db"))
        await store.migrate()
        api = Api(store)
        api.app_options = {"guards": guards, "metrics": metrics}
        async with api:
            status, _, shown = await api.call("GET", "/v1/guards")
            assert status == 200 and [guard["id"] for guard in shown["guards"]] == ["tokens-floor"]
            first_version = shown["version"]
            guard_file.write_text(GUARDS.replace("min_margin: 25%", "min_margin: 25"))      # a bad edit
            assert guards.reload_if_changed() is False
            status, _, shown = await api.call("GET", "/v1/guards")
            assert (shown["version"], shown["reload_errors"]) == (first_version, 1)
            async with aiohttp.ClientSession() as anonymous:
                async with anonymous.get(api.base + "/metrics") as response:
                    exposition = await response.text()
            assert f'aforo_config_reload_errors_total{{file="{guard_file}"}} 1.0' in exposition
            guard_file.write_text(GUARDS.replace("tokens-floor", "tokens-guard"))         # a good one
            assert guards.reload_if_changed() is True
            status, _, shown = await api.call("GET", "/v1/guards")
            assert [guard["id"] for guard in shown["guards"]] == ["tokens-guard"]
            assert shown["version"] != first_version and shown["reloads"] == 1
        await store.close()
    asyncio.run(scenario())
    assert "guards reload failed, keeping version" in caplog.text
    assert "Expected a percentage like `25%`, got `25`" in caplog.text


def test_without_a_guard_file_the_guards_call_says_how_to_give_one(backend):
    async def scenario(api):
        status, _, body = await api.call("GET", "/v1/guards")
        assert status == 404 and "--guards FILE" in body["detail"]
    api_test(backend, scenario)


def test_aforo_control_plane_refuses_a_bad_first_guard_file(tmp_path):
    import subprocess
    import sys
    bad = tmp_path / "guards.yaml"
    bad.write_text("guards: [oops\n")
    result = subprocess.run([sys.executable, "-m", "control_plane.cli", "control-plane", "--listen", "127.0.0.1:0",
                             "--database", str(tmp_path / "aforo.db"), "--guards", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "guards.yaml:2: Invalid YAML" in result.stderr


def test_usage_and_costs_move_margins_per_metric_and_overall_and_the_pnl_ranks_them(backend):
    from pathlib import Path

    from config.catalog_file import load_catalog_file
    from control_plane.catalog import apply_catalog

    catalog_path = Path(__file__).resolve().parents[2] / "config" / "examples" / "catalog.yaml"

    async def scenario(api):
        await apply_catalog(api.store, load_catalog_file(catalog_path), "catalog.yaml", author="test")
        # NOW is 2027-01-15T08:00Z: globex (pro, anchored on the 15th) is in its Jan 15 - Feb 15 period.
        tokens = {"id": "u1", "customer_id": "cus_globex", "metric": "ai_tokens", "quantity": 1_000_000,
                  "timestamp": "2027-01-15T07:00:00Z"}
        for _ in range(2):                                   # the retry counts nothing twice
            await api.call("POST", "/v1/events", [tokens])
        status, _, margin = await api.call("GET", "/v1/customers/cus_globex/margin")
        assert status == 200
        assert (margin["plan"], margin["period_start"], margin["period_end"]) == (
            "pro", "2027-01-15T00:00:00+00:00", "2027-02-15T00:00:00+00:00")
        by_metric = {row["metric"]: row for row in margin["metrics"]}
        # ai_tokens: 8.00 of usage + 80% of the 49.00 fee, against 2.50 of unit cost.
        assert (by_metric["ai_tokens"]["revenue_nanos"], by_metric["ai_tokens"]["cogs_nanos"]) == (
            47_200_000_000, 2_500_000_000)
        assert by_metric["ai_tokens"]["margin_pct"] == pytest.approx(94.7034, abs=1e-4)
        assert by_metric["api_calls"] == {"metric": "api_calls", "units": 0, "revenue_nanos": 9_800_000_000,
                                          "cogs_nanos": 0, "margin_pct": 100.0, "allocated_nanos": 0}
        assert (margin["revenue_nanos"], margin["cogs_nanos"]) == (57_000_000_000, 2_500_000_000)
        # A provider bill for the customer overall turns the margin negative.
        status, _, report = await api.call("POST", "/v1/costs", [
            {"id": "c1", "customer_id": "cus_globex", "amount": "60.00", "timestamp": "2027-01-15T07:30:00Z",
             "provider": "openai"}])
        assert report["accepted"] == 1
        _, _, margin = await api.call("GET", "/v1/customers/cus_globex/margin")
        assert margin["cogs_nanos"] == 62_500_000_000
        assert margin["margin_pct"] == pytest.approx((57 - 62.5) / 57 * 100, abs=1e-4)
        status, _, pnl = await api.call("GET", "/v1/reports/pnl")
        assert [row["customer_id"] for row in pnl["customers"]] == ["cus_globex", "cus_acme", "cus_wonka"]
        assert pnl["revenue_nanos"] == 57_000_000_000 + 2_000_000_000_000
        # Each kept event says what it earned and under which plan and period.
        [kept] = await api.store.events("usage", "cus_globex")
        pricing = json.loads(kept.provenance)["pricing"]
        assert pricing == {"subscription": "sub_globex", "plan": "pro", "period_start": "2027-01-15T00:00:00+00:00",
                           "period_end": "2027-02-15T00:00:00+00:00", "revenue_nanos": 8_000_000_000,
                           "cogs_nanos": 2_500_000_000}
        assert (await api.call("GET", "/v1/customers/cus_nobody/margin"))[0] == 404
    api_test(backend, scenario)


def test_a_plan_changed_between_two_batches_prices_the_second_by_the_new_plan(backend):
    from pathlib import Path

    from config.catalog_file import load_catalog_file
    from control_plane.catalog import apply_catalog

    catalog_path = Path(__file__).resolve().parents[2] / "config" / "examples" / "catalog.yaml"

    def tokens(event_id):
        return [{"id": event_id, "customer_id": "cus_globex", "metric": "ai_tokens", "quantity": 1_000_000,
                 "timestamp": "2027-01-15T07:00:00Z"}]

    async def revenue(store, event_id):
        kept = {event.event_id: event for event in await store.events("usage", "cus_globex")}
        return json.loads(kept[event_id].provenance)["pricing"]["revenue_nanos"]

    async def scenario(open_store):
        store = await open_store()
        other = await open_store()            # `aforo apply` or another control plane, on the same database
        await apply_catalog(store, load_catalog_file(catalog_path), "catalog.yaml", author="test")
        async with Api(store) as api:
            await api.call("POST", "/v1/events", tokens("u1"))
            assert await revenue(store, "u1") == 8_000_000_000                # pro: 8.00 per 1M tokens
            _, _, pro = await api.call("GET", "/v1/plans/pro")
            pro["charges"][0]["price"] = "10.00"
            del pro["key"]
            status, _, _ = await api.call("PUT", "/v1/plans/pro", pro)        # through this API
            assert status == 200
            await api.call("POST", "/v1/events", tokens("u2"))
            assert await revenue(store, "u2") == 10_000_000_000
            plan = await other.get_catalog("plan", "pro")
            plan["charges"][0]["price"] = "12"
            await other.put_catalog("plan", "pro", plan, author="test")                       # behind this API's back
            await api.call("POST", "/v1/events", tokens("u3"))
            assert await revenue(store, "u3") == 12_000_000_000
            await other.put_catalog("subscription", "sub_globex", {
                **await other.get_catalog("subscription", "sub_globex"), "plan": "enterprise"}, author="test")
            await api.call("POST", "/v1/events", tokens("u4"))
            assert await revenue(store, "u4") == 6_000_000_000                # enterprise: 6.00 per 1M
            _, _, margin = await api.call("GET", "/v1/customers/cus_globex/margin")
            assert margin["plan"] == "enterprise"
    backend.run(scenario)


def test_margin_moves_walk_a_customer_through_the_levels_and_each_change_is_recorded_once(backend, tmp_path):
    from pathlib import Path

    from config.catalog_file import load_catalog_file
    from config.guards import watch_guards
    from control_plane.catalog import apply_catalog

    catalog_path = Path(__file__).resolve().parents[2] / "config" / "examples" / "catalog.yaml"
    guard_file = tmp_path / "guards.yaml"
    guard_file.write_text(TOKEN_GUARD)
    guards = watch_guards(guard_file)

    def cost(event_id, amount):
        return [{"id": event_id, "customer_id": "cus_globex", "amount": amount, "metric": "ai_tokens",
                 "timestamp": "2027-01-15T07:00:00Z"}]

    async def scenario(open_store):
        store = await open_store()
        await apply_catalog(store, load_catalog_file(catalog_path), "catalog.yaml", author="test")
        api = Api(store)
        api.app_options = {"guards": guards}
        async with api:
            # ai_tokens revenue this period: 39.20 (80% of the 49.00 fee) until tokens are used.
            await api.call("POST", "/v1/costs", cost("c1", "35.00"))            # margin 10.7%: level 2
            await api.call("POST", "/v1/costs", cost("c1", "35.00"))            # a retry: nothing moves
            await api.call("POST", "/v1/costs", cost("c2", "1.00"))             # margin 8.2%: level 3
            await api.call("POST", "/v1/events", [{"id": "u1", "customer_id": "cus_globex", "metric": "ai_tokens",
                                                   "quantity": 10_000_000, "timestamp": "2027-01-15T07:10:00Z"}])
            # +80.00 revenue, +25.00 cost: margin 48.8%, back to level 0.
            status, _, trail = await api.call("GET", "/v1/actions?customer=cus_globex")
        assert status == 200
        steps = [(item["metric"], item["level_from"], item["level_to"], item["guard_id"], item["mode"])
                 for item in trail["items"]]
        assert steps == [("ai_tokens", 0, 2, "tokens-floor", "enforce"), ("ai_tokens", 2, 3, "tokens-floor", "enforce"),
                         ("ai_tokens", 3, 0, "tokens-floor", "enforce")]
        assert [round(item["margin_pct"], 2) for item in trail["items"]] == [10.71, 8.16, 48.83]
        assert trail["items"][0]["min_margin_pct"] == 25.0
        [level] = await store.guard_levels("cus_globex")
        assert (level.metric, level.level) == ("ai_tokens", 0)
    backend.run(scenario)


def test_a_new_guard_file_judges_every_customer_again_at_once(backend, tmp_path):
    import asyncio

    from control_plane.api import INTAKE

    guards = token_guards(tmp_path)
    guard_file = tmp_path / "guards.yaml"

    async def scenario(open_store):
        store = await open_store()
        async with await example_api(store, guards) as api:
            await api.call("POST", "/v1/costs", [{"id": "c1", "customer_id": "cus_globex", "amount": "36.00",
                                                  "metric": "ai_tokens", "timestamp": "2027-01-15T07:00:00Z"}])
            assert [level.level for level in await store.guard_levels("cus_globex")] == [3]    # margin 8.2 %
            judging = asyncio.create_task(api.runner.app[INTAKE].judge_on_new_guards(0.01))
            # The block moves to 5 %: no new event, yet the customer is judged again.
            guard_file.write_text(TOKEN_GUARD.replace("level_3: {threshold: 10%}", "level_3: {threshold: 5%}"))
            guards.reload_if_changed()
            for _ in range(500):
                if [level.level for level in await store.guard_levels("cus_globex")] != [3]:
                    break
                await asyncio.sleep(0.01)
            judging.cancel()
            await asyncio.gather(judging, return_exceptions=True)
            [level] = await store.guard_levels("cus_globex")
            assert level.level == 2
            status, _, trail = await api.call("GET", "/v1/actions?customer=cus_globex")
            assert [(item["level_from"], item["level_to"]) for item in trail["items"]][-1] == (3, 2)
    backend.run(scenario)


def test_one_batch_moves_the_levels_of_every_customer_it_touches(backend, tmp_path):
    from pathlib import Path

    from config.catalog_file import load_catalog_file
    from config.guards import watch_guards
    from control_plane.catalog import apply_catalog

    catalog_path = Path(__file__).resolve().parents[2] / "config" / "examples" / "catalog.yaml"
    guard_file = tmp_path / "guards.yaml"
    guard_file.write_text(TOKEN_GUARD)
    customers = [f"cus_pro_{n}" for n in range(30)]

    async def scenario(open_store):
        store = await open_store()
        await apply_catalog(store, load_catalog_file(catalog_path), "catalog.yaml", author="test")
        for customer in customers:
            await store.put_catalog("customer", customer, {"name": customer}, author="test")
            await store.put_catalog("subscription", f"sub_{customer}", {
                "customer": customer, "plan": "pro", "period_anchor": "2026-11-15T00:00:00+00:00",
                "status": "active"}, author="test")
        api = Api(store)
        api.app_options = {"guards": watch_guards(guard_file)}
        async with api:
            # ai_tokens revenue this period: 39.20 (80% of the 49.00 fee); a cost of 35.00 leaves 10.7%.
            costs = [{"id": f"c-{customer}", "customer_id": customer, "amount": "35.00", "metric": "ai_tokens",
                      "timestamp": "2027-01-15T07:00:00Z"} for customer in customers]
            status, _, report = await api.call("POST", "/v1/costs", costs)
            assert (status, report["accepted"]) == (200, 30)
            await api.call("POST", "/v1/costs", costs)                         # a retry moves nothing
            _, _, trail = await api.call("GET", "/v1/actions?limit=1000")
        assert sorted((item["customer_id"], item["level_from"], item["level_to"]) for item in trail["items"]) == \
            sorted((customer, 0, 2) for customer in customers)
        assert {level.customer_id: level.level for level in await store.guard_levels_of(customers + ["cus_acme"])} \
            == dict.fromkeys(customers, 2)
    backend.run(scenario)


def test_deleting_what_a_live_entry_names_is_refused_with_each_referrer_until_it_is_gone(backend):
    async def scenario(api):
        await api.call("PUT", "/v1/metrics/api_calls", {"aggregation": "count"})
        await api.call("PUT", "/v1/features/premium", {})
        await api.call("PUT", "/v1/plans/pro", {"tier": "pro", "features": ["premium"],
                                                 "quotas": {"api_calls": {"limit": 1000}}, "charges": [
            {"metric": "api_calls", "model": "per_unit", "price": "0.01"}]})
        await api.call("PUT", "/v1/customers/acme", {})
        subscription = {"customer": "acme", "plan": "pro", "period_anchor": "2027-01-01T00:00:00Z"}
        await api.call("PUT", "/v1/subscriptions/acme-pro", subscription)
        refused = {
            "/v1/plans/pro": [{"kind": "subscription", "key": "acme-pro", "path": "$.plan"}],
            "/v1/customers/acme": [{"kind": "subscription", "key": "acme-pro", "path": "$.customer"}],
            "/v1/features/premium": [{"kind": "plan", "key": "pro", "path": "$.features"}],
            "/v1/metrics/api_calls": [{"kind": "plan", "key": "pro", "path": "$.quotas.api_calls"},
                                      {"kind": "plan", "key": "pro", "path": "$.charges[0].metric"}],
        }
        for path, referrers in refused.items():
            status, content_type, body = await api.call("DELETE", path)
            assert (status, content_type) == (409, "application/problem+json"), path
            assert body["referrers"] == referrers
            assert f"still named by {referrers[0]['kind']} `{referrers[0]['key']}`" in body["detail"]
            assert (await api.call("GET", path))[0] == 200                       # nothing was lost
        # A subscription that has ended holds nothing: its customer and plan may go.
        await api.call("PUT", "/v1/subscriptions/acme-pro", {**subscription, "status": "canceled"})
        assert (await api.call("DELETE", "/v1/customers/acme"))[0] == 204
        assert (await api.call("DELETE", "/v1/plans/pro"))[0] == 204
        assert (await api.call("DELETE", "/v1/features/premium"))[0] == 204
        assert (await api.call("DELETE", "/v1/metrics/api_calls"))[0] == 204
        assert (await api.call("GET", "/v1/metrics/api_calls"))[0] == 404
        # Nothing names a subscription or a price table entry.
        assert (await api.call("DELETE", "/v1/subscriptions/acme-pro"))[0] == 204
        await api.call("PUT", "/v1/model_prices/gpt-4o", {"input": "2.50"})
        assert (await api.call("DELETE", "/v1/model_prices/gpt-4o"))[0] == 204
    api_test(backend, scenario)
