# Where a proxy's hard-quota leases are counted: a QuotaLedger grants units of a
# customer's limit for a billing period, atomically across every worker of every
# proxy, and takes unused units back. It also keeps each throttled customer's
# level-2 token bucket, shared the same way. The control plane keeps one in its store
# (proxy.control_plane_link.ControlPlaneLedger); the Redis edge bus keeps one in Lua
# (proxy.redis_quota_ledger.RedisQuotaLedger).
from __future__ import annotations

from typing import Protocol


class LedgerUnavailable(Exception):
    """The ledger could not be asked (down, timed out, circuit open)."""


class QuotaLedger(Protocol):
    """`lease(...)` returns (units granted, the period's name for give_back (opaque), units
    leased in all this period, to every worker, this grant included): 0 units when
    fewer than `needed` are left of `limit`; otherwise `wanted` or less near the
    limit (decision_core.quota.grant_size). `period_end` (epoch seconds) says which
    period; `recorded` is the usage the proxy's state says was stored this period (a
    ledger that starts counting mid-period starts there); `debt` is units admitted
    while the ledger could not be asked, counted as leased before granting. Both
    methods raise LedgerUnavailable.

    `take_tokens(...)` takes up to `wanted` tokens (at least 1) from the customer's
    level-2 throttle bucket under the guard `guard_id` for `metric` (or `overall`),
    shared by every worker of
    every proxy (`tokens` per `per_s` seconds, bursts of `burst`; the rule is
    decision_core.bucket.shared_take): returns (tokens granted, seconds until one is
    there when none was granted). It raises LedgerUnavailable too."""

    where: str

    async def lease(self, customer_id: str, metric: str, *, needed: int, wanted: int, limit: int,
                    period_end: float, recorded: int, debt: int) -> tuple[int, object, int]: ...

    async def give_back(self, customer_id: str, metric: str, period: object, units: int) -> None: ...

    async def take_tokens(self, customer_id: str, guard_id: str, metric: str, *, tokens: int, per_s: float,
                          burst: int, wanted: int) -> tuple[int, float]: ...

    async def close(self) -> None: ...
