# Hard-quota leases counted on the Redis edge bus: one key per customer, metric and
# billing period holds the units leased so far (config.bus.QUOTA_LEDGER), and one Lua
# script reads it, sizes the grant and adds it, so every worker of every proxy draws
# from the same count and together they never lease more than the limit. A Redis
# that lost its data has no epoch (config.bus.QUOTA_LEDGER_EPOCH): nothing is granted
# ("unknown", LedgerUnavailable to the worker) until a control plane has rebuilt the
# ledgers from the store (control_plane.edge_bus.BusQuotaLedger), and units leased in
# an earlier epoch are not given back to the rebuilt one. With an epoch, a ledger that
# does not exist yet (the period's first lease) starts at the usage the proxy's state
# says was recorded; it expires a day after the period ends. Level-2 throttle buckets
# shared by all proxies live beside them, one key per customer, guard and metric, spent
# by another script on Redis's own clock.
from __future__ import annotations

from config.bus import QUOTA_LEDGER_EPOCH, QUOTA_LEDGER_KEPT_AFTER_PERIOD_S, quota_ledger_key, throttle_bucket_key
from decision_core.bucket import US_PER_S, shared_interval_us
from decision_core.quota import LEASE_SPREAD
from proxy.quota_ledger import LedgerUnavailable
from proxy.redis_bus import BusUnavailable, RedisBus

KEPT_AFTER_PERIOD_S = QUOTA_LEDGER_KEPT_AFTER_PERIOD_S
# KEYS: the ledger, the epoch. ARGV: limit, needed, wanted, recorded, debt, expiry
# (epoch ms), spread. decision_core.quota.grant_size, applied to the ledger's count
# plus the debt. Returns {granted, leased in all, epoch}; {-1, 0, ''} without an epoch.
_LEASE = """
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  return {-1, 0, ''}
end
local leased = tonumber(redis.call('GET', KEYS[1]) or ARGV[4]) + tonumber(ARGV[5])
local left = tonumber(ARGV[1]) - leased
local needed = tonumber(ARGV[2])
local granted = 0
if needed >= 0 and needed <= left then
  granted = math.max(needed, math.min(tonumber(ARGV[3]), math.floor(left / tonumber(ARGV[7]))))
end
redis.call('SET', KEYS[1], leased + granted, 'PXAT', ARGV[6])
return {granted, leased + granted, epoch}
"""
# KEYS: the ledger, the epoch. ARGV: units given back, the epoch they were leased in.
_GIVE_BACK = """
local leased = redis.call('GET', KEYS[1])
if leased and redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('SET', KEYS[1], math.max(0, tonumber(leased) - tonumber(ARGV[1])), 'KEEPTTL')
end
return 0
"""
# KEYS: the throttle bucket. ARGV: interval (us), burst, wanted.
# decision_core.bucket.shared_take on Redis's own clock, shared by every proxy.
# Returns {granted, wait in us}.
_TAKE_TOKENS = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local base = math.max(tat, now)
local there = math.floor((now + burst * interval - base) / interval)
if there < 1 then
  return {0, base + interval - burst * interval - now}
end
local granted = math.min(tonumber(ARGV[3]), there)
if granted < 1 then
  return {0, 0}
end
tat = base + granted * interval
redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
return {granted, 0}
"""


class LedgerUnknown(LedgerUnavailable):
    """Redis answers but has lost the ledgers: they are being rebuilt from the store."""


class RedisQuotaLedger:
    """A QuotaLedger (proxy.quota_ledger) on the RedisBus `bus`. A period is named by
    its end and the ledgers' epoch. `lease` raises LedgerUnknown while Redis has no
    epoch. Closing it leaves the bus open (it is shared)."""

    def __init__(self, bus: RedisBus) -> None:
        self.bus = bus
        self.where = bus.where
        self._lease = bus.client.register_script(_LEASE)
        self._give_back = bus.client.register_script(_GIVE_BACK)
        self._take_tokens = bus.client.register_script(_TAKE_TOKENS)

    async def lease(self, customer_id, metric, *, needed, wanted, limit, period_end, recorded, debt):
        key = quota_ledger_key(customer_id, metric, period_end)
        expire_ms = int((period_end + KEPT_AFTER_PERIOD_S) * 1000)
        try:
            granted, leased, epoch = await self.bus.call("quota lease", lambda client: self._lease(
                keys=[key, QUOTA_LEDGER_EPOCH], args=[limit, needed, wanted, recorded, debt, expire_ms, LEASE_SPREAD],
                client=client))
        except BusUnavailable as error:
            raise LedgerUnavailable(str(error)) from error
        if int(granted) < 0:
            raise LedgerUnknown("Redis lost the quota ledgers; a control plane is rebuilding them from the store")
        return int(granted), (float(period_end), epoch), int(leased)

    async def give_back(self, customer_id, metric, period, units):
        period_end, epoch = period
        key = quota_ledger_key(customer_id, metric, period_end)
        try:
            await self.bus.call("quota give back", lambda client: self._give_back(
                keys=[key, QUOTA_LEDGER_EPOCH], args=[units, epoch], client=client))
        except BusUnavailable as error:
            raise LedgerUnavailable(str(error)) from error

    async def take_tokens(self, customer_id, guard_id, metric, *, tokens, per_s, burst, wanted):
        key = throttle_bucket_key(customer_id, guard_id, metric)
        interval_us = shared_interval_us(tokens, per_s)
        try:
            granted, wait_us = await self.bus.call("throttle tokens", lambda client: self._take_tokens(
                keys=[key], args=[interval_us, burst, max(wanted, 1)], client=client))
        except BusUnavailable as error:
            raise LedgerUnavailable(str(error)) from error
        return int(granted), int(wait_us) / US_PER_S

    async def close(self) -> None:
        pass
