# An edge snapshot: every customer's decision-core state, found by the sha256 of an
# API key. Built whole, then only read (the usage counters and throttle buckets inside
# each CustomerState still move). One features set and one PlanQuotas per plan are
# shared by all of its customers, so a million customers cost a million small objects.
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from config.edge_state_file import Customer, EdgeStateFile, Plan, Standing
from decision_core import (
    CustomerState,
    DecisionCoreError,
    GuardStanding,
    InvalidStateError,
    PlanQuotas,
    QuotaLimit,
    TokenBucket,
)
from decision_core.state import SUBSCRIPTION_STATUSES

KEY_DIGEST_BYTES = 32
_sha256 = hashlib.sha256
# One string object per status for every customer, instead of one per file line.
_STATUS = {status: status for status in SUBSCRIPTION_STATUSES}
_NO_STANDINGS: dict[str, GuardStanding] = {}  # CustomerState copies it; never changed


def hash_api_key(key: bytes) -> bytes:
    """The sha256 digest (32 bytes) of a plain API key; keys are only stored hashed.
    The edge state file lists the same digest as 64 hex characters."""
    return _sha256(key).digest()


class EdgeSnapshot:
    """Customers' edge state at one version; immutable once built.

    `customers_by_key`: 32-byte key digest -> CustomerState; `customers_by_id`:
    customer id -> the same CustomerState; `version`: the source's version (for a
    file, a hash of its bytes); `period_end`: end of the billing period, epoch
    seconds. A snapshot is itself an EdgeState that is always ready.
    """

    __slots__ = ("customers_by_key", "customers_by_id", "version", "period_end")
    ready = True

    def __init__(
        self,
        customers_by_key: dict[bytes, CustomerState],
        customers_by_id: dict[str, CustomerState],
        version: str,
        period_end: float,
    ) -> None:
        for name, value in (
            ("customers_by_key", customers_by_key),
            ("customers_by_id", customers_by_id),
            ("version", version),
            ("period_end", period_end),
        ):
            object.__setattr__(self, name, value)

    def customer_for_key(self, api_key: bytes) -> CustomerState | None:
        """The customer whose API key is `api_key` (plain, as the client sent it), or
        None for an unknown key. Hashes the key; never compares plain keys."""
        return self.customers_by_key.get(_sha256(api_key).digest())

    def __len__(self) -> int:
        return len(self.customers_by_id)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("EdgeSnapshot is immutable; build a new one instead")

    def __repr__(self) -> str:
        return f"EdgeSnapshot(version={self.version!r}, customers={len(self)})"


class _PlanState:
    # What all customers of one plan share.
    __slots__ = ("tier", "features", "quotas")

    def __init__(self, plan: Plan, window_s: int) -> None:
        self.tier = plan.tier
        self.features = frozenset(plan.features)
        self.quotas = PlanQuotas(
            [QuotaLimit(metric, quota.limit, quota.hard, window_s) for metric, quota in plan.quotas.items()]
        )


def build_snapshot(
    plans: Mapping[str, Plan],
    customers: Iterable[Customer],
    period_start: float,
    period_end: float,
    now: float,
    version: str = "built",
) -> EdgeSnapshot:
    """Build a snapshot from plans (name -> Plan) and customers (Customer values as
    in the edge state file, which need not come from one).

    `period_start`/`period_end` are epoch seconds (the quota window is their
    difference); `now` starts every level-2 throttle bucket full. Usage of a metric
    without a quota in the plan is not counted. Raises InvalidStateError for an
    unknown plan, a duplicate customer id or key digest, a digest that is not 64
    hex characters, a period that does not end after it starts, and (naming the
    customer) any state the decision core refuses, such as a throttle rate too
    large for its bucket.
    """
    window_s = int(period_end - period_start)
    if window_s <= 0:
        raise InvalidStateError(f"the billing period must end after it starts, got {period_start}..{period_end}")
    shared = {name: _PlanState(plan, window_s) for name, plan in plans.items()}
    by_key: dict[bytes, CustomerState] = {}
    by_id: dict[str, CustomerState] = {}
    for customer in customers:
        plan = shared.get(customer.plan)
        if plan is None:
            raise InvalidStateError(f"customer {customer.id!r}: unknown plan {customer.plan!r}")
        if customer.id in by_id:
            raise InvalidStateError(f"customer {customer.id!r} is listed twice")
        try:
            state = CustomerState(
                customer.id,
                plan.tier,
                _STATUS.get(customer.status, customer.status),
                plan.features,
                plan.quotas,
                customer.usage,
                {metric: _guard_standing(standing, now) for metric, standing in customer.levels.items()}
                if customer.levels
                else _NO_STANDINGS,
                period_end,
            )
            digests = [_digest(hex_digest) for hex_digest in customer.api_keys]
        except DecisionCoreError as err:
            raise InvalidStateError(f"customer {customer.id!r}: {err}") from err
        for digest in digests:
            if by_key.setdefault(digest, state) is not state:
                raise InvalidStateError(
                    f"customer {customer.id!r}: API key digest {digest.hex()[:12]}... already "
                    f"belongs to customer {by_key[digest].customer_id!r}"
                )
        by_id[customer.id] = state
    return EdgeSnapshot(by_key, by_id, version, float(period_end))


def snapshot_from_file(state: EdgeStateFile, version: str, now: float) -> EdgeSnapshot:
    """Build the snapshot of a validated edge state file at `now` (epoch seconds),
    tagged with `version`. Raises InvalidStateError as build_snapshot does (only a
    throttle rate or burst too large for a token bucket gets past validation)."""
    period = state.period
    return build_snapshot(
        state.plans, state.customers, period.start.epoch_s, period.end.epoch_s, now, version
    )


def _guard_standing(standing: Standing, now: float) -> GuardStanding:
    bucket = None
    if standing.level == 2 and standing.throttle_rate is not None:
        rate = standing.throttle_rate
        bucket = TokenBucket(rate.tokens, rate.per_s, standing.effective_burst, now)
    return GuardStanding(
        standing.guard,
        standing.level,
        standing.mode == "enforce",
        bucket,
        frozenset(standing.locked_features),
    )


def _digest(hex_digest: str) -> bytes:
    try:
        digest = bytes.fromhex(hex_digest)
    except ValueError:
        digest = b""
    if len(digest) != KEY_DIGEST_BYTES:
        raise InvalidStateError(f"an API key digest is 64 hex characters, got {hex_digest!r}")
    return digest
