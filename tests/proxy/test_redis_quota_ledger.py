# Hard-quota leases counted on a real Redis by the ledger's Lua script: it sizes grants
# as decision_core.quota.grant_size does, concurrent workers never lease past the
# limit, a new ledger starts at the recorded usage, debt is counted before granting,
# given-back units can be leased again, and the ledger expires after its period. A
# Redis that lost the ledgers (no epoch) grants nothing until they are rebuilt, and
# units leased before are not given back to the rebuilt ledger.
import asyncio
import time
import uuid

import pytest

from config.bus import QUOTA_LEDGER_EPOCH, quota_ledger_key, throttle_bucket_key
from decision_core.quota import grant_size
from proxy.redis_bus import RedisBus
from proxy.redis_quota_ledger import KEPT_AFTER_PERIOD_S, LedgerUnknown, RedisQuotaLedger

CASES = [(1000, 0, 1, 50), (1000, 800, 1, 50), (1000, 995, 1, 50), (1000, 995, 3, 50), (1000, 998, 3, 50),
         (1000, 1000, 1, 50), (10, 0, 0, 0), (7, 3, 5, 1), (100, 0, 1, 100)]


def ledger_test(redis_url, scenario, seeded=True):
    async def run():
        bus = RedisBus(redis_url)
        try:
            if seeded:          # as a control plane leaves it (its ledgers built from the store)
                await bus.client.set(QUOTA_LEDGER_EPOCH, "seeded-by-the-tests", nx=True)
            await scenario(RedisQuotaLedger(bus), bus.client, f"cus_{uuid.uuid4().hex[:8]}")
        finally:
            await bus.close()
    asyncio.run(run())


@pytest.mark.parametrize(("limit", "leased", "needed", "wanted"), CASES)
def test_the_script_sizes_grants_as_grant_size_does(redis_url, limit, leased, needed, wanted):
    async def scenario(ledger, _client, customer):
        granted, _, in_all = await ledger.lease(customer, "api_calls", needed=needed, wanted=wanted, limit=limit,
                                                period_end=time.time() + 3600, recorded=leased, debt=0)
        assert granted == grant_size(limit, leased, needed, wanted)
        assert in_all == leased + granted           # what the ledger has leased in all, said with it
    ledger_test(redis_url, scenario)


def test_concurrent_leases_never_exceed_the_limit_and_returns_can_be_leased_again(redis_url):
    async def scenario(ledger, client, customer):
        period_end = time.time() + 3600

        async def lease_one(needed):
            granted, _, _ = await ledger.lease(customer, "api_calls", needed=needed, wanted=7, limit=100,
                                               period_end=period_end, recorded=0, debt=0)
            return granted
        granted = await asyncio.gather(*(lease_one(1) for _ in range(60)))
        assert sum(granted) == 100
        assert await lease_one(1) == 0
        _, period, _ = await ledger.lease(customer, "api_calls", needed=0, wanted=0, limit=100,
                                          period_end=period_end, recorded=0, debt=0)
        await ledger.give_back(customer, "api_calls", period, 5)
        assert await lease_one(5) == 5
        assert await lease_one(1) == 0
        # Another period, another ledger; and it is gone a day after its period ends.
        other = period_end + 3600
        assert (await ledger.lease(customer, "api_calls", needed=1, wanted=7, limit=100, period_end=other,
                                   recorded=0, debt=0))[0] == 7
        expires_at_ms = await client.pexpiretime(quota_ledger_key(customer, "api_calls", other))
        assert expires_at_ms == int((other + KEPT_AFTER_PERIOD_S) * 1000)
    ledger_test(redis_url, scenario)


def test_a_new_ledger_starts_at_the_recorded_usage_and_debt_is_counted_first(redis_url):
    async def scenario(ledger, _client, customer):
        period_end = time.time() + 3600

        async def lease(needed, recorded=0, debt=0):
            granted, period, _ = await ledger.lease(customer, "api_calls", needed=needed, wanted=needed, limit=10,
                                                    period_end=period_end, recorded=recorded, debt=debt)
            return granted, period
        assert (await lease(4, recorded=6))[0] == 4         # 6 were recorded before leasing began
        granted, period = await lease(1, recorded=0)
        assert granted == 0                                 # the ledger exists: what the state says is moot
        await ledger.give_back(customer, "api_calls", period, 3)
        assert (await lease(1, debt=3))[0] == 0             # 3 admitted meanwhile without a lease
    ledger_test(redis_url, scenario)


def test_a_redis_that_lost_the_ledgers_grants_nothing_until_rebuilt_and_takes_no_old_give_back(private_redis):
    async def scenario(ledger, client, customer):
        period_end = time.time() + 3600

        async def lease(needed):
            return await ledger.lease(customer, "api_calls", needed=needed, wanted=needed, limit=10,
                                      period_end=period_end, recorded=0, debt=0)
        with pytest.raises(LedgerUnknown):                 # never seeded: unknown as well
            await lease(6)
        await client.set(QUOTA_LEDGER_EPOCH, "first")
        granted, old_period, _ = await lease(6)
        assert granted == 6
        await client.flushdb()                              # Redis lost everything
        with pytest.raises(LedgerUnknown):
            await lease(1)
        assert not await client.exists(quota_ledger_key(customer, "api_calls", period_end))
        # A control plane rebuilds it from the store (6 used) and sets a new epoch.
        await client.set(quota_ledger_key(customer, "api_calls", period_end), 6)
        await client.set(QUOTA_LEDGER_EPOCH, "rebuilt")
        # The 6 leased before the loss were counted by the store, not given back to it.
        await ledger.give_back(customer, "api_calls", old_period, 6)
        assert (await lease(5))[0] == 0
        granted, _, leased = await lease(4)
        assert (granted, leased) == (4, 10)
    ledger_test(private_redis.url, scenario, seeded=False)


def test_workers_share_one_throttle_bucket_per_customer_guard_and_metric(redis_url):
    # 1 token an hour, bursts of 3: however many workers ask, however concurrently,
    # three tokens in all, then a wait of about an hour (the test takes far less).
    async def scenario(ledger, client, customer):
        rate = {"tokens": 1, "per_s": 3600.0, "burst": 3}
        answers = await asyncio.gather(*(ledger.take_tokens(customer, "floor", "overall", wanted=2, **rate)
                                         for _ in range(6)))
        assert sum(granted for granted, _ in answers) == 3
        granted, wait_s = await ledger.take_tokens(customer, "floor", "overall", wanted=1, **rate)
        assert granted == 0 and 3500 < wait_s <= 3600
        # Another metric's standing under the same guard has a bucket of its own.
        assert (await ledger.take_tokens(customer, "floor", "api_calls", wanted=5, **rate))[0] == 3
        key = throttle_bucket_key(customer, "floor", "overall")
        assert 3 * 3600 * 1000 - 60_000 < await client.pttl(key) <= 3 * 3600 * 1000 + 1000
        await client.delete(key, throttle_bucket_key(customer, "floor", "api_calls"))
    ledger_test(redis_url, scenario)
