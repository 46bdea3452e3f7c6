# Leasing hard quotas to proxy workers, on both stores: chunks shrink near the limit,
# concurrent leases never add up past it, and returned units can be leased again.
import asyncio

import pytest

from decision_core.quota import grant_size

PERIOD = 1_800_000_000.0


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
            return await stores[n % 2].lease_quota("cus_1", "api_calls", PERIOD,
                                                   lambda leased: grant_size(100, leased, 1, 7))
        granted = await asyncio.gather(*(lease_one(n) for n in range(60)))
        assert sum(granted) == 100
        assert await stores[0].lease_quota("cus_1", "api_calls", PERIOD, lambda leased: grant_size(100, leased, 1, 7)) == 0
        await stores[1].return_quota("cus_1", "api_calls", PERIOD, 5)
        assert await stores[0].lease_quota("cus_1", "api_calls", PERIOD, lambda leased: grant_size(100, leased, 5, 5)) == 5
        # Another period, another ledger.
        assert await stores[0].lease_quota("cus_1", "api_calls", PERIOD + 1, lambda leased: leased + 3) == 3
    backend.run(scenario)
