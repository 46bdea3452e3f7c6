# The edge feed published on a real Redis and followed from it, on both stores: a
# follower gets the whole state, then new keys and level changes as they happen; an
# older version is never applied over a newer one, and a gap makes it pull again; a
# control plane publishes the whole state again at its settings' resync interval, and
# reads the meter stream under a consumer name of its own. A Redis that lost the
# quota ledgers has them rebuilt from the store's period totals before it grants.
import asyncio
import datetime
import json
import os
import socket
from pathlib import Path

import redis.asyncio as redis
from redis.exceptions import ResponseError
from running_api import NOW, Api

from config.bus import (
    EDGE_CHANGES,
    EDGE_STATE,
    EDGE_VERSION,
    METER_GROUP,
    METER_STREAM,
    QUOTA_LEDGER_EPOCH,
    quota_ledger_key,
)
from config.catalog_file import load_catalog_file
from config.control_plane_settings import (
    load_control_plane_settings,
    parse_control_plane_settings,
)
from config.guards import watch_guards
from control_plane.api import FEED, RATER
from control_plane.catalog import apply_catalog
from control_plane.edge_bus import BusQuotaLedger, EdgeBusPublisher
from control_plane.server import start_control_plane
from control_plane.store import open_store
from proxy.edge_bus_source import EdgeBusSource
from proxy.followed_edge_state import FollowedEdgeState
from proxy.redis_bus import RedisBus
from proxy.redis_quota_ledger import LedgerUnknown, RedisQuotaLedger

CATALOG = Path(__file__).resolve().parents[2] / "config" / "examples" / "catalog.yaml"
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


RESYNC_SETTINGS = """\
listen: 127.0.0.1:0
database: aforo.db
redis_url: {redis_url}
edge_resync_interval_s: {interval}
"""


def test_the_whole_state_is_published_again_at_the_settings_resync_interval(redis_url, tmp_path):
    # A Redis that lost its data (it restarted with nothing on disk) has the whole
    # state again within one interval, and every republication is a resync entry
    # followers read on from.
    async def scenario():
        client = redis.from_url(redis_url)
        await client.delete(EDGE_STATE, EDGE_CHANGES, EDGE_VERSION)
        store = await open_store(str(tmp_path / "aforo.db"))
        await apply_catalog(store, load_catalog_file(CATALOG), "catalog.yaml", author="test")
        await store.close()
        (tmp_path / "control_plane.yaml").write_text(RESYNC_SETTINGS.format(redis_url=redis_url, interval=0.2))
        settings = load_control_plane_settings(tmp_path / "control_plane.yaml", environ={})
        assert settings.edge_resync_interval_s == 0.2
        control_plane = await start_control_plane(settings, environ={}, clock=lambda: NOW)
        try:
            first = await poll(lambda: client.hget(EDGE_STATE, "version"), lambda version: version is not None)
            await client.delete(EDGE_STATE)
            state = await poll(lambda: client.hgetall(EDGE_STATE), lambda state: b"state" in state)
            assert int(state[b"version"]) > int(first)
            assert {"cus_acme", "cus_globex", "cus_wonka"} <= {customer["id"] for customer in json.loads(state[b"state"])["customers"]}
            await poll(lambda: client.xrange(EDGE_CHANGES),
                       lambda entries: sum(b"resync" in fields for _, fields in entries) >= 4)
            entries = await client.xrange(EDGE_CHANGES)
            versions = [int(fields[b"version"]) for _, fields in entries]
            assert versions == sorted(versions)
        finally:
            await control_plane.stop()
            await client.delete(EDGE_STATE, EDGE_CHANGES, EDGE_VERSION)
            await client.aclose()
    asyncio.run(scenario())


def test_with_the_default_interval_an_idle_control_plane_publishes_the_whole_state_once(redis_url, tmp_path):
    async def scenario():
        client = redis.from_url(redis_url)
        await client.delete(EDGE_STATE, EDGE_CHANGES, EDGE_VERSION)
        settings = parse_control_plane_settings(f"listen: 127.0.0.1:0\nredis_url: {redis_url}\n",
                                                "control_plane.yaml", tmp_path, environ={})
        assert settings.edge_resync_interval_s == 300.0
        control_plane = await start_control_plane(settings, environ={}, clock=lambda: NOW)
        try:
            await poll(lambda: client.hget(EDGE_STATE, "version"), lambda version: version is not None)
            await asyncio.sleep(1.0)
            assert await client.xlen(EDGE_CHANGES) == 1
        finally:
            await control_plane.stop()
            await client.delete(EDGE_STATE, EDGE_CHANGES, EDGE_VERSION)
            await client.aclose()
    asyncio.run(scenario())


def test_control_planes_on_one_host_and_pid_are_distinct_consumers_of_the_meter_stream(redis_url, tmp_path):
    # As containers sharing the host's network are (same hostname, each its pid 1):
    # one consumer name for two would have each take the other's pending entries.
    host_and_pid = f"{socket.gethostname()}-{os.getpid()}".encode()

    async def ours(client):
        try:
            consumers = await client.xinfo_consumers(METER_STREAM, METER_GROUP)
        except ResponseError:                       # no group yet
            return []
        return [consumer["name"] for consumer in consumers
                if consumer["name"] == host_and_pid or consumer["name"].startswith(host_and_pid + b"-")]

    async def scenario():
        client = redis.from_url(redis_url)
        started = []
        try:
            for name in ("one", "two"):
                settings = parse_control_plane_settings(
                    f"listen: 127.0.0.1:0\ndatabase: {name}.db\nredis_url: {redis_url}\n",
                    "control_plane.yaml", tmp_path, environ={})
                started.append(await start_control_plane(settings, environ={}, clock=lambda: NOW))
            names = await poll(lambda: ours(client), lambda names: len(names) >= 2)
            assert len(set(names)) == len(names)
        finally:
            for control_plane in started:
                await control_plane.stop()
            for name in await ours(client):
                await client.xgroup_delconsumer(METER_STREAM, METER_GROUP, name)
            await client.delete(EDGE_STATE, EDGE_CHANGES, EDGE_VERSION)
            await client.aclose()
    asyncio.run(scenario())


async def poll(read, done, deadline_s=10.0):
    """`await read()` until `done(value)`; fails after `deadline_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while not done(value := await read()):
        assert loop.time() < deadline, f"still {value!r}"
        await asyncio.sleep(0.02)
    return value


def test_a_redis_that_lost_the_quota_ledgers_grants_only_what_the_store_says_is_left(backend, private_redis):
    async def run(open_store):
        client = redis.from_url(private_redis.url)
        bus = RedisBus(private_redis.url)
        proxy_ledger = RedisQuotaLedger(bus)
        async with Api(await open_store()) as api:
            await api.call("PUT", "/v1/metrics/api_calls", {"aggregation": "count"})
            await api.call("PUT", "/v1/metrics/ai_tokens", {"aggregation": "sum"})
            await api.call("PUT", "/v1/plans/capped", {"tier": "capped", "quotas": {
                "api_calls": {"limit": 100, "hard": True}, "ai_tokens": {"limit": 10, "hard": False}}})
            for customer in ("cus_a", "cus_b"):
                await api.call("PUT", f"/v1/customers/{customer}", {})
                await api.call("PUT", f"/v1/subscriptions/sub_{customer}", {
                    "customer": customer, "plan": "capped", "period_anchor": iso(NOW - 86400)})
            usage = [{"id": f"e{n}", "customer_id": "cus_a", "metric": "api_calls", "quantity": 1,
                      "timestamp": iso(NOW - 60)} for n in range(30)]
            usage.append({"id": "t1", "customer_id": "cus_a", "metric": "ai_tokens", "quantity": 500,
                          "timestamp": iso(NOW - 60)})
            assert (await api.call("POST", "/v1/events", usage))[2]["accepted"] == 31
            [period_end] = {row.period_end for row in await api.store.period_totals(NOW)}

            async def lease(customer, needed):
                granted, _, leased = await proxy_ledger.lease(customer, "api_calls", needed=needed, wanted=needed,
                                                              limit=100, period_end=period_end, recorded=0, debt=0)
                return granted, leased
            # An empty Redis (restarted, flushed, an empty replica) grants nothing ...
            try:
                await lease("cus_a", 1)
                raise AssertionError("an empty Redis granted units of a ledger it never had")
            except LedgerUnknown:
                pass
            # ... until a control plane rebuilt the ledgers from what the store counted:
            # the hard quota's ledger only (a soft quota is not leased).
            ledger = BusQuotaLedger(client)
            assert await ledger.rebuild(api.store, await api.runner.app[RATER].get(), NOW) == 1
            assert await client.exists(QUOTA_LEDGER_EPOCH)
            assert int(await client.get(quota_ledger_key("cus_a", "api_calls", period_end))) == 30
            assert not await client.exists(quota_ledger_key("cus_a", "ai_tokens", period_end))
            assert await lease("cus_a", 71) == (0, 30)          # 70 are left, not 100
            assert await lease("cus_a", 70) == (70, 100)
            assert await lease("cus_b", 5) == (5, 5)            # no usage yet: begun from the state's
            # A second control plane rebuilding changes nothing that was leased since.
            epoch = await client.get(QUOTA_LEDGER_EPOCH)
            await ledger.rebuild(api.store, await api.runner.app[RATER].get(), NOW)
            assert await client.get(QUOTA_LEDGER_EPOCH) == epoch
            assert await lease("cus_a", 1) == (0, 100)
        await bus.close()
        await client.aclose()
    backend.run(run)
