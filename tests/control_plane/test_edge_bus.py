# The edge feed published on a real Redis and followed from it, on both stores: a
# follower gets the whole state, then new keys and level changes as they happen; an
# older version is never applied over a newer one, and a gap makes it pull again.
import asyncio
import datetime

import redis.asyncio as redis
from running_api import NOW, Api

from config.bus import EDGE_CHANGES, EDGE_STATE, EDGE_VERSION
from config.guards import watch_guards
from control_plane.api import FEED
from control_plane.edge_bus import EdgeBusPublisher
from proxy.edge_bus_source import EdgeBusSource
from proxy.redis_bus import RedisBus
from proxy.followed_edge_state import FollowedEdgeState

GUARDS = """\
guards:
  - id: floor
    metric: overall
    min_margin: 50%
    actions:
      level_3: {threshold: 0%}
"""


def iso(epoch_s):
    return datetime.datetime.fromtimestamp(epoch_s, datetime.timezone.utc).isoformat()


def bus_test(backend, redis_url, tmp_path, scenario):
    (tmp_path / "guards.yaml").write_text(GUARDS)

    async def run(open_store):
        client = redis.from_url(redis_url)
        await client.delete(EDGE_STATE, EDGE_CHANGES, EDGE_VERSION)
        api = Api(await open_store())
        api.app_options = {"guards": watch_guards(tmp_path / "guards.yaml")}
        async with api:
            await api.call("PUT", "/v1/metrics/api_calls", {"aggregation": "count"})
            await api.call("PUT", "/v1/plans/pro", {"tier": "pro", "charges": [
                {"metric": "api_calls", "model": "per_unit", "price": "0.01"}]})
            await api.call("PUT", "/v1/customers/cus_a", {})
            await api.call("PUT", "/v1/subscriptions/sub_a", {"customer": "cus_a", "plan": "pro",
                                                              "period_anchor": iso(NOW - 86400)})
            publisher = EdgeBusPublisher(client, api.runner.app[FEED], clock=lambda: NOW)
            publishing = asyncio.create_task(publisher.run())
            bus = RedisBus(redis_url)
            follower = FollowedEdgeState(EdgeBusSource(bus), clock=lambda: NOW)
            try:
                await follower.start(10.0)
                await scenario(api, client, follower, publisher)
            finally:
                publishing.cancel()
                await asyncio.gather(publishing, return_exceptions=True)
                await follower.close()
                await bus.close()
                await client.delete(EDGE_STATE, EDGE_CHANGES, EDGE_VERSION)
                await client.aclose()
    backend.run(run)


async def until(follower, condition):
    for _ in range(100):
        if condition():
            return
        await follower.apply_next_changes(0.1)
    raise AssertionError("the follower never got there")


def test_a_follower_gets_new_keys_and_level_changes_from_the_bus(backend, redis_url, tmp_path):
    async def scenario(api, client, follower, _publisher):
        assert follower.ready
        _, _, key = await api.call("POST", "/v1/customers/cus_a/api-keys")
        await until(follower, lambda: follower.customer_for_key(key["key"].encode()) is not None)
        customer = follower.customer_for_key(key["key"].encode())
        assert customer.acting_levels is None
        await api.call("POST", "/v1/costs", [{"id": "c1", "customer_id": "cus_a", "amount": "5",
                                              "timestamp": iso(NOW - 30)}])
        await until(follower, lambda: (customer.acting_levels or {}).get("overall") is not None)
        assert customer.acting_levels["overall"].level == 3
    bus_test(backend, redis_url, tmp_path, scenario)


def test_an_older_version_is_never_applied_and_a_gap_pulls_everything(backend, redis_url, tmp_path):
    async def scenario(api, client, follower, publisher):
        held = int(follower.version)
        stale = b'{"customers": [], "removed": ["cus_a"]}'
        await client.xadd(EDGE_CHANGES, {"version": held - 1, "changes": stale})    # an entry already held
        await follower.apply_next_changes(0.1)
        assert follower.version == str(held)
        assert len(follower.snapshot) == 1                  # cus_a was not removed by it
        # A gap (entries trimmed before the follower read them): it pulls the whole
        # state, and reads on from there once the state is published again.
        await client.xadd(EDGE_CHANGES, {"version": held + 5, "changes": stale})
        await publisher.publish_state()
        _, _, key = await api.call("POST", "/v1/customers/cus_a/api-keys")
        await until(follower, lambda: follower.customer_for_key(key["key"].encode()) is not None)
        assert len(follower.snapshot) == 1
        assert int(follower.version) == int(await client.get(EDGE_VERSION))
    bus_test(backend, redis_url, tmp_path, scenario)


def test_a_follower_catches_up_with_a_bus_that_lost_its_data(backend, redis_url, tmp_path):
    async def scenario(api, client, follower, publisher):
        for _ in range(4):
            await publisher.publish_state()
        await until(follower, lambda: int(follower.version) >= 5)
        await client.delete(EDGE_STATE, EDGE_CHANGES, EDGE_VERSION)   # a Redis restarted without its data
        await publisher.publish_state()                               # numbered from 1 again
        await publisher.publish_state()
        _, _, key = await api.call("POST", "/v1/customers/cus_a/api-keys")
        await until(follower, lambda: follower.customer_for_key(key["key"].encode()) is not None)
        assert int(follower.version) == int(await client.get(EDGE_VERSION))
    bus_test(backend, redis_url, tmp_path, scenario)
