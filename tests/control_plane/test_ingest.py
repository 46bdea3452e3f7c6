# The ingest gates, on both stores: each gate's boundary, a batch with one bad event,
# retries and concurrent duplicates, late events listed for reconciliation.
import asyncio
import datetime
import json
import re
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from running_api import catalog_for_cus_1

from config.catalog_file import load_catalog_file
from control_plane.catalog import apply_catalog
from control_plane.ingest import (
    ACCEPTED_LATE,
    FUTURE_LIMIT_S,
    LATE_AFTER_S,
    MAX_AMOUNT,
    MAX_BATCH_EVENTS,
    MAX_QUANTITY,
    PAST_LIMIT_S,
    REJECTED,
    UNRATED,
    BatchError,
    ingest,
    rate_unrated,
    split_batch,
)
from control_plane.rating import Rater
from control_plane.store import ACCEPTED, COST, DUPLICATE, MAX_PERIOD_TOTAL, USAGE

NOW = 1_800_000_000.0


def stamp(seconds_from_now, offset_hours=0):
    zone = datetime.timezone(datetime.timedelta(hours=offset_hours))
    return datetime.datetime.fromtimestamp(NOW + seconds_from_now, zone).isoformat()


def usage(event_id="e1", at=0, **fields):
    event = {"id": event_id, "customer_id": "cus_1", "metric": "api_calls", "quantity": 3, "timestamp": stamp(at)}
    event.update(fields)
    return json.dumps(event).encode()


def cost(event_id="c1", at=0, **fields):
    event = {"id": event_id, "customer_id": "cus_1", "amount": "0.012345678", "timestamp": stamp(at)}
    event.update(fields)
    return json.dumps(event).encode()


def statuses(report):
    return [(result.status, result.reason) for result in report.results]


@pytest.mark.parametrize("at, status", [
    (FUTURE_LIMIT_S - 1, ACCEPTED), (FUTURE_LIMIT_S + 1, REJECTED),                   # now+299 s / now+301 s
    (-PAST_LIMIT_S + 1, ACCEPTED_LATE), (-PAST_LIMIT_S - 1, REJECTED),                # 90 days -/+ 1 s
    (-LATE_AFTER_S + 1, ACCEPTED), (-LATE_AFTER_S - 1, ACCEPTED_LATE),                # 24 h late
    (0, ACCEPTED),
])
def test_the_timestamp_gates_at_their_boundaries(backend, at, status):
    async def scenario(open_store):
        store = await open_store()
        await catalog_for_cus_1(store)
        report = await ingest(store, USAGE, [usage(at=at)], NOW)
        assert report.results[0].status == status
        if status == REJECTED:
            assert "timestamp" in report.results[0].reason
        late = await store.late_events()
        assert [event.event_id for event in late] == (["e1"] if status == ACCEPTED_LATE else [])
    backend.run(scenario)


@pytest.mark.parametrize("raw, reason", [
    (b'{"id": "e1", "customer_id": "cus_1", "metric": "api_calls", "quantity": "3", "timestamp": "2027-01-15T08:00:00Z"}',
     "invalid usage event: Expected `int`, got `str` - at `$.quantity`"),
    (b'{"id": "e1", "customer_id": "cus_1", "metric": "api_calls", "quantity": -1, "timestamp": "2027-01-15T08:00:00Z"}',
     "invalid usage event: Expected `int` >= 0 - at `$.quantity`"),
    # The maxima, and text no store or screen should get.
    (b'{"id": "e1", "customer_id": "cus_1", "metric": "api_calls", "quantity": 10000000000000000000,'
     b' "timestamp": "2027-01-15T08:00:00Z"}', "invalid usage event: Expected `int` <= 1000000000000000 - at `$.quantity`"),
    (b'{"id": "e\\u0000", "customer_id": "cus_1", "metric": "api_calls", "quantity": 1, "timestamp": "2027-01-15T08:00:00Z"}',
     "invalid usage event: `id` holds a control character"),
    (b'{"id": "e1", "customer_id": "cus\\u001b[31m", "metric": "api_calls", "quantity": 1,'
     b' "timestamp": "2027-01-15T08:00:00Z"}', "invalid usage event: `customer_id` holds a control character"),
    (b'{"id": "e1", "customer_id": "cus_1", "metric": "' + b"m" * 129 + b'", "quantity": 1,'
     b' "timestamp": "2027-01-15T08:00:00Z"}', "invalid usage event: Expected `str` of length <= 128 - at `$.metric`"),
    (b'{"id": "e1", "customer_id": "cus_1", "metric": "api_calls", "quantity": 1, "timestamp": "2027-01-15T08:00:00Z",'
     b' "dimensions": {"model": "' + b"x" * 257 + b'"}}',
     "invalid usage event: Expected `str` of length <= 256 - at `$.dimensions[...]`"),
    (b'{"id": "e1", "customer_id": "cus_1", "metric": "api_calls", "quantity": 1, "timestamp": "2027-01-15T08:00:00Z",'
     b' "dimensions": {' + b", ".join(b'"k%d": "v"' % n for n in range(33)) + b'}}',
     "invalid usage event: Expected `object` of length <= 32 - at `$.dimensions`"),
    (b'{"id": "e1", "customer_id": "cus_1", "metric": "api_calls", "quantity": 1, "timestamp": "2027-01-15T08:00:00Z",'
     b' "dimensions": {"model": "gpt\\u0000"}}', "invalid usage event: dimension `model` holds a control character"),
    (b'{"id": "e1", "customer_id": "cus_1", "dimensions": ' + b"[" * 100_000 + b"]" * 100_000 + b'}',
     "invalid usage event: Expected `object`, got `array` - at `$.dimensions`"),   # 100,000 deep
    (b'{"id": "e1", "customer_id": "cus_1", "metric": "api_calls", "quantity": 1}',
     "invalid usage event: Object missing required field `timestamp`"),
    (b'{"id": "e1", "customer_id": "cus_1", "metric": "api_calls", "quantity": 1, "timestamp": "2027-01-15T08:00:00Z",'
     b' "qty": 1}', "invalid usage event: Object contains unknown field `qty`"),
    (b'{"id": "", "customer_id": "cus_1", "metric": "api_calls", "quantity": 1, "timestamp": "2027-01-15T08:00:00Z"}',
     "invalid usage event: `id` must be 1 to 200 characters"),
    (b'{"id": "e1", "customer_id": "cus_1", "metric": "api_calls", "quantity": 1, "timestamp": "2027-01-15T08:00:00"}',
     "`timestamp` needs a timezone (e.g. 2026-11-23T12:00:00Z)"),
    (b'[1, 2]', "invalid usage event: Expected `object`, got `array`"),
])
def test_the_schema_gate_says_what_is_wrong(backend, raw, reason):
    async def scenario(open_store):
        store = await open_store()
        await catalog_for_cus_1(store)
        report = await ingest(store, USAGE, [raw], datetime.datetime(2027, 1, 15, 8, tzinfo=datetime.timezone.utc)
                              .timestamp())
        assert statuses(report) == [(REJECTED, reason)]
        assert await store.events(USAGE, "cus_1") == []
    backend.run(scenario)


def test_one_bad_event_never_sinks_its_batch_and_a_retry_counts_nothing_twice(backend):
    batch = [usage("e1"), usage("e2", quantity="many"), None, usage("e3", at=-LATE_AFTER_S - 60), usage("e1")]

    async def scenario(open_store):
        store = await open_store()
        await catalog_for_cus_1(store)
        first = await ingest(store, USAGE, batch, NOW)
        assert [result.status for result in first.results] == [ACCEPTED, REJECTED, REJECTED, ACCEPTED_LATE, DUPLICATE]
        assert (first.accepted, first.accepted_late, first.duplicate, first.rejected) == (1, 1, 1, 2)
        assert first.results[1].id == "e2"           # a rejected event still names itself when it can
        assert first.results[2].reason == "not valid JSON"
        again = await ingest(store, USAGE, batch, NOW + 5)
        assert [result.status for result in again.results] == [DUPLICATE, REJECTED, REJECTED, DUPLICATE, DUPLICATE]
        kept = await store.events(USAGE, "cus_1")
        assert [event.event_id for event in kept] == ["e1", "e3"]
        provenance = json.loads(kept[1].provenance)
        assert {key: provenance[key] for key in ("source", "ingested_at", "gates")} == {
            "source": "api", "ingested_at": NOW, "gates": {"schema": "passed", "timestamp": "passed", "late": True}}
        assert provenance["pricing"]["subscription"] == "sub_1"
    backend.run(scenario)


def test_a_changed_event_under_an_accepted_id_is_rejected_as_a_conflict(backend):
    async def scenario(open_store):
        store = await open_store()
        await catalog_for_cus_1(store)
        await ingest(store, USAGE, [usage("e1")], NOW)
        report = await ingest(store, USAGE, [usage("e1", quantity=4)], NOW)
        assert statuses(report) == [(REJECTED, "an event with this id was already accepted with a different payload")]
        assert json.loads((await store.events(USAGE, "cus_1"))[0].payload)["quantity"] == 3
    backend.run(scenario)


def test_duplicates_sent_concurrently_are_counted_once(backend):
    batch = [usage(f"e{n}") for n in range(200)]

    async def scenario(open_store):
        stores = [await open_store() for _ in range(2)]
        await catalog_for_cus_1(stores[0])
        reports = await asyncio.gather(*(ingest(stores[n % 2], USAGE, batch, NOW) for n in range(4)))
        assert sum(report.accepted for report in reports) == 200
        assert sum(report.duplicate for report in reports) == 600
        assert len(await stores[0].events(USAGE, "cus_1")) == 200
    backend.run(scenario)


@pytest.mark.parametrize("amount, status", [
    ("0.012345678", ACCEPTED), (0.5, ACCEPTED), ("12", ACCEPTED),
    ("0.0123456789", REJECTED), ("-1", REJECTED), ("NaN", REJECTED), ("lots", REJECTED),
])
def test_cost_amounts_are_exact_to_the_nano(backend, amount, status):
    async def scenario(open_store):
        store = await open_store()
        await catalog_for_cus_1(store)
        report = await ingest(store, COST, [cost(amount=amount, metric="ai_tokens", provider="openai")], NOW)
        assert report.results[0].status == status
    backend.run(scenario)


def test_a_cost_for_the_customer_overall_has_no_metric(backend):
    async def scenario(open_store):
        store = await open_store()
        await catalog_for_cus_1(store)
        report = await ingest(store, COST, [cost("c1"), cost("c2", metric="")], NOW)
        assert statuses(report)[0] == (ACCEPTED, None)
        assert statuses(report)[1][0] == REJECTED and "leave it out" in statuses(report)[1][1]
        [kept] = await store.events(COST, "cus_1")
        assert json.loads(kept.payload)["amount"] == "0.012345678"
    backend.run(scenario)


def test_batches_come_as_json_arrays_wrapped_arrays_or_ndjson():
    one, two = usage("e1"), usage("e2")
    assert split_batch(b"[" + one + b"," + two + b"]", ndjson=False) == [one, two]
    assert split_batch(b'{"events": [' + one + b"]}", ndjson=False) == [one]
    assert split_batch(one + b"\n\n" + b"{broken\n" + two + b"\n", ndjson=True) == [one, None, two]
    assert split_batch(b"", ndjson=True) == []
    for body, message in [
        (b"{broken", "not a JSON array of events"),
        (b'{"items": []}', 'must be {"events": [...]}'),
        (b'"text"', "not a JSON array of events"),
        (b"[" * 100_000 + b"]" * 100_000, "nests JSON deeper than an event batch can"),
    ]:
        with pytest.raises(BatchError, match=re.escape(message)):
            split_batch(body, ndjson=False)
    with pytest.raises(BatchError, match=f"at most {MAX_BATCH_EVENTS}"):
        split_batch(b"[" + b",".join([b"{}"] * (MAX_BATCH_EVENTS + 1)) + b"]", ndjson=False)


def test_an_event_that_would_overflow_a_running_total_is_refused_alone(backend):
    # Two events of 10^15 units are fine; a period whose total is already near the
    # maximum refuses the one that would pass it, with why, and keeps the rest.
    # (The enterprise plan neither charges nor costs cached tokens: only units add up.)
    async def scenario(open_store):
        store = await open_store()
        await catalog_for_cus_1(store)
        await apply_catalog(store, load_catalog_file(EXAMPLE_CATALOG), "catalog.yaml", author="test")

        def tokens(event_id, quantity):
            return usage(event_id, customer_id="cus_acme", metric="ai_cached_tokens", quantity=quantity)
        near = (MAX_PERIOD_TOTAL - 10) // MAX_QUANTITY
        await ingest(store, USAGE, [tokens(f"big-{n}", MAX_QUANTITY) for n in range(near)], NOW)
        report = await ingest(store, USAGE, [tokens("small", 5), tokens("too-much", MAX_QUANTITY),
                                             tokens("after", 1)], NOW)
        assert [result.status for result in report.results] == [ACCEPTED, REJECTED, ACCEPTED]
        assert report.results[1].reason.startswith("it would take this billing period's running total of units")
        kept = {event.event_id for event in await store.events(USAGE, "cus_acme")}
        assert {"small", "after"} <= kept and "too-much" not in kept
        [totals] = [row for row in await store.period_totals(NOW, "cus_acme") if row.metric == "ai_cached_tokens"]
        assert totals.units == near * MAX_QUANTITY + 6
    backend.run(scenario)


def test_a_cost_beyond_the_maximum_is_refused_alone(backend):
    async def scenario(open_store):
        store = await open_store()
        await catalog_for_cus_1(store)
        report = await ingest(store, COST, [cost("c1", amount="1e300"), cost("c2", amount="1")], NOW)
        assert statuses(report)[0] == (REJECTED, f"invalid cost event: `amount` must be at most {MAX_AMOUNT} "
                                                 "(one cost event), got 1.000e+300")
        assert [event.event_id for event in await store.events(COST, "cus_1")] == ["c2"]
    backend.run(scenario)


def test_timestamps_in_any_offset_are_judged_as_instants(backend):
    async def scenario(open_store):
        store = await open_store()
        await catalog_for_cus_1(store)
        late_in_tokyo = json.dumps({"id": "e1", "customer_id": "cus_1", "metric": "api_calls", "quantity": 1,
                                    "timestamp": stamp(-LATE_AFTER_S - 1, offset_hours=9)}).encode()
        report = await ingest(store, USAGE, [late_in_tokyo], NOW)
        assert report.results[0].status == ACCEPTED_LATE
    backend.run(scenario)


# -- rating while ingesting: a batch prices its events in order from the running totals --

EXAMPLE_CATALOG = Path(__file__).resolve().parents[2] / "config" / "examples" / "catalog.yaml"


async def with_example_catalog(store, *extra_customers):
    """The example catalog, plus a customer on each (customer, plan) of `extra_customers`
    (subscribed from 2026-11-15: NOW falls in the period of Jan 15 - Feb 15, 2027)."""
    await apply_catalog(store, load_catalog_file(EXAMPLE_CATALOG), "catalog.yaml", author="test")
    for customer, plan in extra_customers:
        await store.put_catalog("customer", customer, {"name": customer}, author="test")
        await store.put_catalog("subscription", f"sub_{customer}", {
            "customer": customer, "plan": plan, "period_anchor": "2026-11-15T00:00:00+00:00", "status": "active"}, author="test")


def priced(store_events):
    return {event.event_id: json.loads(event.provenance)["pricing"] for event in store_events}


def test_a_batch_across_tiers_prices_every_event_as_if_sent_one_at_a_time(backend):
    # api_calls on pro: the first 10,000 a period free, then 0.001 each (graduated);
    # ai_tokens on enterprise: all of a period's tokens at 6.00 per 1M up to 100M, 4.00 beyond (volume).
    calls = [3000, 4000, 2500, 1000, 700, 1200, 5000]
    tokens = [40_000_000, 50_000_000, 20_000_000, 5_000_000]

    def events(suffix):
        batch = [usage(f"calls-{n}", at=-600 + n, customer_id=f"cus_pro_{suffix}", quantity=quantity)
                 for n, quantity in enumerate(calls)]
        for n, quantity in enumerate(tokens):        # interleaved with the calls
            batch.insert(2 * n + 1, usage(f"tokens-{n}", at=-500 + n, customer_id=f"cus_ent_{suffix}",
                                          metric="ai_tokens", quantity=quantity))
        batch.insert(4, batch[0])                                        # a repeat inside the batch
        batch.insert(7, usage("calls-2", at=-598, customer_id=f"cus_pro_{suffix}", quantity=1))   # a conflict
        return batch

    async def scenario(open_store):
        store = await open_store()
        await catalog_for_cus_1(store)
        await with_example_catalog(store, ("cus_pro_batched", "pro"), ("cus_ent_batched", "enterprise"),
                                   ("cus_pro_single", "pro"), ("cus_ent_single", "enterprise"))
        # One event kept before either way: in the batch it is a duplicate and must not move the totals again.
        for suffix in ("batched", "single"):
            await ingest(store, USAGE, [events(suffix)[2]], NOW)
        batched = await ingest(store, USAGE, events("batched"), NOW)
        single = [(await ingest(store, USAGE, [event], NOW)).results[0] for event in events("single")]
        assert [(result.status, result.reason) for result in batched.results] == \
            [(result.status, result.reason) for result in single]
        assert batched.duplicate == 2 and batched.rejected == 1
        for customer in ("cus_pro", "cus_ent"):
            prices = [priced(await store.events(USAGE, f"{customer}_{suffix}")) for suffix in ("batched", "single")]
            assert prices[0] == {event_id: {**pricing, "subscription": f"sub_{customer}_batched"}
                                 for event_id, pricing in prices[1].items()}
        totals = {(row.customer_id, row.metric): (row.units, row.revenue_nanos, row.cogs_nanos)
                  for row in await store.period_totals(NOW)}
        for customer, metric in (("cus_pro", "api_calls"), ("cus_ent", "ai_tokens")):
            assert totals[f"{customer}_batched", metric] == totals[f"{customer}_single", metric]
        # 17,400 calls: 7,400 beyond the free 10,000 at 0.001; 115M tokens all at 4.00 per 1M.
        assert totals["cus_pro_batched", "api_calls"][:2] == (17_400, 7_400_000_000)
        assert totals["cus_ent_batched", "ai_tokens"][:2] == (115_000_000, 460_000_000_000)
        assert sum(pricing["revenue_nanos"] for pricing in
                   priced(await store.events(USAGE, "cus_ent_batched")).values()) == 460_000_000_000
    backend.run(scenario)


def test_overlapping_batches_from_two_processes_keep_each_event_once_and_price_the_totals_exactly(backend):
    quantities = [(n * 37) % 900 + 100 for n in range(240)]
    all_events = [usage(f"e{n}", at=-900 + n, customer_id="cus_pro_1", quantity=quantity)
                  for n, quantity in enumerate(quantities)]
    # Four batches, each overlapping the next by half, two in each of two processes at once.
    batches = [all_events[start:start + 120] for start in (0, 60, 120, 60)]

    async def scenario(open_store):
        stores = [await open_store() for _ in range(2)]
        await with_example_catalog(stores[0], ("cus_pro_1", "pro"))
        reports = await asyncio.gather(*(ingest(stores[n % 2], USAGE, batch, NOW)
                                         for n, batch in enumerate(batches)))
        assert sum(report.accepted for report in reports) == 240
        assert sum(report.duplicate for report in reports) == 240
        kept = priced(await stores[1].events(USAGE, "cus_pro_1"))
        [totals] = await stores[1].period_totals(NOW, "cus_pro_1")
        assert totals.units == sum(quantities)
        # Whatever order the batches landed in, the events' revenues add up to the period's.
        assert sum(pricing["revenue_nanos"] for pricing in kept.values()) == totals.revenue_nanos \
            == (sum(quantities) - 10_000) * 1_000_000
    backend.run(scenario)


HOSTILE = {
    "too many units": lambda tag: usage(tag, quantity=10**19),
    "negative units": lambda tag: usage(tag, quantity=-1),
    "NUL in the id": lambda tag: usage(tag + "\x00"),
    "escape in the customer": lambda tag: usage(tag, customer_id="cus_1\x1b[2J"),
    "long metric": lambda tag: usage(tag, metric="m" * 129),
    "many dimensions": lambda tag: usage(tag, dimensions={f"k{i}": "v" for i in range(33)}),
    "control in a dimension": lambda tag: usage(tag, dimensions={"model": "gpt\x07"}),
    "wrong type": lambda tag: usage(tag, quantity=[1]),
    "not JSON": lambda tag: None,
    "deep": lambda tag: b'{"id": "%s", "dimensions": ' % tag.encode() + b"[" * 50_000 + b"]" * 50_000 + b"}",
}


def test_an_event_the_catalog_cannot_rate_is_kept_unrated_with_why_and_rated_once_it_can(backend):
    # Unknown metric, unknown customer, an instant before the subscription starts:
    # kept, reported and listed as unrated (never "accepted" at no revenue), and
    # rated, their totals moved, once the catalog knows them.
    async def scenario(open_store):
        store = await open_store()
        await catalog_for_cus_1(store, anchor=NOW - 86400)
        report = await ingest(store, USAGE, [usage("new-metric", metric="gpu_seconds"), usage("who", customer_id="cus_2"),
                                             usage("early", at=-2 * 86400), usage("fine")], NOW)
        assert statuses(report) == [
            (UNRATED, "no metric `gpu_seconds` in the catalog"),
            (UNRATED, "no billable subscription for customer `cus_2` (an unknown customer, or none active, "
                      "trialing or past due)"),
            (UNRATED, f"before customer `cus_1`'s subscription starts ({stamp(-86400, 0).replace('+00:00', '+00:00')})"),
            (ACCEPTED, None)]
        assert (report.accepted, report.unrated) == (1, 3)
        again = await ingest(store, USAGE, [usage("new-metric", metric="gpu_seconds")], NOW)
        assert statuses(again) == [(DUPLICATE, None)]
        listed = await store.unrated_events()
        assert [(event.event_id, reason.split(" ")[0]) for _, reason, event in listed] == [
            ("new-metric", "no"), ("who", "no"), ("early", "before")]
        # The catalog learns the metric: that one is rated now, the others wait.
        await store.put_catalog("metric", "gpu_seconds", {"aggregation": "sum"}, author="test")
        rerated, customers = await rate_unrated(store, await Rater.load(store))
        assert (rerated.rated, rerated.still_unrated, customers) == (1, 2, {"cus_1"})
        assert [event.event_id for _, _, event in await store.unrated_events()] == ["who", "early"]
        totals = {row.metric: row.units for row in await store.period_totals(NOW, "cus_1")}
        assert totals == {"api_calls": 3, "gpu_seconds": 3}
        assert (await rate_unrated(store, await Rater.load(store)))[0].rated == 0     # nothing twice
    backend.run(scenario)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.integers(0, 10**6), st.sampled_from(sorted(HOSTILE))), min_size=1, max_size=30))
def test_a_batch_of_good_and_hostile_events_stores_exactly_the_good_ones(backend, mix):
    run = uuid.uuid4().hex[:12]                     # the store outlives one example
    raw = [HOSTILE[item](f"{run}-h{n}") if isinstance(item, str) else usage(f"{run}-g{n}", quantity=item)
           for n, item in enumerate(mix)]
    good = {f"{run}-g{n}" for n, item in enumerate(mix) if not isinstance(item, str)}

    async def scenario(open_store):
        store = await open_store()
        await catalog_for_cus_1(store)
        report = await ingest(store, USAGE, raw, NOW)
        assert [result.status == ACCEPTED for result in report.results] == [not isinstance(item, str) for item in mix]
        assert all(result.reason for result in report.results if result.status == REJECTED)
        assert {event.event_id for event in await store.events(USAGE, "cus_1") if event.event_id.startswith(run)} \
            == good
    backend.run(scenario)
