# Ingest: usage and cost events in, through four gates, each event judged on its own.
#   1. schema     - the event decodes as its kind says (field, type, range, unknown fields),
#                   within the maxima below, with no control character in any text;
#   2. timestamp  - a timezone is given; not more than FUTURE_LIMIT_S ahead of now,
#                   not more than PAST_LIMIT_S behind;
#   3. idempotency - the store keeps an event once per (kind, customer, id): a repeat is a
#                   duplicate, a repeat with another payload a conflict (rejected);
#   4. lateness   - more than LATE_AFTER_S behind now: accepted, flagged late and listed
#                   for reconciliation.
# An event the catalog cannot rate (an unknown metric, no billable subscription, an
# instant before the subscription starts) is kept but reported UNRATED with why,
# listed, and rated later by rate_unrated() once the catalog knows it: never
# silently accepted at no revenue.
# One bad event never sinks the rest of its batch, and a retried batch counts nothing twice.
# Beyond the gates, the store refuses (per event) one that would take its billing
# period's running totals past store.MAX_PERIOD_TOTAL.
from __future__ import annotations

import datetime
import decimal
from collections.abc import Sequence
from typing import Annotated, Generic, NamedTuple, TypeVar

import msgspec

from config.currencies import CurrencyCode, currency_problem
from config.values import AMOUNT_PATTERN, MAX_EVENT_QUANTITY, to_nanos
from control_plane.rating import Rater
from control_plane.store import ACCEPTED, CONFLICT, COST, DUPLICATE, REFUSED, USAGE, Store, StoredEvent

FUTURE_LIMIT_S = 5 * 60
PAST_LIMIT_S = 90 * 86400
LATE_AFTER_S = 24 * 3600
# The source a proxy's meter events carry: admitted against units leased to it.
PROXY_SOURCE = "proxy"
MAX_BATCH_EVENTS = 10_000
# The maxima of one event (documented in the README): units of usage, money of a cost,
# and the sizes of its texts.
MAX_QUANTITY = MAX_EVENT_QUANTITY
MAX_AMOUNT = decimal.Decimal(10**9)
MAX_ID_CHARS = 200
MAX_NAME_CHARS = 128             # a metric, a provider, a source
MAX_DIMENSIONS = 32
MAX_DIMENSION_KEY_CHARS = 64
MAX_DIMENSION_VALUE_CHARS = 256
Quantity = Annotated[int, msgspec.Meta(ge=0, le=MAX_QUANTITY)]
# A cost's amount, >= 0 and at most MAX_AMOUNT (checked in CostEvent.__post_init__).
Amount = Annotated[decimal.Decimal, msgspec.Meta(extra_json_schema={
    "pattern": AMOUNT_PATTERN, "description": f"a decimal >= 0 and at most {MAX_AMOUNT}, exact to 9 places"})]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
Dimensions = Annotated[
    dict[Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_DIMENSION_KEY_CHARS)],
         Annotated[str, msgspec.Meta(max_length=MAX_DIMENSION_VALUE_CHARS)]],
    msgspec.Meta(max_length=MAX_DIMENSIONS)]

# What an event can come to (the first three as the store says).
REJECTED = "rejected"
ACCEPTED_LATE = "accepted_late"
UNRATED = "unrated"

class UsageEvent(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    """Usage of one metric by one customer: `quantity` whole units at `timestamp`
    (RFC 3339 with a timezone). `id` is the sender's idempotency key."""

    id: str
    customer_id: str
    metric: Name
    quantity: Quantity
    timestamp: datetime.datetime
    dimensions: Dimensions = {}
    source: Name = ""

    def __post_init__(self):
        _check_common(self)
        if not self.metric:
            raise ValueError("`metric` must not be empty")
        for key, value in self.dimensions.items():
            if not (key.isprintable() and value.isprintable()):
                raise ValueError(f"dimension `{_shown(key)}` holds a control character")


class CostEvent(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    """A cost of serving one customer (COGS): `amount` in the currency of the
    customer's plan, as a decimal (string or number; at most 9 decimal places), for
    one `metric` or for the customer overall (no metric), at `timestamp`. `provider`
    says who charged it. `currency`, when given, must be the plan's: a cost in another
    is kept unrated (never added to amounts in another currency)."""

    id: str
    customer_id: str
    amount: Amount
    timestamp: datetime.datetime
    metric: Name | None = None
    provider: Name = ""
    source: Name = ""
    currency: CurrencyCode | None = None

    def __post_init__(self):
        _check_common(self)
        if self.currency is not None and (unknown := currency_problem(self.currency)) is not None:
            raise ValueError(unknown)
        if self.amount.is_finite() and self.amount > MAX_AMOUNT:
            raise ValueError(f"`amount` must be at most {MAX_AMOUNT} (one cost event), got {self.amount:.3e}")
        to_nanos(self.amount)
        for name in ("metric", "provider"):
            if not (getattr(self, name) or "").isprintable():
                raise ValueError(f"`{name}` holds a control character")
        if self.metric == "":
            raise ValueError("`metric` must not be empty (leave it out for the customer overall)")

    @property
    def amount_nanos(self) -> int:
        return to_nanos(self.amount)


def _check_common(event):
    # Texts are printable (str.isprintable: no control character, C0, DEL or C1, nor
    # another character that prints nothing, such as a line separator).
    for name in ("id", "customer_id"):
        value = getattr(event, name)
        if not value or len(value) > MAX_ID_CHARS:
            raise ValueError(f"`{name}` must be 1 to {MAX_ID_CHARS} characters")
        if not value.isprintable():
            raise ValueError(f"`{name}` holds a control character")
    if not event.source.isprintable() or (isinstance(event, UsageEvent) and not event.metric.isprintable()):
        raise ValueError("`metric` and `source` hold no control character")


def _shown(text):
    # A name for a message: control characters escaped, cut short.
    return repr(text[:40])[1:-1]


# Events, their results and stored forms hold only strings, numbers, instants and
# string maps: they can never be part of a reference cycle, so the cyclic garbage
# collector is spared tracking the thousands a batch makes (gc=False).
_DECODERS = {USAGE: msgspec.json.Decoder(UsageEvent), COST: msgspec.json.Decoder(CostEvent)}
_BATCH = msgspec.json.Decoder(list[msgspec.Raw] | dict[str, list[msgspec.Raw]])
_encode = msgspec.json.Encoder(order="sorted").encode


class EventResult(msgspec.Struct, omit_defaults=True, gc=False):
    """What became of one event of a batch: its position, its id when it had one, its
    status (ACCEPTED, ACCEPTED_LATE, DUPLICATE or REJECTED) and, when rejected, why."""

    index: int
    status: str
    id: str | None = None
    reason: str | None = None


class IngestReport(msgspec.Struct):
    """A batch's outcome: counts per status and one result per event, in order."""

    accepted: int
    accepted_late: int
    duplicate: int
    rejected: int
    results: list[EventResult]
    unrated: int = 0


Event = TypeVar("Event")


class Batch(msgspec.Struct, Generic[Event], forbid_unknown_fields=True):
    """A JSON body of events as an object (split_batch also takes a bare array)."""

    events: list[Event]


class BatchError(ValueError):
    """The request body is not a batch at all (nothing in it could be judged)."""


def split_batch(body: bytes, ndjson: bool) -> list[bytes | None]:
    """The events of a request body, each as raw JSON bytes (None for an NDJSON line
    that is not JSON). JSON: an array of events or {"events": [...]}. NDJSON: one
    event per line, blank lines skipped. Raises BatchError for a JSON body that does
    not parse, has another shape, or holds more than MAX_BATCH_EVENTS events."""
    if ndjson:
        events = []
        for line in body.splitlines():
            if line.strip():
                try:
                    events.append(bytes(msgspec.json.decode(line, type=msgspec.Raw)))
                except (msgspec.DecodeError, RecursionError):
                    events.append(None)
    else:
        try:
            batch = _BATCH.decode(body)
        except msgspec.DecodeError as error:
            raise BatchError(f"the body is not a JSON array of events or {{\"events\": [...]}}: {error}") from None
        except RecursionError:
            raise BatchError("the body nests JSON deeper than an event batch can") from None
        if isinstance(batch, dict):
            if set(batch) != {"events"}:
                raise BatchError('a JSON object body must be {"events": [...]} and nothing else')
            batch = batch["events"]
        events = [bytes(raw) for raw in batch]
    if len(events) > MAX_BATCH_EVENTS:
        raise BatchError(f"a batch holds at most {MAX_BATCH_EVENTS} events, got {len(events)}")
    return events


def judge(kind: str, raw: bytes | None, now: float) -> tuple[UsageEvent | CostEvent | None, str | None]:
    """Gates 1 and 2 for one event: (the event, None) when it passes, (None, reason)
    when it is rejected. `now` is epoch seconds."""
    event, reason, _ = _judge(kind, raw, now)
    return event, reason


def _judge(kind, raw, now):
    # judge(), plus the event's instant in epoch seconds (0.0 when rejected).
    if raw is None:
        return None, "not valid JSON", 0.0
    try:
        event = _DECODERS[kind].decode(raw)
    except msgspec.ValidationError as error:
        return None, f"invalid {kind} event: {error}", 0.0
    except msgspec.DecodeError as error:
        return None, f"not valid JSON: {error}", 0.0
    except RecursionError:
        return None, "nests JSON deeper than an event can", 0.0
    if event.timestamp.tzinfo is None:
        return None, "`timestamp` needs a timezone (e.g. 2026-11-23T12:00:00Z)", 0.0
    at = event.timestamp.timestamp()
    if at - now > FUTURE_LIMIT_S:
        return None, f"`timestamp` is more than {FUTURE_LIMIT_S} s in the future", 0.0
    if now - at > PAST_LIMIT_S:
        return None, f"`timestamp` is more than {PAST_LIMIT_S // 86400} days old", 0.0
    return event, None, at


class Ingested(NamedTuple):
    """What ingest_batch did: the batch's `report`, the `customers` with at least
    one event kept by this batch (whose margins it may have moved), and the units of
    hard quotas it kept from outside a proxy's lease, by (customer, metric, period
    end): the lease ledger counts them too."""

    report: IngestReport
    customers: frozenset[str]
    ledgered: dict[tuple[str, str, float], int]


async def ingest(store: Store, kind: str, raw_events: Sequence[bytes | None], now: float,
                 source: str = "api", rater: Rater | None = None) -> IngestReport:
    """Judge every event of a batch (see split_batch) and keep those that pass, once.

    `kind` is USAGE or COST; `now` epoch seconds (the gates' clock); `source` names
    where the batch came from (kept in each event's provenance unless the event names
    its own). Each accepted event is rated (`rater`, default: the store's catalog as
    it is now) and moves its billing period's running totals in the same transaction.
    Raises StoreError when the store fails: then nothing of the batch can be
    reported as kept, and the whole batch can be sent again safely."""
    return (await ingest_batch(store, kind, raw_events, now, source, rater)).report


async def ingest_batch(store: Store, kind: str, raw_events: Sequence[bytes | None], now: float,
                       source: str = "api", rater: Rater | None = None, tally_ledgered: bool = False) -> Ingested:
    """ingest(), also saying which customers had events kept (and with
    `tally_ledgered`, the hard-quota units kept from outside a lease)."""
    results: list[EventResult | None] = [None] * len(raw_events)
    kept_at, events, origins, to_store = [], [], [], []
    rejected = 0
    provenances = {}             # (source, late) -> its provenance: the same for most of a batch
    for index, raw in enumerate(raw_events):
        event, reason, occurred_at = _judge(kind, raw, now)
        if event is None:
            results[index] = EventResult(index, REJECTED, _id_of(raw), reason)
            rejected += 1
            continue
        late = now - occurred_at > LATE_AFTER_S
        origin = event.source or source
        provenance = provenances.get((origin, late))
        if provenance is None:
            provenance = provenances[origin, late] = _encode({
                "source": origin,
                "ingested_at": now,
                "gates": {"schema": "passed", "timestamp": "passed", "late": late},
            })
        kept_at.append(index)
        events.append(event)
        origins.append(origin)
        to_store.append(StoredEvent(kind, event.customer_id, event.id, _encode(event), occurred_at, now, late,
                                    provenance))
    if events and rater is None:
        rater = await Rater.load(store)
    rating = rater.rating if events else None
    known = rater.metrics if kind == USAGE and events else None
    # (A proxy's events were admitted against units leased to it: already in the ledger.)
    ratings = [None if known is not None and event.metric not in known else rating(kind, event, origin == PROXY_SOURCE)
               for event, origin in zip(events, origins)]
    unrated_why = {position: rater.unrated_reason(kind, events[position])
                   for position, rated in enumerate(ratings) if rated is None}
    outcomes = await store.record_events(to_store, ratings)
    counts = {ACCEPTED: 0, ACCEPTED_LATE: 0, DUPLICATE: 0, UNRATED: 0}
    customers = set()
    ledgered = {}
    unrated = []
    for position, (index, event, stored, outcome, rated) in enumerate(
            zip(kept_at, events, to_store, outcomes, ratings)):
        why = unrated_why.get(position) if unrated_why else None
        if why is not None and outcome in (ACCEPTED, DUPLICATE):
            # Kept, not rated: listed (again, after a retry: once) until it can be.
            unrated.append((kind, event.customer_id, event.id, why, now))
            if outcome == ACCEPTED:
                results[index] = EventResult(index, UNRATED, event.id, why)
                counts[UNRATED] += 1
                continue
        if outcome == ACCEPTED:
            status = ACCEPTED_LATE if stored.late else ACCEPTED
            results[index] = EventResult(index, status, event.id)
            counts[status] += 1
            customers.add(event.customer_id)
            if tally_ledgered and rated is not None and rated.ledgered:
                key = (rated.customer_id, rated.metric, rated.period_end)
                ledgered[key] = ledgered.get(key, 0) + rated.units
        elif outcome == DUPLICATE:
            results[index] = EventResult(index, DUPLICATE, event.id)
            counts[DUPLICATE] += 1
        elif outcome == CONFLICT:
            results[index] = EventResult(index, REJECTED, event.id,
                                         "an event with this id was already accepted with a different payload")
            rejected += 1
        else:                   # REFUSED: why
            results[index] = EventResult(index, REJECTED, event.id, outcome[len(REFUSED) + 2:])
            rejected += 1
    await store.add_unrated(unrated)
    report = IngestReport(counts[ACCEPTED], counts[ACCEPTED_LATE], counts[DUPLICATE], rejected, results,
                          counts[UNRATED])
    return Ingested(report, frozenset(customers), ledgered)


class Rerated(msgspec.Struct):
    """What rate_unrated() did: events `rated` now, and those `still_unrated`."""

    rated: int
    still_unrated: int


async def rate_unrated(store: Store, rater: Rater) -> tuple[Rerated, frozenset[str]]:
    """Rate every unrated event the catalog (`rater`) can rate now, oldest first, as
    if it arrived now (its revenue from the running totals as they stand); returns
    what it did and the customers whose totals moved."""
    after, rated, still, customers = 0, 0, 0, set()
    while True:
        page = await store.unrated_events(after, 1000)
        if not page:
            return Rerated(rated, still), frozenset(customers)
        now_rated = []
        for seq, _, stored in page:
            event = _DECODERS[stored.kind].decode(stored.payload)
            if rater.unrated_reason(stored.kind, event) is None:
                source = msgspec.json.decode(stored.provenance).get("source")
                now_rated.append((seq, rater.rating(stored.kind, event, source == PROXY_SOURCE)))
        done = set(await store.rate_unrated([(seq, rating) for seq, rating in now_rated if rating is not None]))
        rated += len(done)
        still += len(page) - len(done)
        customers.update(rating.customer_id for seq, rating in now_rated if seq in done)
        after = page[-1][0]


def _id_of(raw):
    # The id of a rejected event when it has a readable one, so the sender can match it.
    if raw is None:
        return None
    try:
        document = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    value = document.get("id") if isinstance(document, dict) else None
    return value if isinstance(value, str) else None
