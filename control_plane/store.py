# Where the control plane keeps the catalog and every accepted event: the Store role,
# and open_store(url), which picks the backend (an embedded SQLite file by default,
# PostgreSQL for `postgresql://` URLs). Catalog entries are documents (JSON) under a
# key; an upsert says whether it created, changed or left an entry as it was, so a
# declarative apply can be repeated. Events are kept once per (customer, event id).
# Webhooks wait in an outbox, written with the level transition they tell of.
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, Protocol

import msgspec

from config.catalog_file import SECTIONS

# Catalog kinds, in the order an apply must write them (see config.catalog_file).
CATALOG_KINDS = tuple(kind for _, kind in SECTIONS)
CREATED, UPDATED, UNCHANGED = "created", "updated", "unchanged"

# Event kinds and what recording one can come to.
USAGE, COST = "usage", "cost"
ACCEPTED, DUPLICATE, CONFLICT = "accepted", "duplicate", "conflict"
# An event the store cannot keep: the outcome is REFUSED + ": " + why.
REFUSED = "refused"
# Largest running total of a period, per customer and metric: units, revenue and cost
# in nanos (2**62: about 4.6 billion in money; every store keeps them as 64-bit integers).
MAX_PERIOD_TOTAL = 2**62


class StoreError(Exception):
    """A store operation failed; the backend's own exception is its __cause__.
    `permanent`: the store refused the data itself (a value it cannot hold), so the
    same call will fail again; otherwise it may succeed when tried again."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class StoredEvent(msgspec.Struct, frozen=True, gc=False):      # never in a reference cycle
    """One event as the store keeps it: `kind` (USAGE or COST), `customer_id`,
    `event_id` (the sender's idempotency key), `payload` (the event as accepted, JSON
    bytes; a repeat must match it exactly to count as a duplicate), `occurred_at` and
    `ingested_at` (epoch seconds), `late` (arrived late: listed for reconciliation)
    and `provenance` (JSON bytes: source, gate results, pricing)."""

    kind: str
    customer_id: str
    event_id: str
    payload: bytes
    occurred_at: float
    ingested_at: float
    late: bool = False
    provenance: bytes = b"{}"


class Rating(msgspec.Struct, frozen=True):
    """How an event moves its billing period's running totals: the totals row
    (`customer_id`, `metric` — or OVERALL for a cost not tied to a metric —,
    `period_start`, `period_end`, epoch seconds) under `subscription`; `units` it
    adds; `price(units_before)` -> (revenue_nanos, cogs_nanos) it adds, given the
    period's units so far; `context` (plan, period, ...) kept in its provenance;
    `ledgered`: its units count against the hard quota's lease ledger too (usage on
    a hard quota that did not come through a proxy's lease).
    (A Struct: one is made per event, and a Struct is several times cheaper to make
    than a NamedTuple.)"""

    customer_id: str
    metric: str
    period_start: float
    period_end: float
    subscription: str
    units: int
    price: Callable[[int], tuple[int, int]]
    context: dict
    ledgered: bool = False


class PeriodTotals(NamedTuple):
    """A billing period's running totals for one customer and metric (or OVERALL)."""

    customer_id: str
    metric: str
    period_start: float
    period_end: float
    subscription: str
    units: int
    revenue_nanos: int
    cogs_nanos: int


OVERALL = "overall"


class GuardLevel(NamedTuple):
    """A customer's margin level (0..3) for one metric (or OVERALL) under a guard.
    One per (customer, metric, mode): the enforcing guard's and, beside it, the
    shadow guard's (see GuardSet.resolve)."""

    customer_id: str
    metric: str
    guard_id: str
    level: int
    margin_pct: float | None
    changed_at: float
    mode: str = "enforce"


class Action(NamedTuple):
    """A level transition as the audit trail keeps it: who, which metric, under which
    guard, from and to which level, at what margin (None: cost with no revenue),
    the guard's protected margin, its mode (enforce or shadow) and when."""

    customer_id: str
    metric: str
    guard_id: str
    level_from: int
    level_to: int
    margin_pct: float | None
    min_margin_pct: float
    mode: str
    at: float


# What became of a webhook in the outbox.
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
WEBHOOK_STATUSES = (PENDING, DELIVERED, FAILED)


class Webhook(NamedTuple):
    """A webhook to enqueue: `id` (the receiver's idempotency key, the same on every
    attempt), the notify `channel` it goes to, and `body`, the JSON bytes sent (and
    signed) as they are."""

    id: str
    channel: str
    body: bytes


class DeadLetter(NamedTuple):
    """An event that could not be taken in, kept so none is lost unseen: where it came
    from (`source`: "meter-stream"), the stream entry it was in, the event as sent
    (raw bytes), why it was refused, and when (epoch seconds)."""

    source: str
    entry_id: str
    event: bytes
    reason: str
    at: float


class WebhookDelivery(NamedTuple):
    """A webhook in the outbox: its `seq` (listing order), `id`, `channel`, the seq of
    the action (level transition) it tells of, `body`, its `status` (PENDING,
    DELIVERED or FAILED: given up), when it was created, the attempts made so far,
    when the next is due (None once it is no longer pending), when it was delivered
    or given up, and the error of the latest failed attempt (kept after a success)."""

    seq: int
    id: str
    channel: str
    action_seq: int
    body: bytes
    status: str
    created_at: float
    attempts: int
    next_attempt_at: float | None
    delivered_at: float | None
    failed_at: float | None
    last_error: str | None


class ApiKey(msgspec.Struct, frozen=True):
    """A customer's API key as stored: never the key itself, only its sha256 digest
    (`key_hash`, hex) and its first characters (`prefix`) to tell keys apart."""

    id: str
    customer_id: str
    prefix: str
    key_hash: str
    created_at: float
    revoked_at: float | None = None


class Token(msgspec.Struct, frozen=True):
    """A bearer token of the REST API as listed: never the token itself (only its
    sha256 digest is kept, apart from this). `scope` names what it may call
    (control_plane.tokens.SCOPE_ROUTES); `revoked_at` is None while it is live."""

    id: str
    name: str
    scope: str
    created_at: float
    revoked_at: float | None = None


class AuditEntry(msgspec.Struct, frozen=True):
    """One change to the catalog, an API key or a token, as the audit trail keeps it:
    when (`at`, epoch seconds), `who` made it (a token: `token <id> (<name>)`, or a
    command: `aforo apply <file> (<user>)`), to what (`kind` and `key`: a catalog kind,
    `api_key` or `token`, and its key or id), the `change` (created, updated, deleted
    or revoked) and the entry `before` and `after` it (None where there was none;
    never a key's or token's secret or digest)."""

    seq: int
    at: float
    who: str
    kind: str
    key: str
    change: str
    before: object = None
    after: object = None


# AuditEntry.change
CHANGE_DELETED = "deleted"
CHANGE_REVOKED = "revoked"


class Store(Protocol):
    """The control plane's store. Every method may raise StoreError.

    Catalog: `put_catalog(kind, key, document)` upserts a JSON-able document and
    returns CREATED, UPDATED or UNCHANGED; `get_catalog(kind, key)` returns it or
    None; `list_catalog(kind)` returns (key, document) pairs in key order;
    `delete_catalog(kind, key)` returns whether it existed. `catalog_version()` is a
    number that moves, in the same transaction, with every change to the catalog
    (CREATED, UPDATED or a delete; never with UNCHANGED), whichever process makes it:
    what was read from the catalog is still current while the number has not moved.

    Audit trail: every method that changes the catalog, an API key or a token takes
    `author` (who makes the change, as AuditEntry.who) and records an AuditEntry in
    the change's own transaction (none for UNCHANGED or a refused change).
    `audit(kind=None, key=None, after_seq=0, limit=100)` lists them oldest first.

    Keys: `add_api_key(key)`, `api_keys(customer_id, prefix="")`, `live_api_keys()` (every
    customer's keys not revoked), `revoke_api_key(id, at)` (the key's customer id;
    None when unknown or already revoked), `api_key_by_hash(key_hash)` (revoked
    keys included, so a caller can tell revoked from unknown).

    Tokens (bearer tokens of the REST API; only their sha256 is kept):
    `add_token(token, token_hash)`, `live_token(token_hash)` (the Token, None when
    unknown or revoked), `tokens()` (every token, revoked ones included, oldest first),
    `revoke_token(id, at)` (the revoked Token; None when unknown or already revoked),
    `admin_tokens_count()` (live tokens of the admin scope), `revoke_tokens_named(name,
    at)` (every live token of that name; returns how many).

    Events: `record_events(events, ratings=None)` keeps each event unless one with the
    same (kind, customer, event id) is already kept, and returns, per event in order,
    ACCEPTED, DUPLICATE (same payload), CONFLICT (same id, other payload) or
    REFUSED + ": " + why (a value the store cannot hold, or one that would take its
    period's running totals past MAX_PERIOD_TOTAL; the others are kept); repeats
    inside one batch are judged against the first. Safe to call concurrently: an
    event is accepted exactly once. `ratings` (one Rating or None per event) move the
    running totals of each accepted event's billing period in the same transaction,
    so totals count every accepted event exactly once; `period_totals(at,
    customer_id=None)` returns the totals of the periods holding instant `at`, and
    `period_totals_of(at, customer_ids)` those of several customers at once.

    Guards: `guard_levels(customer_id=None)`, `guard_levels_of(customer_ids)` (several
    customers at once); `transition_level(action, webhooks=())`
    moves a level from `action.level_from` to `action.level_to`, appends the action to
    the trail and puts `webhooks` (one per channel at most) in the outbox, pending and
    due at once, all atomically and only if the level is still `level_from` (False
    otherwise: a transition, and so its webhooks, happen once however many evaluators
    race); `actions(customer_id=None, after_seq=0, limit=100)` lists the trail as
    (seq, Action), oldest first. `events(kind, customer_id)` returns what was kept,
    in ingest order; `late_events(since=0.0, limit=1000)` the late ones ingested at or
    after `since`, oldest first (for reconciliation).

    Webhook outbox: `claim_webhooks(now, lease_s, limit=100)` returns pending webhooks
    due at `now`, earliest due first, and moves each one's next attempt to `now + lease_s`,
    so no other claimer (another control plane on the same database) takes it while
    it is being sent; a claimer that dies leaves it due again after the lease.
    `record_webhook_attempt(id, at, error=None, retry_at=None)` counts one attempt of
    a pending webhook: no `error` marks it DELIVERED at `at`; an error with
    `retry_at` keeps it pending until then; an error without gives up (FAILED at
    `at`); False when it was not pending. `next_webhook_at()` is when the earliest
    pending webhook is due (None: none is pending); `webhook_counts()` the number of
    webhooks per status; `webhooks(status=None, after_seq=0, limit=100)` lists the
    outbox as WebhookDelivery, oldest first.

    Quota leases (hard quotas shared by proxy workers): `lease_quota(customer_id,
    metric, period_start, grant, period_end, subscription)` calls `grant(leased so
    far)` inside a transaction that holds the ledger row, adds what it returns, and
    returns it (concurrent leases are serialized: their sum never exceeds what
    `grant` allows). A ledger starts at the period's recorded units, and usage kept
    with a `ledgered` Rating (from outside a lease) moves it in its own transaction;
    `return_quota(customer_id, metric, period_start, units)` gives unused units back.
    `take_throttle(customer_id, guard_id, metric, take)` calls `take(state)` on the
    shared level-2 bucket of a customer under a guard for a metric (its state: the time its tokens are
    spent up to, epoch microseconds, 0 for a full bucket) inside a transaction that
    holds its row, keeps the new state `take` returns with its result, and returns
    that result (concurrent takes are serialized).

    Unrated events (kept, but the catalog could not rate them): `add_unrated(rows)`
    keeps (kind, customer_id, event_id, reason, ingested_at) once per event;
    `unrated_events(after_seq=0, limit=100)` lists (seq, reason, StoredEvent), oldest
    first; `rate_unrated([(seq, Rating)])` moves their totals as new events' would
    (refusing one past MAX_PERIOD_TOTAL) and returns the seqs no longer unrated.

    Dead letters: `add_dead_letters(letters)` keeps DeadLetters; `dead_letters(after_seq
    =0, limit=100)` lists them as (seq, DeadLetter), oldest first.
    """

    async def migrate(self) -> int: ...
    async def schema_version(self) -> int: ...
    async def close(self) -> None: ...

    async def put_catalog(self, kind: str, key: str, document: object, *, author: str) -> str: ...
    async def get_catalog(self, kind: str, key: str) -> object | None: ...
    async def list_catalog(self, kind: str) -> list[tuple[str, object]]: ...
    async def delete_catalog(self, kind: str, key: str, *, author: str) -> bool: ...
    async def catalog_version(self) -> int: ...

    async def add_api_key(self, key: ApiKey, *, author: str) -> None: ...
    async def api_keys(self, customer_id: str, prefix: str = "") -> list[ApiKey]: ...
    async def live_api_keys(self) -> list[ApiKey]: ...
    async def revoke_api_key(self, key_id: str, at: float, *, author: str) -> str | None: ...
    async def api_key_by_hash(self, key_hash: str) -> ApiKey | None: ...

    async def add_token(self, token: Token, token_hash: str, *, author: str) -> None: ...
    async def live_token(self, token_hash: str) -> Token | None: ...
    async def tokens(self) -> list[Token]: ...
    async def revoke_token(self, token_id: str, at: float, *, author: str) -> Token | None: ...
    async def admin_tokens_count(self) -> int: ...
    async def revoke_tokens_named(self, name: str, at: float, *, author: str) -> int: ...
    async def audit(self, kind: str | None = None, key: str | None = None, after_seq: int = 0,
                    limit: int = 100) -> list[AuditEntry]: ...

    async def record_events(self, events: Sequence[StoredEvent],
                            ratings: Sequence[Rating | None] | None = None) -> list[str]: ...
    async def period_totals(self, at: float, customer_id: str | None = None) -> list[PeriodTotals]: ...
    async def period_totals_of(self, at: float, customer_ids: Iterable[str]) -> list[PeriodTotals]: ...

    async def guard_levels(self, customer_id: str | None = None) -> list[GuardLevel]: ...
    async def guard_levels_of(self, customer_ids: Iterable[str]) -> list[GuardLevel]: ...
    async def transition_level(self, action: Action, webhooks: Sequence[Webhook] = ()) -> bool: ...
    async def lease_quota(self, customer_id: str, metric: str, period_start: float,
                          grant: Callable[[int], int], period_end: float, subscription: str) -> int: ...
    async def return_quota(self, customer_id: str, metric: str, period_start: float, units: int) -> None: ...
    async def add_unrated(self, unrated: Sequence[tuple[str, str, str, str, float]]) -> None: ...
    async def unrated_events(self, after_seq: int = 0,
                             limit: int = 100) -> list[tuple[int, str, StoredEvent]]: ...
    async def rate_unrated(self, rated: Sequence[tuple[int, Rating]]) -> list[int]: ...
    async def add_dead_letters(self, letters: Sequence[DeadLetter]) -> None: ...
    async def dead_letters(self, after_seq: int = 0, limit: int = 100) -> list[tuple[int, DeadLetter]]: ...
    async def take_throttle(self, customer_id: str, guard_id: str, metric: str,
                            take: Callable[[int], tuple[int, object]]) -> object: ...
    async def actions(self, customer_id: str | None = None, after_seq: int = 0,
                      limit: int = 100) -> list[tuple[int, Action]]: ...
    async def events(self, kind: str, customer_id: str) -> list[StoredEvent]: ...
    async def late_events(self, since: float = 0.0, limit: int = 1000) -> list[StoredEvent]: ...

    async def claim_webhooks(self, now: float, lease_s: float, limit: int = 100) -> list[WebhookDelivery]: ...
    async def record_webhook_attempt(self, webhook_id: str, at: float, error: str | None = None,
                                     retry_at: float | None = None) -> bool: ...
    async def next_webhook_at(self) -> float | None: ...
    async def webhook_counts(self) -> dict[str, int]: ...
    async def webhooks(self, status: str | None = None, after_seq: int = 0,
                       limit: int = 100) -> list[WebhookDelivery]: ...


DEFAULT_SQLITE_PATH = "aforo.db"


async def open_store(url: str = DEFAULT_SQLITE_PATH) -> Store:
    """The store at `url`, migrated to the current schema: `postgresql://…` (or
    `postgres://…`) for PostgreSQL, `sqlite:PATH` or a plain path for an SQLite
    file (created when missing). Raises StoreError when it cannot be opened."""
    if url.startswith(("postgresql://", "postgres://")):
        from control_plane.postgres_store import PostgresStore
        store = await PostgresStore.connect(url)
    else:
        from control_plane.sqlite_store import SqliteStore
        store = await SqliteStore.open(url.removeprefix("sqlite:"))
    await store.migrate()
    return store
