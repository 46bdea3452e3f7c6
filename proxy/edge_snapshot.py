# An edge snapshot: every customer's decision-core state, found by the sha256 of an
# API key. Built whole, then only read (the usage counters and throttle buckets inside
# each CustomerState still move, and a customer's status and standings can be
# restated in place). Customers are stored compactly and get their
# CustomerState when first seen; one features set and one PlanQuotas per plan are
# shared by all of its customers.
from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Iterable, Mapping

import cython

from config.edge_state_file import Customer, EdgeStateFile, Plan, Standing
from decision_core import (
    DecisionCoreError,
    GuardStanding,
    InvalidStateError,
    PlanQuotas,
    QuotaLimit,
    TokenBucket,
)
from decision_core.state import SUBSCRIPTION_STATUSES, CustomerState

KEY_DIGEST_BYTES = 32
# The part of a key digest the index keeps: 128 bits, far beyond any collision risk.
INDEX_DIGEST_BYTES = 16
_sha256 = hashlib.sha256
_STATUSES = tuple(sorted(SUBSCRIPTION_STATUSES))
_STATUS_NUMBERS = {status: number for number, status in enumerate(_STATUSES)}
_NO_STANDINGS: dict[str, GuardStanding] = {}  # CustomerState copies it; never changed
# Keys seen recently, as sent, to their customer: a hit skips hashing (the costliest
# step of a lookup). Only keys that belong to a customer enter, so unknown keys
# cannot flood it; when full it starts over. Keys live in this process's memory only
# for as long as the snapshot does, as they pass through it on every request anyway.
KEY_CACHE_MAX = 1 << 17


def hash_api_key(key: bytes) -> bytes:
    """The sha256 digest (32 bytes) of a plain API key; keys are only stored hashed.
    The edge state file lists the same digest as 64 hex characters."""
    return _sha256(key).digest()


class EdgeSnapshot:
    """Customers' edge state at one version; immutable once built.

    Customers are held compactly (their API key digests in an open-addressing
    table, ids in one blob, plan, status and usage in arrays) and a decision-core
    CustomerState is made the first time one of a customer's keys is seen, then
    kept: every key of a customer finds the same state, so local usage counts once.
    A million customers therefore cost about 60 bytes each until they send traffic.
    `version`: the source's version (for a file, a hash of its bytes); `period_end`:
    end of the billing period, epoch seconds (a customer may have its own);
    `valid_until`: when the snapshot stops holding and its source builds the next
    one (the end of a rolling period; inf for a fixed one, which only ends). A
    snapshot is itself an EdgeState that is always ready.
    """

    ready = True

    def __init__(self, store: _CustomerStore, version: str, period_end: float,
                 valid_until: float = math.inf) -> None:
        self._store = store
        self._by_key: dict[bytes, CustomerState] = {}     # hot path: recent keys, as sent
        self._by_index: dict[int, CustomerState] = {}     # made states, by customer
        self.version = version
        self.period_end = period_end
        self.valid_until = valid_until
        self._sealed = True

    @property
    def snapshot(self) -> EdgeSnapshot:
        """The snapshot in force: this one (see EdgeState)."""
        return self

    def customer_for_key(self, api_key: bytes) -> CustomerState | None:
        """The customer whose API key is `api_key` (plain, as the client sent it), or
        None for an unknown key. Keys are looked up by their hash; a key already found
        once is remembered as sent (see KEY_CACHE_MAX)."""
        state = self._by_key.get(api_key)
        if state is None:
            index = self._store.find(_sha256(api_key).digest()[:INDEX_DIGEST_BYTES])
            if index < 0:
                return None
            state = self._state_of(index)
            if len(self._by_key) >= KEY_CACHE_MAX:
                self._by_key.clear()
            self._by_key[api_key] = state
        return state

    def counting(self, customer: CustomerState, api_key: bytes) -> CustomerState:
        """`customer` itself: a snapshot is never replaced (see EdgeState)."""
        return customer

    def customer_by_id(self, customer_id: str) -> CustomerState | None:
        """The customer with `customer_id`, or None (for updates and inspection, not
        the request path: the id table is built on first use)."""
        index = self._store.find_id(customer_id)
        return None if index < 0 else self._state_of(index)

    def _state_of(self, index) -> CustomerState:
        state = self._by_index.get(index)
        if state is None:
            state = self._store.materialize(index)
            self._by_index[index] = state
        return state

    def seen_customers(self) -> list[CustomerState]:
        """The CustomerState of every customer that has been looked up (the others
        have counted nothing locally)."""
        return list(self._by_index.values())

    def restate(self, customer: Customer, now: float, unchanged: Mapping[str, Standing] | None = None) -> bool:
        """Take `customer`'s new subscription status and standings in place (local usage
        and unchanged throttle buckets stay); `unchanged` are the standings as they were
        (a standing equal to its old self keeps its GuardStanding, bucket included).
        Returns False, changing nothing, for a customer this snapshot does not hold.
        Its plan and keys must be as built (a change there needs a new snapshot).
        Raises InvalidStateError as build_snapshot does."""
        index = self._store.find_id(customer.id)
        if index < 0:
            return False
        status_number = _STATUS_NUMBERS.get(customer.status)
        if status_number is None:
            raise InvalidStateError(f"customer {customer.id!r}: unknown subscription status {customer.status!r}")
        state = self._by_index.get(index)
        kept = state.guard_levels if state is not None else self._store.standings.get(index, _NO_STANDINGS)
        unchanged = unchanged or {}
        try:
            standings = {
                metric: kept[metric] if metric in kept and unchanged.get(metric) == standing
                else _guard_standings(standing, now, self._store.shared)
                for metric, standing in customer.levels.items()
            }
        except DecisionCoreError as err:
            raise InvalidStateError(f"customer {customer.id!r}: {err}") from err
        self._store.status_of[index] = status_number
        if standings:
            self._store.standings[index] = standings
        else:
            self._store.standings.pop(index, None)
        if state is not None:
            state.restate(customer.status, standings)
        return True

    def __len__(self) -> int:
        return len(self._store)

    def __setattr__(self, name: str, value: object) -> None:
        # Compiled, only assignments from Python get here (never the class's own).
        if cython.compiled or getattr(self, "_sealed", False):
            raise AttributeError("EdgeSnapshot is immutable; build a new one instead")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"EdgeSnapshot(version={self.version!r}, customers={len(self)})"


class _PlanState:
    # What all customers of one plan share.
    __slots__ = ("tier", "features", "quotas", "quota_metrics", "hard_metrics")

    def __init__(self, plan: Plan, window_s: int) -> None:
        self.tier = plan.tier
        self.features = frozenset(plan.features)
        self.quota_metrics = tuple(plan.quotas)
        self.hard_metrics = tuple(metric for metric, quota in plan.quotas.items() if quota.hard)
        self.quotas = PlanQuotas(
            [QuotaLimit(metric, quota.limit, quota.hard, window_s) for metric, quota in plan.quotas.items()]
        )


class _CustomerStore:
    """Every customer of a snapshot in flat arrays, and an open-addressing table from
    the first INDEX_DIGEST_BYTES of each key digest to its customer.

    The table has a power-of-two number of slots, at most half full; a slot holds
    key number + 1 (0 = empty) and probing is linear, comparing whole digests.
    Customers are found by id through a table of the same shape over the ids
    (customer number + 1 per slot, 4 bytes each), built on first use: a million
    customers cost 8 MiB there, not a dict of a million strings.
    """

    def __init__(self, plans: list[_PlanState], period_end: float, shared: bool = False) -> None:
        self.plans = plans
        self.period_end = period_end
        self.shared = shared
        self.ids = bytearray()
        self.id_ends = array("I")
        self.plan_of = array("H")
        self.status_of = array("B")
        self.usage = array("q")          # each customer's usage, one per plan quota metric
        self.usage_start = array("I")
        self.period_ends = None          # each customer's period end, once one differs
        self.standings: dict[int, dict[str, GuardStanding]] = {}
        self.digests = bytearray()       # key digests, INDEX_DIGEST_BYTES each
        self.key_owner = array("I")      # customer of each key
        self.slots = array("I")
        self.mask = 0
        self.id_slots = None             # the id table, once a customer is looked up by id
        self.id_mask = 0

    def __len__(self) -> int:
        return len(self.plan_of)

    def add(self, customer_id: str, plan_number: int, status_number: int, usage: Mapping[str, int],
            standings: dict[str, GuardStanding], digests: list[bytes], period_end: float) -> int:
        index = len(self.plan_of)
        self.ids += customer_id.encode()
        self.id_ends.append(len(self.ids))
        self.plan_of.append(plan_number)
        self.status_of.append(status_number)
        if period_end != self.period_end and self.period_ends is None:
            self.period_ends = array("d", [self.period_end]) * index
        if self.period_ends is not None:
            self.period_ends.append(period_end)
        self.usage_start.append(len(self.usage))
        for metric in self.plans[plan_number].quota_metrics:
            self.usage.append(usage.get(metric, 0))
        if standings:
            self.standings[index] = standings
        for digest in digests:
            self.digests += digest
            self.key_owner.append(index)
        return index

    def seal(self) -> list[tuple[int, int, bytes]]:
        """Build the key table; returns (customer, earlier customer, digest) for keys
        whose digests clash (the caller refuses them)."""
        keys = len(self.key_owner)
        size = 8
        while size < keys * 2:
            size *= 2
        self.slots = array("I", bytes(4 * size))
        self.mask = size - 1
        clashes = []
        width = INDEX_DIGEST_BYTES
        for key in range(keys):
            digest = self.digests[key * width:(key + 1) * width]
            slot = int.from_bytes(digest[:8], "little") & self.mask
            while self.slots[slot]:
                other = self.slots[slot] - 1
                if self.digests[other * width:(other + 1) * width] == digest:
                    clashes.append((self.key_owner[key], self.key_owner[other], bytes(digest)))
                    break
                slot = (slot + 1) & self.mask
            else:
                self.slots[slot] = key + 1
        return clashes

    def find(self, digest: bytes) -> int:
        """The customer owning `digest` (INDEX_DIGEST_BYTES long), or -1."""
        width = INDEX_DIGEST_BYTES
        slot = int.from_bytes(digest[:8], "little") & self.mask
        while True:
            key = self.slots[slot]
            if not key:
                return -1
            key -= 1
            if self.digests[key * width:(key + 1) * width] == digest:
                return self.key_owner[key]
            slot = (slot + 1) & self.mask

    def find_id(self, customer_id: str) -> int:
        """The customer whose id is `customer_id`, or -1."""
        if self.id_slots is None:
            self._index_ids()
        wanted = customer_id.encode()
        slot = _id_hash(wanted, 0, len(wanted)) & self.id_mask
        while True:
            index = self.id_slots[slot]
            if not index:
                return -1
            index -= 1
            start = self.id_ends[index - 1] if index else 0
            if self.ids[start:self.id_ends[index]] == wanted:
                return index
            slot = (slot + 1) & self.id_mask

    def _index_ids(self) -> None:
        count = len(self.plan_of)
        size = 8
        while size < count * 2:
            size *= 2
        slots = array("I", bytes(4 * size))
        _fill_id_slots(self.ids, self.id_ends, slots, size - 1)
        self.id_slots = slots
        self.id_mask = size - 1

    def customer_id(self, index: int) -> str:
        start = self.id_ends[index - 1] if index else 0
        return self.ids[start:self.id_ends[index]].decode()

    def materialize(self, index: int) -> CustomerState:
        plan = self.plans[self.plan_of[index]]
        start = self.usage_start[index]
        usage = {metric: self.usage[start + offset] for offset, metric in enumerate(plan.quota_metrics)}
        state = CustomerState(
            self.customer_id(index),
            plan.tier,
            _STATUSES[self.status_of[index]],
            plan.features,
            plan.quotas,
            usage,
            self.standings.get(index, _NO_STANDINGS),
            self.period_end if self.period_ends is None else self.period_ends[index],
        )
        if self.shared:
            for metric in plan.hard_metrics:
                # Nothing leased here yet: used up, as far as this worker may admit.
                state.add_usage(metric, plan.quotas.limit_at(plan.quotas.slot(metric)).limit - usage[metric])
                state.report_usage(metric, usage[metric])
        return state


_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3


def _id_hash(data, start, end):
    # FNV-1a (64 bits) of data[start:end]: the same in C and in Python.
    value = _FNV_OFFSET
    for at in range(start, end):
        value = (value ^ data[at]) * _FNV_PRIME
        if not cython.compiled:
            value &= 0xFFFFFFFFFFFFFFFF     # C arithmetic on 64 bits wraps by itself
    return value


def _fill_id_slots(ids, id_ends, slots, mask):
    # Each customer number + 1 into the id table, probing linearly.
    start = 0
    for index in range(len(id_ends)):
        end = id_ends[index]
        slot = _id_hash(ids, start, end) & mask
        while slots[slot]:
            slot = (slot + 1) & mask
        slots[slot] = index + 1
        start = end


def build_snapshot(
    plans: Mapping[str, Plan],
    customers: Iterable[Customer],
    period_start: float,
    period_end: float,
    now: float,
    version: str = "built",
    shared: bool = False,
    valid_until: float = math.inf,
) -> EdgeSnapshot:
    """Build a snapshot from plans (name -> Plan) and customers (Customer values as
    in the edge state file, which need not come from one; a generator keeps memory
    flat for millions).

    `period_start`/`period_end` are epoch seconds (the quota window is their
    difference; a customer's own `period_end` overrides the end for it); `now`
    starts every level-2 throttle bucket full.

    `shared`: the workers of a deployment share hard quotas and throttles through a
    ledger (proxy.quota_leases, proxy.throttle_leases). Then a customer's hard quota
    counters start used up (nothing leased to this worker yet), while what the
    customer is told it used (RateLimit) is its usage as given; and enforcing level-2
    buckets start empty, fed from the deployment's shared ones. Usage of a metric
    without a quota in the plan is not counted. `valid_until`: see EdgeSnapshot.
    Raises InvalidStateError for an
    unknown plan, a duplicate customer id or key digest, a digest that is not 64
    hex characters, a period that does not end after it starts, and (naming the
    customer) any state the decision core refuses, such as a throttle rate too
    large for its bucket.
    """
    window_s = int(period_end - period_start)
    if window_s <= 0:
        raise InvalidStateError(f"the billing period must end after it starts, got {period_start}..{period_end}")
    plan_numbers = {name: number for number, name in enumerate(plans)}
    store = _CustomerStore([_PlanState(plan, window_s) for plan in plans.values()], float(period_end), shared)
    seen_ids: set[str] = set()
    for customer in customers:
        plan_number = plan_numbers.get(customer.plan)
        if plan_number is None:
            raise InvalidStateError(f"customer {customer.id!r}: unknown plan {customer.plan!r}")
        if customer.id in seen_ids:
            raise InvalidStateError(f"customer {customer.id!r} is listed twice")
        seen_ids.add(customer.id)
        status_number = _STATUS_NUMBERS.get(customer.status)
        if status_number is None:
            raise InvalidStateError(f"customer {customer.id!r}: unknown subscription status {customer.status!r}")
        if any(units < 0 for units in customer.usage.values()):
            raise InvalidStateError(f"customer {customer.id!r}: negative usage")
        try:
            standings = {metric: _guard_standings(standing, now, shared)
                         for metric, standing in customer.levels.items()}
            digests = [_digest(hex_digest)[:INDEX_DIGEST_BYTES] for hex_digest in customer.api_keys]
        except DecisionCoreError as err:
            raise InvalidStateError(f"customer {customer.id!r}: {err}") from err
        own_end = period_end if customer.period_end is None else customer.period_end.epoch_s
        store.add(customer.id, plan_number, status_number, customer.usage, standings, digests, own_end)
    seen_ids.clear()
    clashes = store.seal()
    if clashes:
        owner, other, digest = clashes[0]
        raise InvalidStateError(
            f"customer {store.customer_id(owner)!r}: API key digest {digest.hex()[:12]}... already "
            f"belongs to customer {store.customer_id(other)!r}"
        )
    return EdgeSnapshot(store, version, float(period_end), float(valid_until))


def snapshot_from_file(state: EdgeStateFile, version: str, now: float) -> EdgeSnapshot:
    """Build the snapshot of a validated edge state file at `now` (epoch seconds),
    tagged with `version`, for the period in force at `now` (a `monthly` file's
    calendar month: the snapshot is valid until that month ends). Raises
    InvalidStateError as build_snapshot does (only a throttle rate or burst too
    large for a token bucket gets past validation)."""
    period = state.period_at(now)
    return build_snapshot(
        state.plans, state.customers, period.start.epoch_s, period.end.epoch_s, now, version,
        valid_until=period.end.epoch_s if state.rolling else math.inf,
    )


def _guard_standings(standings: Standing | tuple[Standing, ...], now: float, fed: bool) -> GuardStanding | tuple:
    # One standing, or the enforcing and the shadow guard's beside it.
    if isinstance(standings, tuple):
        return tuple(_guard_standing(standing, now, fed) for standing in standings)
    return _guard_standing(standings, now, fed)


def _guard_standing(standing: Standing, now: float, fed: bool) -> GuardStanding:
    # `fed`: an enforcing throttle's bucket gets its tokens from the deployment's
    # shared bucket (proxy.throttle_leases); a shadow one's refills here.
    bucket = None
    if standing.level == 2 and standing.throttle_rate is not None:
        rate = standing.throttle_rate
        bucket = TokenBucket(rate.tokens, rate.per_s, standing.effective_burst, now,
                             fed and standing.mode == "enforce")
    return GuardStanding(
        standing.guard,
        standing.level,
        standing.mode == "enforce",
        bucket,
        frozenset(standing.locked_features),
        standing.downgrade_models,
    )


def _digest(hex_digest: str) -> bytes:
    try:
        digest = bytes.fromhex(hex_digest)
    except ValueError:
        digest = b""
    if len(digest) != KEY_DIGEST_BYTES:
        raise InvalidStateError(f"an API key digest is 64 hex characters, got {hex_digest!r}")
    return digest
