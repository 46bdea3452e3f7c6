# The edge state the control plane feeds proxies, over real sockets on both stores:
# what a proxy gets per customer, and the change stream (long poll, changed customers
# only, resync when the proxy cannot be brought up to date step by step).
import asyncio
import datetime
import hashlib

from running_api import NOW, Api

from config.guards import watch_guards
from control_plane.store import Action

AT = datetime.datetime.fromtimestamp(NOW, datetime.timezone.utc)
DAY = 86400

GUARDS = """\
guards:
  - id: floor
    metric: overall
    min_margin: 50%
    actions:
      level_1: {threshold: 40%}
      level_2: {threshold: 20%, throttle_rate: 2req/sec, burst: 3, downgrade_models: {gpt-4o: gpt-4o-mini}}
      level_3: {threshold: 0%}
"""


def iso(epoch_s):
    return datetime.datetime.fromtimestamp(epoch_s, datetime.timezone.utc).isoformat()


async def catalog(api):
    await api.call("PUT", "/v1/metrics/api_calls", {"aggregation": "count"})
    await api.call("PUT", "/v1/plans/pro", {"tier": "pro", "quotas": {"api_calls": {"limit": 100}},
                                            "charges": [{"metric": "api_calls", "model": "per_unit",
                                                         "price": "0.01"}]})
    for customer, status, anchor in (("cus_a", "active", NOW - 10 * DAY), ("cus_b", "past_due", NOW - 3 * DAY)):
        await api.call("PUT", f"/v1/customers/{customer}", {})
        await api.call("PUT", f"/v1/subscriptions/sub_{customer}",
                       {"customer": customer, "plan": "pro", "status": status, "period_anchor": iso(anchor)})
    await api.call("PUT", "/v1/customers/cus_nosub", {})


def guarded_api(backend, tmp_path, scenario):
    guard_file = tmp_path / "guards.yaml"
    guard_file.write_text(GUARDS)
    guards = watch_guards(guard_file)

    async def run(open_store):
        api = Api(await open_store())
        api.app_options = {"guards": guards}
        async with api:
            await catalog(api)
            await scenario(api)
    backend.run(run)


def test_a_proxy_gets_each_customers_plan_status_keys_usage_and_standing(backend, tmp_path):
    async def scenario(api):
        _, _, kept = await api.call("POST", "/v1/customers/cus_a/api-keys")
        _, _, revoked = await api.call("POST", "/v1/customers/cus_a/api-keys")
        await api.call("DELETE", f"/v1/api-keys/{revoked['id']}")
        events = [{"id": f"e{n}", "customer_id": "cus_a", "metric": "api_calls", "quantity": 1,
                   "timestamp": iso(NOW - 60)} for n in range(7)]
        await api.call("POST", "/v1/events", events)
        # Costs far above revenue: the overall guard moves cus_a to level 3.
        await api.call("POST", "/v1/costs", [{"id": "c1", "customer_id": "cus_a", "amount": "5",
                                              "timestamp": iso(NOW - 30)}])
        status, _, body = await api.call("GET", "/v1/edge/state")
        assert status == 200
        state = body["state"]
        assert state["plans"]["pro"] == {"tier": "pro", "features": [], "quotas": {"api_calls": {"limit": 100,
                                                                                                 "hard": True}}}
        customers = {customer["id"]: customer for customer in state["customers"]}
        assert sorted(customers) == ["cus_a", "cus_b"]            # no subscription: not served
        a = customers["cus_a"]
        assert a["api_keys"] == [hashlib.sha256(kept["key"].encode()).hexdigest()]
        assert a["usage"] == {"api_calls": 7}
        assert a["levels"] == {"overall": {"guard": "floor", "level": 3, "mode": "enforce",
                                           "throttle_rate": None, "burst": None, "downgrade_models": {},
                                           "locked_features": []}}
        assert a["period_end"] == "2027-02-05T08:00:00Z"           # monthly from 2027-01-05T08:00Z
        assert customers["cus_b"]["status"] == "past_due"
        assert customers["cus_b"]["period_end"] == "2027-02-12T08:00:00Z"
    guarded_api(backend, tmp_path, scenario)


def test_a_standing_from_an_earlier_period_is_not_served(backend, tmp_path):
    async def scenario(api):
        earlier = NOW - 12 * DAY                # before cus_a's current period began
        await api.store.transition_level(Action("cus_a", "overall", "floor", 0, 3, -50.0, 50.0, "enforce", earlier))
        await api.store.transition_level(Action("cus_b", "overall", "floor", 0, 2, 10.0, 50.0, "enforce", NOW - 60))
        _, _, body = await api.call("GET", "/v1/edge/state")
        levels = {customer["id"]: customer["levels"] for customer in body["state"]["customers"]}
        assert levels["cus_a"] == {}
        assert levels["cus_b"]["overall"]["throttle_rate"] == "2req/sec"
        assert levels["cus_b"]["overall"]["burst"] == 3
        assert levels["cus_b"]["overall"]["downgrade_models"] == {"gpt-4o": "gpt-4o-mini"}
    guarded_api(backend, tmp_path, scenario)


def test_the_change_stream_sends_only_the_customers_that_changed(backend, tmp_path):
    async def scenario(api):
        _, _, body = await api.call("GET", "/v1/edge/state")
        version = body["version"]
        # Nothing changed: the long poll comes back with the same version and nothing.
        _, _, quiet = await api.call("GET", f"/v1/edge/changes?since={version}&wait_s=0.05")
        assert (quiet["version"], quiet["customers"], quiet["resync"]) == (version, [], False)
        # A poll waiting while a key is created is answered with that customer.
        waiting = asyncio.ensure_future(api.call("GET", f"/v1/edge/changes?since={version}&wait_s=20"))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        _, _, key = await api.call("POST", "/v1/customers/cus_b/api-keys")
        _, _, changes = await waiting
        assert changes["version"] != version and not changes["resync"]
        assert [customer["id"] for customer in changes["customers"]] == ["cus_b"]
        assert changes["customers"][0]["api_keys"] == [hashlib.sha256(key["key"].encode()).hexdigest()]
        # A level transition is a change for its customer only.
        events = [{"id": "e1", "customer_id": "cus_a", "metric": "api_calls", "quantity": 1,
                   "timestamp": iso(NOW - 60)}]
        await api.call("POST", "/v1/events", events)
        await api.call("POST", "/v1/costs", [{"id": "c1", "customer_id": "cus_a", "amount": "1",
                                              "timestamp": iso(NOW - 30)}])
        _, _, changes2 = await api.call("GET", f"/v1/edge/changes?since={changes['version']}")
        assert [customer["id"] for customer in changes2["customers"]] == ["cus_a"]
        assert changes2["customers"][0]["levels"]["overall"]["level"] == 3
    guarded_api(backend, tmp_path, scenario)


def test_a_catalog_change_or_an_unknown_version_asks_for_a_resync(backend, tmp_path):
    async def scenario(api):
        _, _, body = await api.call("GET", "/v1/edge/state")
        version = body["version"]
        await api.call("PUT", "/v1/plans/pro", {"tier": "pro", "quotas": {"api_calls": {"limit": 50}}})
        _, _, changes = await api.call("GET", f"/v1/edge/changes?since={version}")
        assert changes["resync"] is True
        # A version from another run of the control plane (or garbage) is not trusted.
        for since in ("0badc0de.1", "", "nonsense"):
            _, _, changes = await api.call("GET", f"/v1/edge/changes?since={since}")
            assert changes["resync"] is True
        _, _, body = await api.call("GET", "/v1/edge/state")
        assert body["state"]["plans"]["pro"]["quotas"]["api_calls"]["limit"] == 50
    guarded_api(backend, tmp_path, scenario)


def test_a_new_period_starts_every_customer_at_level_0_and_the_trail_says_so(backend, tmp_path):
    async def scenario(api):
        earlier = NOW - 12 * DAY                # in cus_a's previous period
        await api.store.transition_level(Action("cus_a", "overall", "floor", 0, 3, -50.0, 50.0, "enforce", earlier))
        # A cost in the new period that breaches level 3 again: blocked again, this period.
        await api.call("POST", "/v1/costs", [{"id": "c1", "customer_id": "cus_a", "amount": "5",
                                              "timestamp": iso(NOW - 30)}])
        _, _, trail = await api.call("GET", "/v1/actions?customer=cus_a")
        moves = [(action["level_from"], action["level_to"], action["at"]) for action in trail["items"]]
        assert moves == [(0, 3, earlier), (3, 0, NOW), (0, 3, NOW)]
        _, _, body = await api.call("GET", "/v1/edge/state")
        levels = {customer["id"]: customer["levels"] for customer in body["state"]["customers"]}
        assert levels["cus_a"]["overall"]["level"] == 3
    guarded_api(backend, tmp_path, scenario)


def test_a_revoked_key_is_a_change_for_its_customer_only(backend, tmp_path):
    async def scenario(api):
        _, _, key = await api.call("POST", "/v1/customers/cus_a/api-keys")
        _, _, body = await api.call("GET", "/v1/edge/state")
        await api.call("DELETE", f"/v1/api-keys/{key['id']}")
        _, _, changes = await api.call("GET", f"/v1/edge/changes?since={body['version']}")
        assert not changes["resync"]
        assert [(customer["id"], customer["api_keys"]) for customer in changes["customers"]] == [("cus_a", [])]
    guarded_api(backend, tmp_path, scenario)
