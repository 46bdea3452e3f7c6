# Meter events over a real Redis stream into both stores: proxies append batches,
# control-plane consumers take them in, acknowledge and delete them; the entries of a
# consumer that died are claimed by another and every event is stored exactly once.
import asyncio
import uuid

import pytest
import redis.asyncio as redis
from prometheus_client import generate_latest

from control_plane.api import ControlPlaneMetrics
from control_plane.edge_feed import EdgeFeed
from control_plane.intake import Intake
from control_plane.meter_stream import MAX_ATTEMPTS, MeterStreamConsumer
from control_plane.rating import CurrentRater
from control_plane.store import USAGE, StoreError
from proxy.control_plane_link import usage_ndjson
from proxy.meter_event import MeterEvent
from proxy.meter_stream import RedisStreamSink
from proxy.redis_bus import RedisBus

NOW = 1_800_000_000.0
GROUP = "control-plane"


def meter_events(count, start=0):
    return [MeterEvent(f"evt-{n:04d}", "cus_1", "api_calls", 1, NOW - 60, "api", 200, 10, 20, 1.5)
            for n in range(start, start + count)]


async def catalog(store):
    await store.put_catalog("metric", "api_calls", {"aggregation": "count"}, author="test")
    await store.put_catalog("plan", "pro", {"tier": "pro", "charges": [
        {"metric": "api_calls", "model": "per_unit", "price": "0.01", "per_units": 1}]}, author="test")
    await store.put_catalog("customer", "cus_1", {}, author="test")
    await store.put_catalog("subscription", "sub_1", {"customer": "cus_1", "plan": "pro", "status": "active",
                                                      "period_anchor": "2027-01-01T00:00:00+00:00"}, author="test")


def stream_test(backend, redis_url, scenario):

    stream = f"{{aforo}}:test-meter-events-{uuid.uuid4().hex[:8]}"

    async def run(open_store):
        store = await open_store()
        await catalog(store)
        client = redis.from_url(redis_url)
        bus = RedisBus(redis_url)
        sink = RedisStreamSink(bus, stream=stream)
        rater = CurrentRater(store)
        intake = Intake(store, rater, EdgeFeed(store, rater=rater), clock=lambda: NOW)

        def consumer(name, claim_idle_ms=30_000, count_dead_letters=None):
            return MeterStreamConsumer(client, intake, name, stream=stream, claim_idle_ms=claim_idle_ms,
                                       count_dead_letters=count_dead_letters)
        try:
            await scenario(store, client, sink, consumer, stream, open_store)
        finally:
            await client.delete(stream)
            await bus.close()
            await client.aclose()
    backend.run(run)


async def drain(consumer):
    while await consumer.step(block_ms=50):
        pass


def test_batches_appended_by_proxies_are_stored_once_and_leave_the_stream(backend, redis_url):
    async def scenario(store, client, sink, consumer, stream, _open_store):
        reader = consumer("worker-1")
        await reader.join_group()
        await sink.write_batch(meter_events(30))
        await sink.write_batch(meter_events(20, start=30))
        await sink.write_batch(meter_events(20, start=30))      # a batch sent again after a lost reply
        await drain(reader)
        events = await store.events(USAGE, "cus_1")
        assert sorted(event.event_id for event in events) == [f"evt-{n:04d}" for n in range(50)]
        assert await client.xlen(stream) == 0
        assert (await client.xpending(stream, GROUP))["pending"] == 0
        [totals] = await store.period_totals(NOW, "cus_1")
        assert totals.units == 50
    stream_test(backend, redis_url, scenario)


def test_a_dead_consumers_entries_are_claimed_by_another_and_counted_once(backend, redis_url):
    async def scenario(store, client, sink, consumer, stream, _open_store):
        dying, survivor = consumer("worker-1"), consumer("worker-2", claim_idle_ms=0)
        await dying.join_group()
        for start in range(0, 40, 10):
            await sink.write_batch(meter_events(10, start=start))
        # worker-1 reads two entries, keeps the first, and dies before acknowledging either.
        taken = await client.xreadgroup(GROUP, "worker-1", {stream: ">"}, count=2)
        first_entry = taken[0][1][0]
        await dying.intake.take(USAGE, first_entry[1][b"events"].splitlines(), "proxy")
        await drain(survivor)
        events = await store.events(USAGE, "cus_1")
        assert sorted(event.event_id for event in events) == [f"evt-{n:04d}" for n in range(40)]
        [totals] = await store.period_totals(NOW, "cus_1")
        assert totals.units == 40
        assert await client.xlen(stream) == 0
        assert (await client.xpending(stream, GROUP))["pending"] == 0
    stream_test(backend, redis_url, scenario)


def test_entries_wait_in_the_stream_while_the_store_is_down(backend, redis_url):
    async def scenario(store, client, sink, consumer, stream, open_store):
        reader = consumer("worker-1")
        await reader.join_group()
        await sink.write_batch(meter_events(10))
        # The worker's own store connection goes away: every intake fails for real.
        lost = await open_store()
        await lost.close()
        back = reader.intake
        reader.intake = Intake(lost, CurrentRater(lost), back.feed, clock=lambda: NOW)
        runner = asyncio.create_task(reader.run())
        await eventually(lambda: pending(client, stream, 1))
        assert await store.events(USAGE, "cus_1") == []
        reader.intake = back                        # the store is back
        await eventually(lambda: pending(client, stream, 0))
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        assert len(await store.events(USAGE, "cus_1")) == 10
        assert await client.xlen(stream) == 0
    stream_test(backend, redis_url, scenario)


def test_a_poison_entry_never_wedges_the_stream(backend, redis_url):
    # An entry with a good event beside events ingest refuses: the good one is kept,
    # the others go to the dead letters with why, and the stream moves on to the next.
    async def scenario(store, client, sink, consumer, stream, _open_store):
        metrics = ControlPlaneMetrics()
        reader = consumer("worker-1", count_dead_letters=metrics.dead_letters.inc)
        await reader.join_group()
        good, = meter_events(1)
        huge = good.id.replace("evt", "huge")
        line = usage_ndjson([good]).strip()
        poison = b"\n".join([line.replace(good.id.encode(), huge.encode()).replace(b'"quantity":1', b'"quantity":'
                                                                                   + str(10**19).encode()),
                             b"{not json", line])
        await client.xadd(stream, {"events": poison})
        await sink.write_batch(meter_events(3, start=1))
        await drain(reader)
        assert sorted(event.event_id for event in await store.events(USAGE, "cus_1")) == [
            "evt-0000", "evt-0001", "evt-0002", "evt-0003"]
        assert await client.xlen(stream) == 0 and await pending(client, stream, 0)
        letters = [letter for _, letter in await store.dead_letters()]
        assert [(letter.source, letter.event[:30]) for letter in letters] == [
            ("meter-stream", poison.split(b"\n")[0][:30]), ("meter-stream", b"{not json")]
        assert "<= 1000000000000000" in letters[0].reason and letters[1].reason.startswith("not valid JSON")
        assert b"aforo_meter_dead_letters_total 2.0" in generate_latest(metrics.registry)
    stream_test(backend, redis_url, scenario)


def test_an_entry_that_cannot_be_taken_in_goes_to_the_dead_letters_after_a_few_tries(backend, redis_url):
    # A catalog broken behind the API's back makes every intake fail: the entry is
    # tried MAX_ATTEMPTS times, then kept as dead letters; later entries are taken in.
    async def scenario(store, client, sink, consumer, stream, _open_store):
        seen = []
        reader = consumer("worker-1", count_dead_letters=seen.append)
        await reader.join_group()
        await sink.write_batch(meter_events(2))
        broken = {"tier": "pro", "charges": [{"metric": "api_calls", "model": "graduated", "tiers": []}]}
        await store.put_catalog("plan", "pro", broken, author="test")
        for _ in range(MAX_ATTEMPTS - 1):
            with pytest.raises(StoreError, match="trying it again"):
                await reader.step(block_ms=50)
        assert await reader.step(block_ms=50) == 1          # the last try: dead letters, and done
        assert seen == [2] and await client.xlen(stream) == 0
        assert all("taking it in failed" in letter.reason for _, letter in await store.dead_letters())
        await catalog(store)                                 # mended: the next entries are taken in
        await sink.write_batch(meter_events(2, start=2))
        await drain(reader)
        assert sorted(event.event_id for event in await store.events(USAGE, "cus_1")) == ["evt-0002", "evt-0003"]
    stream_test(backend, redis_url, scenario)


async def pending(client, stream, count):
    return (await client.xpending(stream, GROUP))["pending"] == count


async def eventually(condition, timeout_s=10.0):
    """Wait for something the test caused (a bound, never a timed assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await condition():
        assert loop.time() < deadline, "the condition never held"
        await asyncio.sleep(0.02)
