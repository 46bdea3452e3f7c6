# Publishing the edge feed on the Redis edge bus (config.bus), so proxies that run
# apart from the control plane follow the same state: the whole state under a version,
# and each change as an entry of the changes stream. Numbering and writing happen in
# one script, so versions rise in stream order whichever control plane writes, and
# the whole state always names its own resync entry (followers read on from there).
# The whole state is published again every `resync_interval_s` (the control plane
# setting `edge_resync_interval_s`), so a follower that fell behind the stream's
# trimmed start (CHANGES_KEPT entries) catches up then.
from __future__ import annotations

import asyncio
import datetime
import logging
import os
import time
from collections.abc import Callable

import msgspec
import redis.asyncio as redis
from redis.exceptions import RedisError

from config.bus import (
    EDGE_CHANGES,
    EDGE_STATE,
    EDGE_VERSION,
    QUOTA_LEDGER_EPOCH,
    QUOTA_LEDGER_KEPT_AFTER_PERIOD_S,
    quota_ledger_key,
)
from config.control_plane_settings import DEFAULT_EDGE_RESYNC_INTERVAL_S
from control_plane.edge_feed import EdgeFeed
from control_plane.store import StoreError

log = logging.getLogger("aforo.control_plane")

CHANGES_KEPT = 10_000
WAIT_S = 5.0
RETRY_INITIAL_S = 0.2
RETRY_MAX_S = 5.0
_encode = msgspec.json.Encoder(enc_hook=str).encode
# KEYS: state hash, changes stream, version counter; ARGV: the state, entries kept.
_PUBLISH_STATE = """
local version = redis.call('INCR', KEYS[3])
local entry = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'version', version, 'resync', 1)
redis.call('HSET', KEYS[1], 'version', version, 'state', ARGV[1], 'entry', entry)
return version
"""
# KEYS: changes stream, version counter; ARGV: the changes, entries kept.
_PUBLISH_CHANGES = """
local version = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'version', version, 'changes', ARGV[1])
return version
"""


class EdgeBusPublisher:
    """Publishes `feed` on the bus at `client` (a redis.asyncio client); `clock`
    gives epoch seconds; the whole state goes out again every `resync_interval_s`
    seconds (> 0) even when nothing asks for it."""

    def __init__(self, client: redis.Redis, feed: EdgeFeed, clock: Callable[[], float] = time.time,
                 resync_interval_s: float = DEFAULT_EDGE_RESYNC_INTERVAL_S) -> None:
        if not resync_interval_s > 0:
            raise ValueError(f"resync_interval_s must be > 0, got {resync_interval_s!r}")
        self.client = client
        self.feed = feed
        self.clock = clock
        self.resync_interval_s = resync_interval_s
        self._publish_state = client.register_script(_PUBLISH_STATE)
        self._publish_changes = client.register_script(_PUBLISH_CHANGES)

    async def publish_state(self) -> int:
        """Publish the whole state and its resync entry; returns its version."""
        state = await self.feed.state(self.clock())
        return await self._publish_state(keys=[EDGE_STATE, EDGE_CHANGES, EDGE_VERSION],
                                         args=[_encode(state), CHANGES_KEPT])

    async def run(self) -> None:
        """Publish until cancelled: the whole state first and every resync_interval_s,
        the feed's changes as they come. A Redis or store failure is logged, and once
        it passes the whole state is published again (changes may have been missed)."""
        delay = RETRY_INITIAL_S
        while True:
            try:
                await self._publish_forever()
            except (RedisError, StoreError, OSError) as error:
                log.warning("edge bus: %s; publishing the whole state again in %.1f s", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def _publish_forever(self) -> None:
        since = self.feed.version
        await self.publish_state()
        published_at = time.monotonic()
        while True:
            due_in = published_at + self.resync_interval_s - time.monotonic()
            changes = await self.feed.changes(since, min(WAIT_S, max(due_in, 0.0)), self.clock())
            if changes.resync or time.monotonic() >= published_at + self.resync_interval_s:
                since = changes.version
                await self.publish_state()
                published_at = time.monotonic()
            elif changes.version != since:
                since = changes.version
                body = _encode({"customers": changes.customers, "removed": changes.removed})
                await self._publish_changes(keys=[EDGE_CHANGES, EDGE_VERSION], args=[body, CHANGES_KEPT])


# KEYS: a quota ledger; ARGV: units. Counted when the ledger exists (1), else 0.
_COUNT_IF_LEASING = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('INCRBY', KEYS[1], ARGV[1])
  return 1
end
return 0
"""
# KEYS: a quota ledger; ARGV: units, the period's recorded units, expiry (epoch ms).
# Begun at the recorded units; or, begun meanwhile by a proxy's lease, counted.
_BEGIN_OR_COUNT = """
if redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[3], 'NX') then
  return 1
end
redis.call('INCRBY', KEYS[1], ARGV[1])
return 1
"""


# KEYS: ledgers, then the epoch last; ARGV: each ledger's units and expiry (epoch
# ms), then the new epoch ('' to leave it). Ledgers that exist (begun meanwhile) are
# left alone; the epoch is set only if no other control plane set it first.
_REBUILD = """
for i = 1, #KEYS - 1 do
  redis.call('SET', KEYS[i], ARGV[2 * i - 1], 'PXAT', ARGV[2 * i], 'NX')
end
if ARGV[#ARGV] ~= '' then
  redis.call('SET', KEYS[#KEYS], ARGV[#ARGV], 'NX')
end
return 0
"""
# How often a control plane looks whether Redis still has the ledgers' epoch.
LEDGER_CHECK_INTERVAL_S = 0.5
# Ledgers rebuilt per script call.
REBUILD_CHUNK = 500


class BusQuotaLedger:
    """The hard-quota ledgers proxies lease from on the Redis bus, as the control
    plane moves them: usage of a hard quota kept from outside a proxy's lease (the
    REST API, a batch job) is counted in its ledger, or begins it at the period's
    recorded units, so the proxies admit only what is left of it. A Redis that does
    not answer is logged: that usage then reaches the ledger only if it begins
    later (from the recorded units). A Redis that lost the ledgers (no epoch) has
    them rebuilt from the store (`keep_rebuilt`) before it grants again."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._count = client.register_script(_COUNT_IF_LEASING)
        self._begin = client.register_script(_BEGIN_OR_COUNT)
        self._rebuild = client.register_script(_REBUILD)

    async def keep_rebuilt(self, store, rater, clock: Callable[[], float] = time.time) -> None:
        """Until cancelled, every LEDGER_CHECK_INTERVAL_S: if Redis has no ledgers'
        epoch, rebuild() them. A Redis or store failure is logged and tried again."""
        while True:
            try:
                if not await self.client.exists(QUOTA_LEDGER_EPOCH):
                    rebuilt = await self.rebuild(store, await rater.get(), clock())
                    log.warning("quota ledgers: Redis had lost them; %d rebuilt from the store's period totals",
                                rebuilt)
            except (RedisError, StoreError, OSError) as error:
                log.warning("quota ledgers: could not check or rebuild them: %s", error)
            await asyncio.sleep(LEDGER_CHECK_INTERVAL_S)

    async def rebuild(self, store, rater, now: float) -> int:
        """Begin the ledger of every hard quota in force at `now` (epoch seconds;
        `rater`: the catalog) at the units the store's period totals hold, then set
        a new epoch so proxies lease again; returns the ledgers written. A ledger
        that exists is left as it is (another control plane, or usage from outside
        a lease, began it first). Units admitted whose meter events the store had
        not kept yet, and units workers held from the lost ledgers, are not in it."""
        at = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        ledgers = []
        for row in await store.period_totals(now):
            subscription = rater.subscription_in_force(row.customer_id, at)
            if subscription is None or subscription.key != row.subscription:
                continue
            quota = rater.plans[subscription.plan].plan.quotas.get(row.metric)
            if quota is not None and quota.hard:
                ledgers.append((quota_ledger_key(row.customer_id, row.metric, row.period_end), row.units,
                                int((row.period_end + QUOTA_LEDGER_KEPT_AFTER_PERIOD_S) * 1000)))
        for start in range(0, len(ledgers), REBUILD_CHUNK):
            chunk = ledgers[start:start + REBUILD_CHUNK]
            await self._rebuild(keys=[key for key, _, _ in chunk] + [QUOTA_LEDGER_EPOCH],
                                args=[value for _, units, expire_ms in chunk for value in (units, expire_ms)] + [""])
        await self._rebuild(keys=[QUOTA_LEDGER_EPOCH], args=[os.urandom(8).hex()])
        return len(ledgers)

    async def count(self, ledgered: dict[tuple[str, str, float], int], store) -> None:
        """Count `ledgered` ((customer, metric, period end) -> units, kept in `store`)."""
        try:
            for (customer_id, metric, period_end), units in sorted(ledgered.items()):
                key = quota_ledger_key(customer_id, metric, period_end)
                if await self._count(keys=[key], args=[units]):
                    continue
                # The period's totals as the store has them now, this usage included.
                recorded = sum(row.units for row in await store.period_totals_of(period_end - 1e-3, [customer_id])
                               if row.metric == metric)
                expire_ms = int((period_end + QUOTA_LEDGER_KEPT_AFTER_PERIOD_S) * 1000)
                await self._begin(keys=[key], args=[units, recorded, expire_ms])
        except (RedisError, OSError) as error:
            log.warning("could not count usage from outside the proxies' leases in the Redis quota ledgers: %s",
                        error)
