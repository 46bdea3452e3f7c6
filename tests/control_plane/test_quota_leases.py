# Leasing hard quotas to proxy workers, on both stores: chunks shrink near the limit,
# concurrent leases never add up past it, returned units can be leased again, and
# usage kept from outside a lease (the REST API, a batch job) counts in the ledger:
# before leasing begins, and while it goes on.
import asyncio

import pytest

from control_plane.store import USAGE, Rating, StoredEvent
from decision_core.quota import grant_size

PERIOD = 1_800_000_000.0
PERIOD_END = PERIOD + 30 * 86400


def lease(store, grant, period=PERIOD):
    return store.lease_quota("cus_1", "api_calls", period, grant, period + 30 * 86400, "sub_1")


@pytest.mark.parametrize(
    ("limit", "leased", "needed", "wanted", "granted"),
    [
        (1000, 0, 1, 50, 50),        # plenty left: the chunk asked for
        (1000, 800, 1, 50, 25),      # 200 left: at most an eighth of it
        (1000, 995, 1, 50, 1),       # near the limit: single units
        (1000, 995, 3, 50, 3),       # ... or what the waiting request needs
        (1000, 998, 3, 50, 0),       # a request that cannot fit gets nothing
        (1000, 1000, 1, 50, 0),
        (10, 0, 0, 0, 0),            # asking for nothing gets nothing
    ],
)
def test_leases_shrink_near_the_limit(limit, leased, needed, wanted, granted):
    assert grant_size(limit, leased, needed, wanted) == granted


def test_concurrent_leases_never_exceed_the_limit(backend):
    async def scenario(open_store):
        stores = [await open_store(), await open_store()]

        async def lease_one(n):
            return await lease(stores[n % 2], lambda leased: grant_size(100, leased, 1, 7))
        granted = await asyncio.gather(*(lease_one(n) for n in range(60)))
        assert sum(granted) == 100
        assert await lease(stores[0], lambda leased: grant_size(100, leased, 1, 7)) == 0
        await stores[1].return_quota("cus_1", "api_calls", PERIOD, 5)
        assert await lease(stores[0], lambda leased: grant_size(100, leased, 5, 5)) == 5
        # Another period, another ledger.
        assert await lease(stores[0], lambda leased: leased + 3, PERIOD + 1) == 3
    backend.run(scenario)


def usage(event_id, units, ledgered):
    event = StoredEvent(USAGE, "cus_1", event_id, b'{"quantity":%d}' % units, PERIOD + 60, PERIOD + 61, False,
                        b'{"source":"api"}')
    rating = Rating("cus_1", "api_calls", PERIOD, PERIOD_END, "sub_1", units, lambda before: (0, 0), {}, ledgered)
    return event, rating


def test_usage_kept_from_outside_a_lease_counts_in_the_ledger(backend):
    async def scenario(open_store):
        store = await open_store()
        seen = []

        def grant(leased):
            seen.append(leased)
            return grant_size(100, leased, 1, 100)
        # 30 units billed through the API before any lease; 5 from a proxy (leased
        # elsewhere, so not counted again) ...
        for event, rating in (usage("batch-1", 30, True), usage("proxy-1", 5, False)):
            await store.record_events([event], [rating])
        granted = await lease(store, grant)
        assert seen == [35]                                    # ... the ledger starts at what is recorded
        # 10 more billed through the API while leasing goes on, and a repeat of them.
        event, rating = usage("batch-2", 10, True)
        await store.record_events([event], [rating])
        await store.record_events([event], [rating])           # a duplicate counts nothing
        await lease(store, grant)
        assert seen[-1] == 35 + granted + 10
    backend.run(scenario)
