# The Store contract, run against both backends: the embedded SQLite file and a real
# PostgreSQL (a schema of its own per test). What a user relies on: the schema is
# migrated once and versioned, a repeated apply changes nothing, API keys are kept
# hashed and can be revoked, an event is accepted exactly once however often and
# however concurrently it is sent, and a level transition's webhooks are enqueued
# with it and claimed by one sender at a time.
import asyncio
import json

import pytest

from control_plane import sql_store
from control_plane.postgres_store import PostgresStore
from control_plane.sql_store import SCHEMA_VERSION
from control_plane.sqlite_store import SqliteStore
from control_plane.store import (
    ACCEPTED,
    CONFLICT,
    COST,
    CREATED,
    DELIVERED,
    DUPLICATE,
    FAILED,
    PENDING,
    REFUSED,
    UNCHANGED,
    UPDATED,
    USAGE,
    Action,
    ApiKey,
    Rating,
    StoredEvent,
    StoreError,
    Token,
    Webhook,
    open_store,
)


def run(coroutine):
    return asyncio.run(coroutine)


def event(event_id, payload=b'{"quantity":1}', customer="cus_1", kind=USAGE, late=False):
    return StoredEvent(kind, customer, event_id, payload, 1_700_000_000.0, 1_700_000_060.0, late, b'{"source":"test"}')


def test_the_schema_is_migrated_once_and_versioned(backend):
    async def scenario(open_test_store):
        store = await open_test_store()
        assert await store.schema_version() == SCHEMA_VERSION
        assert await store.migrate() == SCHEMA_VERSION          # again: nothing to do
        again = await open_test_store()                         # another process, same database
        assert await again.schema_version() == SCHEMA_VERSION
    backend.run(scenario)


def test_migrating_concurrently_applies_each_migration_once(backend):
    async def scenario(open_test_store):
        stores = [await open_test_store(migrate=False) for _ in range(3)]
        versions = await asyncio.gather(*(store.migrate() for store in stores))
        assert versions == [SCHEMA_VERSION] * 3
    backend.run(scenario)


def test_a_catalog_upsert_says_what_it_did_and_repeating_it_changes_nothing(backend):
    plan = {"tier": "pro", "fixed_fee_nanos": 49_000_000_000, "features": ["large_models"],
            "quotas": {"api_calls": {"limit": 100000, "hard": True}}}

    async def scenario(open_test_store):
        store = await open_test_store()
        assert await store.put_catalog("plan", "pro", plan, author="test") == CREATED
        assert await store.put_catalog("plan", "pro", dict(reversed(plan.items())), author="test") == UNCHANGED   # key order
        changed = {**plan, "fixed_fee_nanos": 59_000_000_000}
        assert await store.put_catalog("plan", "pro", changed, author="test") == UPDATED
        assert await store.get_catalog("plan", "pro") == changed
        assert await store.put_catalog("plan", "free", {"tier": "free"}, author="test") == CREATED
        assert [key for key, _ in await store.list_catalog("plan")] == ["free", "pro"]
        assert await store.get_catalog("plan", "missing") is None
        assert await store.delete_catalog("plan", "free", author="test") is True
        assert await store.delete_catalog("plan", "free", author="test") is False
        assert await store.list_catalog("customer") == []
        with pytest.raises(StoreError, match="unknown catalog kind 'plans'"):
            await store.put_catalog("plans", "pro", plan, author="test")
    backend.run(scenario)


def test_the_catalog_version_moves_with_every_change_seen_from_any_process(backend):
    async def scenario(open_test_store):
        store, other = await open_test_store(), await open_test_store()     # two control-plane processes
        start = await other.catalog_version()
        assert await store.put_catalog("plan", "pro", {"tier": "pro"}, author="test") == CREATED
        created = await other.catalog_version()
        assert created != start
        assert await store.put_catalog("plan", "pro", {"tier": "pro"}, author="test") == UNCHANGED
        assert await other.catalog_version() == created                  # nothing changed: nothing to reload
        assert await store.put_catalog("plan", "pro", {"tier": "gold"}, author="test") == UPDATED
        updated = await other.catalog_version()
        assert updated not in (start, created)
        assert await store.delete_catalog("plan", "pro", author="test") is True
        deleted = await other.catalog_version()
        assert deleted not in (start, created, updated)
        assert await store.delete_catalog("plan", "pro", author="test") is False
        assert await other.catalog_version() == deleted
    backend.run(scenario)


def test_api_keys_are_kept_hashed_listed_by_prefix_and_revoked_once(backend):
    async def scenario(open_test_store):
        store = await open_test_store()
        first = ApiKey("key_1", "cus_1", "ak_live_ab", "a" * 64, 10.0)
        second = ApiKey("key_2", "cus_1", "ak_live_cd", "b" * 64, 11.0)
        other = ApiKey("key_3", "cus_2", "ak_live_ab", "c" * 64, 12.0)
        for key in (first, second, other):
            await store.add_api_key(key, author="test")
        assert await store.api_keys("cus_1") == [first, second]
        assert await store.api_keys("cus_1", "ak_live_c") == [second]
        assert await store.api_keys("cus_1", "ak_test") == []
        assert await store.api_key_by_hash("b" * 64) == second
        assert await store.api_key_by_hash("d" * 64) is None
        assert await store.revoke_api_key("key_2", 20.0, author="test") == "cus_1"
        assert await store.revoke_api_key("key_2", 21.0, author="test") is None      # already revoked: the first time stands
        assert await store.revoke_api_key("key_9", 21.0, author="test") is None
        assert (await store.api_key_by_hash("b" * 64)).revoked_at == 20.0
        with pytest.raises(StoreError):
            await store.add_api_key(ApiKey("key_4", "cus_3", "ak_live_ee", "a" * 64, 13.0), author="test")   # same digest
    backend.run(scenario)


def test_tokens_are_kept_as_digests_with_a_scope_and_revoked_by_id_or_name(backend):
    async def scenario(open_test_store):
        store = await open_test_store()
        assert await store.admin_tokens_count() == 0
        await store.add_token(Token("tok_1", "first", "admin", 5.0), "e" * 64, author="test")
        await store.add_token(Token("tok_2", "edge", "proxy", 6.0), "d" * 64, author="test")
        assert await store.live_token("e" * 64) == Token("tok_1", "first", "admin", 5.0)
        assert await store.live_token("f" * 64) is None
        assert await store.admin_tokens_count() == 1                 # proxy tokens are not admin ones
        assert await store.revoke_token("tok_2", 7.0, author="test") == Token("tok_2", "edge", "proxy", 6.0, 7.0)
        assert await store.revoke_token("tok_2", 8.0, author="test") is None        # already revoked: the first time stands
        assert await store.revoke_token("tok_9", 8.0, author="test") is None
        assert await store.live_token("d" * 64) is None
        assert await store.revoke_tokens_named("first", 9.0, author="test") == 1
        assert await store.tokens() == [Token("tok_1", "first", "admin", 5.0, 9.0),
                                        Token("tok_2", "edge", "proxy", 6.0, 7.0)]
        assert await store.admin_tokens_count() == 0
    backend.run(scenario)


def test_an_event_is_accepted_once_and_a_changed_repeat_is_a_conflict(backend):
    async def scenario(open_test_store):
        store = await open_test_store()
        batch = [event("e1"), event("e2"), event("e1"), event("e2", b'{"quantity":2}'),
                 event("e1", customer="cus_2"), event("e1", kind=COST)]
        assert await store.record_events(batch) == [ACCEPTED, ACCEPTED, DUPLICATE, CONFLICT, ACCEPTED, ACCEPTED]
        # Retrying the whole batch counts nothing twice.
        assert await store.record_events(batch) == [DUPLICATE, DUPLICATE, DUPLICATE, CONFLICT, DUPLICATE, DUPLICATE]
        kept = await store.events(USAGE, "cus_1")
        assert [(kept_event.event_id, kept_event.payload) for kept_event in kept] == [
            ("e1", b'{"quantity":1}'), ("e2", b'{"quantity":1}')]
        assert kept[0] == event("e1")
        assert await store.record_events([]) == []
        # Late events are listed for reconciliation, oldest first.
        assert await store.record_events([event("late-1", late=True), event("late-2", late=True)]) == [ACCEPTED] * 2
        assert [late.event_id for late in await store.late_events()] == ["late-1", "late-2"]
        assert await store.late_events(since=1_700_000_061.0) == []
    backend.run(scenario)


def test_the_same_events_sent_concurrently_are_accepted_exactly_once(backend):
    async def scenario(open_test_store):
        stores = [await open_test_store() for _ in range(2)]     # two connections, as two workers
        batch = [event(f"e{n}") for n in range(300)]
        results = await asyncio.gather(*(stores[n % 2].record_events(batch) for n in range(6)))
        for index in range(len(batch)):
            assert sorted(result[index] for result in results) == [ACCEPTED] + [DUPLICATE] * 5
        assert len(await stores[0].events(USAGE, "cus_1")) == 300
    backend.run(scenario)


def test_a_batch_larger_than_a_chunk_is_kept_whole_and_in_order(backend):
    from control_plane.sql_store import EVENT_CHUNK

    async def scenario(open_test_store):
        store = await open_test_store()
        batch = [event(f"e{n:05d}") for n in range(EVENT_CHUNK * 2 + 7)]
        assert await store.record_events(batch) == [ACCEPTED] * len(batch)
        assert [kept.event_id for kept in await store.events(USAGE, "cus_1")] == [item.event_id for item in batch]
    backend.run(scenario)


def test_calls_written_together_each_get_their_own_outcomes_as_if_one_after_the_other(backend):
    async def scenario(open_test_store):
        store = await open_test_store()
        calls = [[event("a1"), event("a2")], [event("b1"), event("a1")], [event("a2", b'{"quantity":2}'), event("c1")],
                 [event("c1"), event("c1")]]
        # The first is written at once; the others wait for it and are written together.
        results = await asyncio.gather(*(store.record_events(call) for call in calls))
        assert results == [[ACCEPTED, ACCEPTED], [ACCEPTED, DUPLICATE], [CONFLICT, ACCEPTED], [DUPLICATE, DUPLICATE]]
        assert [kept.event_id for kept in await store.events(USAGE, "cus_1")] == ["a1", "a2", "b1", "c1"]
    backend.run(scenario)


def test_a_call_cancelled_while_waiting_to_be_written_keeps_nothing(backend):
    async def scenario(open_test_store):
        store = await open_test_store()
        writing = asyncio.ensure_future(store.record_events([event("a1")]))
        waiting = asyncio.ensure_future(store.record_events([event("b1")]))
        await asyncio.sleep(0)                  # the first is being written, the second waits for it
        waiting.cancel()
        assert await writing == [ACCEPTED]
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await store.record_events([event("c1")]) == [ACCEPTED]
        assert [kept.event_id for kept in await store.events(USAGE, "cus_1")] == ["a1", "c1"]
    backend.run(scenario)


def test_a_call_the_store_cannot_keep_fails_alone_not_the_calls_written_with_it(postgres_schema):
    url, schema = postgres_schema

    async def scenario():
        store = await PostgresStore.connect(url, server_settings={"search_path": schema})
        try:
            await store.migrate()
            # PostgreSQL text cannot hold a NUL character: this call's own events fail it.
            calls = [[event("a1")], [event("b1")], [event("bad\x00id")], [event("c1")]]
            results = await asyncio.gather(*(store.record_events(call) for call in calls), return_exceptions=True)
            assert results[:2] == [[ACCEPTED], [ACCEPTED]] and results[3] == [ACCEPTED]
            assert isinstance(results[2], StoreError)
            assert [kept.event_id for kept in await store.events(USAGE, "cus_1")] == ["a1", "b1", "c1"]
        finally:
            await store.close()
    run(scenario())


def test_an_event_the_store_cannot_hold_is_refused_alone_and_the_others_of_its_call_kept(postgres_schema):
    # Ingest's gates keep such events out; should one reach the store, it sinks
    # nothing beside it, and is never reported as worth retrying.
    url, schema = postgres_schema

    async def scenario():
        store = await PostgresStore.connect(url, server_settings={"search_path": schema})
        try:
            await store.migrate()
            outcomes = await store.record_events([event("a1"), event("bad\x00id"), event("b1")])
            assert outcomes[0] == ACCEPTED and outcomes[2] == ACCEPTED
            assert outcomes[1].startswith(REFUSED + ": the store cannot keep this event (PostgreSQL: ")
            assert [kept.event_id for kept in await store.events(USAGE, "cus_1")] == ["a1", "b1"]
            with pytest.raises(StoreError) as alone:
                await store.record_events([event("bad\x00again")])
            assert alone.value.permanent
        finally:
            await store.close()
    run(scenario())


def test_open_store_picks_the_backend_from_the_url(tmp_path):
    async def scenario():
        embedded = await open_store(str(tmp_path / "default.db"))
        assert isinstance(embedded, SqliteStore)
        assert await embedded.schema_version() == SCHEMA_VERSION
        await embedded.close()
        prefixed = await open_store("sqlite:" + str(tmp_path / "prefixed.db"))
        assert isinstance(prefixed, SqliteStore)
        await prefixed.close()
        with pytest.raises(StoreError, match="cannot connect to PostgreSQL"):
            await open_store("postgresql://postgres@127.0.0.1:1/test")
    run(scenario())


def test_an_unusable_sqlite_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    async def scenario():
        with pytest.raises(StoreError, match="cannot open the SQLite store"):
            await SqliteStore.open(str(blocker / "aforo.db"))
    run(scenario())


def per_unit_rating(event, price_nanos=7, cost_nanos=2):
    units = int(event.payload.decode().split(":")[1].rstrip("}"))
    return Rating(event.customer_id, "api_calls", 1_700_000_000.0, 1_702_592_000.0, "sub_1", units,
                  lambda units_before: (units * price_nanos, units * cost_nanos), {"plan": "pro"})


def test_running_totals_count_each_accepted_event_once_even_concurrently(backend):
    async def scenario(open_test_store):
        stores = [await open_test_store() for _ in range(2)]
        batch = [event(f"e{n}", payload=b'{"quantity":%d}' % (n % 5 + 1)) for n in range(120)]
        ratings = [per_unit_rating(item) for item in batch]
        results = await asyncio.gather(*(stores[n % 2].record_events(batch, ratings) for n in range(4)))
        assert sum(result.count(ACCEPTED) for result in results) == 120
        units = sum(n % 5 + 1 for n in range(120))
        [totals] = await stores[0].period_totals(1_701_000_000.0)
        assert (totals.units, totals.revenue_nanos, totals.cogs_nanos) == (units, units * 7, units * 2)
        assert (totals.customer_id, totals.metric, totals.subscription) == ("cus_1", "api_calls", "sub_1")
        kept = await stores[0].events(USAGE, "cus_1")
        pricing = json.loads(kept[0].provenance)["pricing"]
        assert pricing == {"plan": "pro", "revenue_nanos": 7, "cogs_nanos": 2}
        assert await stores[0].period_totals(1_702_592_000.0) == []      # the period has ended by then
        assert await stores[0].period_totals(1_701_000_000.0, "cus_2") == []
        assert await stores[0].period_totals_of(1_701_000_000.0, ["cus_2", "cus_1"]) == [totals]
        assert await stores[0].period_totals_of(1_701_000_000.0, []) == []
    backend.run(scenario)


# -- the webhook outbox -------------------------------------------------------------------

NOW = 1_800_000_000.0


def transition(level_from, level_to, at=NOW):
    return Action("cus_1", "ai_tokens", "tokens-floor", level_from, level_to, 27.5, 25.0, "enforce", at)


def webhook(webhook_id, channel_name="finance"):
    return Webhook(webhook_id, channel_name, json.dumps({"id": webhook_id}).encode())


def test_a_transition_enqueues_its_webhooks_with_it_and_a_lost_race_enqueues_none(backend):
    async def scenario(open_store):
        store = await open_store()
        first = transition(0, 1)
        assert await store.transition_level(first, [webhook("whk_a"), webhook("whk_b", "engineering")])
        assert not await store.transition_level(first, [webhook("whk_c")])        # the level moved already
        [(action_seq, _)] = await store.actions()
        queued = await store.webhooks()
        assert [(item.id, item.channel, item.action_seq, item.status, item.attempts, item.next_attempt_at,
                 item.created_at) for item in queued] == [
            ("whk_a", "finance", action_seq, PENDING, 0, NOW, NOW),
            ("whk_b", "engineering", action_seq, PENDING, 0, NOW, NOW)]
        assert queued[0].body == b'{"id": "whk_a"}'
        assert await store.webhook_counts() == {PENDING: 2, DELIVERED: 0, FAILED: 0}
        with pytest.raises(StoreError):       # one webhook per transition and channel, whoever writes it
            await store.transition_level(transition(1, 2), [webhook("whk_d"), webhook("whk_e")])
        assert (await store.guard_levels("cus_1"))[0].level == 1     # and nothing of that transition kept
    backend.run(scenario)


def test_the_enforcing_and_the_shadow_level_of_a_metric_move_apart(backend):
    async def scenario(open_store):
        store = await open_store()
        shadow = Action("cus_1", "ai_tokens", "tokens-trial", 0, 3, 27.5, 40.0, "shadow", NOW)
        assert await store.transition_level(transition(0, 2))
        assert await store.transition_level(shadow)
        assert not await store.transition_level(transition(0, 1))      # the enforcing level is at 2
        levels = await store.guard_levels("cus_1")
        assert [(level.metric, level.mode, level.guard_id, level.level) for level in levels] == [
            ("ai_tokens", "enforce", "tokens-floor", 2), ("ai_tokens", "shadow", "tokens-trial", 3)]
        assert await store.guard_levels_of(["cus_1"]) == levels
    backend.run(scenario)


SHADOW_LEVELS_MIGRATION = 8


def test_levels_kept_before_shadow_levels_existed_keep_the_mode_they_were_reached_in(backend, monkeypatch):
    async def scenario(open_store):
        store = await open_store(migrate=False)
        with monkeypatch.context() as earlier:          # the store as the release before this one left it
            before = tuple(migration for migration in sql_store.MIGRATIONS if migration[0] < SHADOW_LEVELS_MIGRATION)
            earlier.setattr(sql_store, "MIGRATIONS", before)
            earlier.setattr(sql_store, "SCHEMA_VERSION", before[-1][0])
            await store.migrate()
        for customer, mode in (("cus_1", "shadow"), ("cus_2", "enforce")):
            await store._execute("INSERT INTO guard_levels (customer_id, metric, guard_id, level, margin_pct, "
                                 "changed_at) VALUES (?, 'overall', 'g', 2, 10.0, ?)", (customer, NOW))
            await store._execute("INSERT INTO actions (customer_id, metric, guard_id, level_from, level_to, "
                                 "margin_pct, min_margin_pct, mode, at) VALUES (?, 'overall', 'g', 0, 2, 10.0, 50.0, "
                                 "?, ?)", (customer, mode, NOW))
        await store._execute("INSERT INTO guard_levels (customer_id, metric, guard_id, level, margin_pct, "
                             "changed_at) VALUES ('cus_3', 'overall', 'g', 1, 40.0, ?)", (NOW,))   # no trail
        assert await store.migrate() == SCHEMA_VERSION
        assert [(level.customer_id, level.mode, level.level) for level in await store.guard_levels()] == [
            ("cus_1", "shadow", 2), ("cus_2", "enforce", 2), ("cus_3", "enforce", 1)]
    backend.run(scenario)


def test_a_webhook_is_claimed_for_a_lease_retried_when_due_and_ends_delivered_or_failed(backend):
    async def scenario(open_store):
        store = await open_store()
        await store.transition_level(transition(0, 1), [webhook("whk_a"), webhook("whk_b", "engineering")])
        claimed = await store.claim_webhooks(NOW, lease_s=30)
        assert [(item.id, item.next_attempt_at) for item in claimed] == [("whk_a", NOW + 30), ("whk_b", NOW + 30)]
        assert await store.claim_webhooks(NOW + 29, lease_s=30) == []           # leased to that claimer
        assert await store.next_webhook_at() == NOW + 30
        assert await store.record_webhook_attempt("whk_a", NOW + 1) is True
        assert await store.record_webhook_attempt("whk_a", NOW + 2) is False    # no longer pending
        assert await store.record_webhook_attempt("whk_b", NOW + 1, "HTTP 500", retry_at=NOW + 5) is True
        assert await store.claim_webhooks(NOW + 4, lease_s=30) == []
        [again] = await store.claim_webhooks(NOW + 5, lease_s=30)
        assert (again.id, again.attempts, again.last_error) == ("whk_b", 1, "HTTP 500")
        assert await store.record_webhook_attempt("whk_b", NOW + 6, "HTTP 502") is True     # given up
        assert await store.next_webhook_at() is None
        [delivered] = await store.webhooks(DELIVERED)
        assert (delivered.id, delivered.attempts, delivered.delivered_at, delivered.next_attempt_at,
                delivered.last_error) == ("whk_a", 1, NOW + 1, None, None)
        [failed] = await store.webhooks(FAILED)
        assert (failed.id, failed.attempts, failed.failed_at, failed.last_error) == ("whk_b", 2, NOW + 6, "HTTP 502")
        assert await store.webhooks(PENDING) == []
        assert [item.id for item in await store.webhooks(after_seq=delivered.seq)] == ["whk_b"]
        assert await store.webhook_counts() == {PENDING: 0, DELIVERED: 1, FAILED: 1}
        with pytest.raises(StoreError, match="unknown webhook status 'lost'"):
            await store.webhooks("lost")
    backend.run(scenario)


def test_two_claimers_never_take_the_same_webhook(backend):
    async def scenario(open_store):
        stores = [await open_store() for _ in range(2)]           # two control planes on one database
        names = [f"channel-{n}" for n in range(60)]
        await stores[0].transition_level(transition(0, 1), [webhook(f"whk_{name}", name) for name in names])

        async def claim_all(store):
            taken = []
            while claimed := await store.claim_webhooks(NOW, lease_s=30, limit=7):
                taken += [item.id for item in claimed]
            return taken
        first, second = await asyncio.gather(claim_all(stores[0]), claim_all(stores[1]))
        assert sorted(first + second) == sorted(f"whk_{name}" for name in names)
    backend.run(scenario)
