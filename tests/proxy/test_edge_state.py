# Edge state from a file: customers found by plain API key, decisions a customer would
# see from the example state, snapshots sharing plan objects, and hot reload that
# swaps in good files, keeps the last good state on bad ones and ignores touches; a
# monthly state rolls over into each new month, so the example holds on any day.
import asyncio
import hashlib
import os
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from config import ConfigError
from config.edge_state_file import (
    Customer,
    Plan,
    Quota,
    Standing,
    parse_edge_state_file,
)
from config.values import Rate
from decision_core import (
    ALLOW,
    ALLOW_THROTTLED,
    REJECT,
    InvalidStateError,
    RequestFacts,
    decide,
)
from proxy.edge_state import (
    EdgeState,
    FileEdgeState,
    build_snapshot,
    hash_api_key,
    snapshot_from_file,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "examples" / "edge_state.yaml"
NOW = 1_795_000_000.0  # 2026-11-18, inside the example's billing period
PERIOD_START = 1_793_491_200.0  # 2026-11-01T00:00:00Z
PERIOD_END = 1_796_083_200.0  # 2026-12-01T00:00:00Z


def digest_hex(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()


STATE = f"""\
period: {{start: "2026-11-01T00:00:00Z", end: "2026-12-01T00:00:00Z"}}
plans:
  pro:
    tier: pro
    features: [large_models]
    quotas: {{api_calls: {{limit: 100, hard: true}}, ai_tokens: {{limit: 5000, hard: false}}}}
customers:
  - id: cus_a
    plan: pro
    status: active
    api_keys: [{digest_hex(b"key-a")}]
    usage: {{api_calls: 40}}
  - id: cus_b
    plan: pro
    status: trialing
    api_keys: [{digest_hex(b"key-b")}, {digest_hex(b"key-b2")}]
    usage: {{api_calls: 7, ai_tokens: 4000}}
    levels:
      ai_tokens: {{guard: tokens-floor, level: 2, throttle_rate: 2req/min, burst: 3}}
      overall: {{guard: acme-lock, level: 3, locked_features: [large_models]}}
"""


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def state_file(tmp_path):
    path = tmp_path / "edge_state.yaml"
    path.write_text(STATE)
    return path


def test_hash_api_key_is_the_sha256_digest_the_file_lists():
    assert hash_api_key(b"ak_demo_acme").hex() == "e4d6e1bc2aa13df0f29d226963c539d6d137b155cee2612a24e1b005be769bf5"
    assert len(hash_api_key(b"")) == 32


def test_customers_are_found_by_plain_key_only(state_file):
    edge_state = FileEdgeState(state_file, clock=FakeClock())
    assert edge_state.customer_for_key(b"key-a").customer_id == "cus_a"
    assert edge_state.customer_for_key(b"key-b") is edge_state.customer_for_key(b"key-b2")
    assert edge_state.customer_for_key(b"key-c") is None
    assert edge_state.customer_for_key(b"") is None
    # The stored digest itself is not a key.
    assert edge_state.customer_for_key(digest_hex(b"key-a").encode()) is None


def test_keys_stay_right_when_more_are_seen_than_are_remembered(state_file, monkeypatch):
    # Keys already found are remembered (as sent) up to KEY_CACHE_MAX; past that the
    # memory starts over, and every lookup still finds the right customer.
    from proxy import edge_snapshot
    monkeypatch.setattr(edge_snapshot, "KEY_CACHE_MAX", 2)
    edge_state = FileEdgeState(state_file, clock=FakeClock())
    expected = {b"key-a": "cus_a", b"key-b": "cus_b", b"key-b2": "cus_b", b"key-c": None}
    for _ in range(3):
        for key, customer_id in expected.items():
            customer = edge_state.customer_for_key(key)
            assert (customer.customer_id if customer else None) == customer_id
    assert edge_state.customer_for_key(b"key-b") is edge_state.customer_for_key(b"key-b2")


def test_file_edge_state_plays_the_edge_state_role(state_file):
    edge_state: EdgeState = FileEdgeState(state_file)
    assert edge_state.ready
    raw = state_file.read_bytes()
    assert edge_state.version == hashlib.sha256(raw).hexdigest()[:16]


def test_customer_state_holds_what_the_file_says(state_file):
    snapshot = FileEdgeState(state_file, clock=FakeClock()).snapshot
    cus_a, cus_b = snapshot.customer_by_id("cus_a"), snapshot.customer_by_id("cus_b")
    assert (cus_b.customer_id, cus_b.tier, cus_b.subscription_status) == ("cus_b", "pro", "trialing")
    assert cus_b.features == frozenset({"large_models"})
    assert (cus_a.quota_used("api_calls"), cus_b.quota_used("api_calls"), cus_b.quota_used("ai_tokens")) == (40, 7, 4000)
    assert cus_b.period_end == snapshot.period_end == PERIOD_END
    api_calls = cus_a.quotas.limit_at(cus_a.quotas.slot("api_calls"))
    assert (api_calls.limit, api_calls.hard, api_calls.window_s) == (100, True, 30 * 86400)
    throttle, lock = cus_b.guard_levels["ai_tokens"], cus_b.guard_levels["overall"]
    assert (throttle.guard_id, throttle.level, throttle.enforce, throttle.bucket.burst) == ("tokens-floor", 2, True, 3)
    assert (lock.level, lock.locked_features, lock.bucket) == (3, frozenset({"large_models"}), None)
    assert cus_a.guard_levels == {}


def test_customers_of_one_plan_share_its_objects(state_file):
    snapshot = FileEdgeState(state_file).snapshot
    a, b = snapshot.customer_by_id("cus_a"), snapshot.customer_by_id("cus_b")
    assert a.quotas is b.quotas
    assert a.features is b.features
    assert a.tier is b.tier


def test_throttle_buckets_start_full_at_the_clock_given(state_file):
    snapshot = FileEdgeState(state_file, clock=FakeClock(NOW)).snapshot
    bucket = snapshot.customer_by_id("cus_b").guard_levels["ai_tokens"].bucket
    assert bucket.available(NOW) == 3.0
    assert [bucket.take(NOW) for _ in range(4)][:3] == [0.0, 0.0, 0.0]
    assert bucket.take(NOW) == pytest.approx(30.0)


@pytest.mark.parametrize(
    ("key", "features", "metric", "outcome", "status", "reason"),
    [
        (b"ak_demo_acme", ("large_models",), "api_calls", ALLOW, 0, "allowed"),
        (b"ak_demo_acme_rotated", ("premium_compute",), "api_calls", REJECT, 429, "feature_locked"),
        (b"ak_demo_globex", ("large_models",), "ai_reasoning_tokens", ALLOW_THROTTLED, 0, "throttle"),
        (b"ak_demo_globex", ("premium_compute",), "api_calls", REJECT, 403, "feature_not_entitled"),
        (b"ak_demo_soylent", ("large_models",), "ai_tokens", REJECT, 429, "margin_blocked"),
        (b"ak_demo_wonka", (), "api_calls", REJECT, 429, "quota_exceeded"),
        (b"ak_demo_initech", ("large_models",), "ai_tokens", ALLOW, 0, "allowed"),
        (b"ak_demo_hooli", (), "api_calls", REJECT, 403, "subscription_inactive"),
        (b"ak_demo_umbrella", (), "api_calls", REJECT, 403, "subscription_inactive"),
        (b"ak_demo_stark", (), "api_calls", REJECT, 403, "subscription_inactive"),
        (b"ak_demo_wayne", (), "api_calls", REJECT, 403, "subscription_inactive"),
    ],
)
def test_the_example_state_decides_as_its_comments_say(key, features, metric, outcome, status, reason):
    edge_state = FileEdgeState(EXAMPLE, clock=FakeClock())
    decision = decide(edge_state.customer_for_key(key), RequestFacts(features, metric, 1), NOW)
    assert (decision.outcome, decision.status, decision.reason) == (outcome, status, reason)


def test_a_shadow_standing_only_reports():
    customer = FileEdgeState(EXAMPLE, clock=FakeClock()).customer_for_key(b"ak_demo_wonka")
    decision = decide(customer, RequestFacts((), "ai_tokens", 1), NOW)
    assert (decision.outcome, decision.shadow) == (ALLOW, "throttle; guard=free-tier-tokens-trial")


def test_build_snapshot_from_plain_values():
    plans = {
        "free": Plan(tier="free", quotas={"api_calls": Quota(limit=10, hard=True)}),
        "pro": Plan(tier="pro", features=("large_models",)),
    }
    customers = [
        Customer(id=f"cus_{n}", plan="free" if n % 2 else "pro", status="active", api_keys=(digest_hex(b"k%d" % n),))
        for n in range(100)
    ]
    customers.append(
        Customer(id="cus_slow", plan="pro", status="active", api_keys=(digest_hex(b"slow"),),
                 levels={"api_calls": Standing(guard="g", level=2, throttle_rate=Rate(1, 1))})
    )
    snapshot = build_snapshot(plans, customers, PERIOD_START, PERIOD_END, NOW, version="bench")
    assert (len(snapshot), snapshot.version, snapshot.period_end) == (101, "bench", PERIOD_END)
    assert snapshot.customer_for_key(b"k7").customer_id == "cus_7"
    assert snapshot.customer_for_key(b"k7").quotas is snapshot.customer_for_key(b"k9").quotas
    assert snapshot.customer_for_key(b"k8").features is snapshot.customer_for_key(b"k10").features
    assert snapshot.customer_for_key(b"k7") is snapshot.customer_by_id("cus_7")   # one state per customer
    assert snapshot.customer_for_key(b"no such key") is None
    assert snapshot.customer_for_key(b"slow").guard_levels["api_calls"].bucket.burst == 1
    with pytest.raises(AttributeError, match="immutable"):
        snapshot.version = "other"


def test_every_customer_is_found_by_id_and_no_other_id_finds_one():
    # Ids of every length, sharing prefixes, non-ASCII: each finds its own customer
    # through the snapshot's id table, and ids it does not hold find none.
    ids = [f"cus_{n}" for n in range(3000)] + ["c", "cus", "cus_", "cus_0_", "ç-client", "x" * 300]
    customers = [Customer(id=customer_id, plan="free", status="active") for customer_id in ids]
    snapshot = build_snapshot({"free": Plan(tier="free")}, customers, PERIOD_START, PERIOD_END, NOW)
    for customer_id in ids:
        assert snapshot.customer_by_id(customer_id).customer_id == customer_id
    for missing in ("", "cus_3000", "cus_00", "CUS_1", "x" * 299, "ç"):
        assert snapshot.customer_by_id(missing) is None


@pytest.mark.parametrize(
    ("customers", "message"),
    [
        ([Customer(id="c1", plan="gold", status="active")], "customer 'c1': unknown plan 'gold'"),
        ([Customer(id="c1", plan="free", status="active"), Customer(id="c1", plan="free", status="active")],
         "customer 'c1' is listed twice"),
        ([Customer(id="c1", plan="free", status="active", api_keys=(digest_hex(b"k"),)),
          Customer(id="c2", plan="free", status="active", api_keys=(digest_hex(b"k"),))],
         f"customer 'c2': API key digest {digest_hex(b'k')[:12]}... already belongs to customer 'c1'"),
        ([Customer(id="c1", plan="free", status="active", api_keys=("k",))],
         "customer 'c1': an API key digest is 64 hex characters, got 'k'"),
        ([Customer(id="c1", plan="free", status="gone")],
         "customer 'c1': unknown subscription status 'gone'"),
    ],
)
def test_build_snapshot_refuses_state_it_cannot_serve(customers, message):
    with pytest.raises(InvalidStateError) as caught:
        build_snapshot({"free": Plan(tier="free")}, customers, PERIOD_START, PERIOD_END, NOW)
    assert str(caught.value) == message


def test_snapshot_from_a_parsed_file_uses_the_period_end():
    snapshot = snapshot_from_file(parse_edge_state_file(STATE), "v1", NOW)
    assert (snapshot.version, snapshot.period_end, len(snapshot)) == ("v1", PERIOD_END, 2)


def test_a_customer_may_have_a_period_end_of_its_own():
    import datetime

    from config.values import Timestamp
    own_end = PERIOD_END + 86400
    own = Timestamp(datetime.datetime.fromtimestamp(own_end, datetime.timezone.utc))
    customers = [Customer(id=f"cus_{n}", plan="free", status="active", api_keys=(digest_hex(b"k%d" % n),),
                          period_end=own if n == 1 else None) for n in range(3)]
    snapshot = build_snapshot({"free": Plan(tier="free")}, customers, PERIOD_START, PERIOD_END, NOW)
    ends = [snapshot.customer_for_key(b"k%d" % n).period_end for n in range(3)]
    assert ends == [PERIOD_END, own_end, PERIOD_END]


def test_first_load_failure_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        FileEdgeState(tmp_path / "missing.yaml")
    assert str(caught.value) == f"{tmp_path / 'missing.yaml'}: Cannot read the edge state file: No such file or directory"
    broken = tmp_path / "broken.yaml"
    broken.write_text(STATE.replace("plan: pro", "plan: gold", 1))
    with pytest.raises(ConfigError) as caught:
        FileEdgeState(broken)
    assert str(caught.value) == (
        f"{broken}:9: Unknown plan `gold`; the plans are `pro` - at `$.customers[0].plan`"
    )


def test_a_changed_file_is_served_after_reload(state_file):
    edge_state = FileEdgeState(state_file, clock=FakeClock())
    old_version = edge_state.version
    assert edge_state.reload_if_changed() is False
    state_file.write_text(STATE.replace("status: active", "status: canceled"))
    assert edge_state.reload_if_changed() is True
    assert edge_state.version != old_version
    assert edge_state.customer_for_key(b"key-a").subscription_status == "canceled"
    assert edge_state.reloads == 1


def test_a_broken_file_keeps_the_last_good_state(state_file, caplog):
    reported = []
    edge_state = FileEdgeState(state_file, on_reload_error=lambda path, error: reported.append((path, error)))
    good = edge_state.snapshot
    state_file.write_text(STATE.replace("level: 2, throttle_rate: 2req/min, burst: 3", "level: 2"))
    assert edge_state.reload_if_changed() is False
    assert edge_state.snapshot is good
    assert edge_state.customer_for_key(b"key-a").customer_id == "cus_a"
    assert edge_state.reload_errors == 1
    message = (
        f"{state_file}:19: Level 2 (throttle) needs a `throttle_rate` such as `5req/sec`"
        " - at `$.customers[1].levels.ai_tokens`"
    )
    ((path, error),) = reported
    assert (path, str(error)) == (str(state_file), message)
    assert message in caplog.text
    # Checked again without a change: not rebuilt, not reported again.
    assert edge_state.reload_if_changed() is False
    assert (edge_state.reload_errors, len(reported)) == (1, 1)
    # Fixed: the fix is served.
    state_file.write_text(STATE.replace("usage: {api_calls: 40}", "usage: {api_calls: 41}"))
    assert edge_state.reload_if_changed() is True
    assert edge_state.customer_for_key(b"key-a").quota_used("api_calls") == 41


def test_a_touch_without_change_does_not_rebuild(state_file):
    edge_state = FileEdgeState(state_file)
    snapshot, version = edge_state.snapshot, edge_state.version
    stat = state_file.stat()
    os.utime(state_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    state_file.write_text(STATE)  # same bytes written again
    assert edge_state.reload_if_changed() is False
    assert edge_state.snapshot is snapshot
    assert edge_state.version is version
    assert (edge_state.reloads, edge_state.reload_errors) == (0, 0)


def test_a_file_replaced_by_rename_is_picked_up(state_file, tmp_path):
    edge_state = FileEdgeState(state_file)
    replacement = tmp_path / "next.yaml"
    replacement.write_text(STATE.replace("cus_a", "cus_z"))
    os.replace(replacement, state_file)
    assert edge_state.reload_if_changed() is True
    assert edge_state.customer_for_key(b"key-a").customer_id == "cus_z"


def test_a_vanished_file_is_reported_once_and_the_state_kept(state_file):
    reported = []
    edge_state = FileEdgeState(state_file, on_reload_error=lambda path, error: reported.append(str(error)))
    state_file.unlink()
    assert edge_state.reload_if_changed() is False
    assert edge_state.reload_if_changed() is False
    assert reported == [f"{state_file}: Cannot read the edge state file: No such file or directory"]
    assert edge_state.customer_for_key(b"key-a").customer_id == "cus_a"
    state_file.write_text(STATE)  # back, unchanged: nothing to rebuild
    assert edge_state.reload_if_changed() is False
    assert edge_state.reload_errors == 1


def test_local_usage_is_not_carried_into_a_reloaded_snapshot(state_file):
    edge_state = FileEdgeState(state_file)
    edge_state.customer_for_key(b"key-a").add_usage("api_calls", 50)
    assert edge_state.customer_for_key(b"key-a").quota_used("api_calls") == 90
    state_file.write_text(STATE.replace("usage: {api_calls: 40}", "usage: {api_calls: 45}"))
    assert edge_state.reload_if_changed() is True
    assert edge_state.customer_for_key(b"key-a").quota_used("api_calls") == 45


def test_a_failing_callback_does_not_stop_reloads(state_file):
    def explode(path, error):
        raise RuntimeError("metrics backend down")

    edge_state = FileEdgeState(state_file, on_reload_error=explode)
    state_file.write_text("period: [")
    assert edge_state.reload_if_changed() is False
    assert edge_state.reload_errors == 1
    state_file.write_text(STATE.replace("cus_a", "cus_y"))
    assert edge_state.reload_if_changed() is True


def test_a_bucket_too_large_to_count_is_a_reload_error(state_file):
    reported = []
    edge_state = FileEdgeState(state_file, on_reload_error=lambda path, error: reported.append(str(error)))
    state_file.write_text(STATE.replace("throttle_rate: 2req/min, burst: 3", "throttle_rate: 1req/hour, burst: 2000000000"))
    assert edge_state.reload_if_changed() is False
    assert reported == [
        f"{state_file}: Cannot build the edge state: customer 'cus_b': throttle rate 1 per 3600s"
        " with burst 2000000000 is too large"
    ]
    assert edge_state.customer_for_key(b"key-b").guard_levels["ai_tokens"].bucket.burst == 3


def test_watch_reloads_on_each_tick(state_file):
    edge_state = FileEdgeState(state_file)
    ticks = []

    class StopWatching(Exception):
        pass

    async def fake_sleep(interval_s):
        ticks.append(interval_s)
        if len(ticks) == 1:
            state_file.write_text(STATE.replace("cus_a", "cus_w"))
        else:
            raise StopWatching

    with pytest.raises(StopWatching):
        asyncio.run(edge_state.watch(0.5, sleep=fake_sleep))
    assert ticks == [0.5, 0.5]
    assert edge_state.customer_for_key(b"key-a").customer_id == "cus_w"


def test_the_example_can_be_copied_and_loaded_anywhere(tmp_path):
    copy = tmp_path / "edge_state.yaml"
    shutil.copy(EXAMPLE, copy)
    assert FileEdgeState(copy).version == FileEdgeState(EXAMPLE).version


def test_age_grows_only_while_the_file_cannot_be_served(state_file):
    clock = FakeClock(NOW)
    edge_state = FileEdgeState(state_file, clock=clock)
    clock.now += 10
    assert edge_state.age_s() == 10
    edge_state.reload_if_changed()  # unchanged: the state served is current
    assert edge_state.age_s() == 0
    state_file.write_text("period: [")
    clock.now += 30
    edge_state.reload_if_changed()
    clock.now += 5
    edge_state.reload_if_changed()
    assert edge_state.age_s() == 35
    state_file.write_text(STATE)  # back to what is served
    edge_state.reload_if_changed()
    assert (edge_state.age_s(), edge_state.reloads) == (0, 0)


def epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


MONTHLY = STATE.replace('period: {start: "2026-11-01T00:00:00Z", end: "2026-12-01T00:00:00Z"}', "period: monthly")


@pytest.mark.parametrize(
    ("before", "after", "next_end", "next_days"),
    [
        ("2026-11-30T23:59:59Z", "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z", 31),   # a month boundary
        ("2026-12-31T23:59:59Z", "2027-01-01T00:00:02Z", "2027-02-01T00:00:00Z", 31),   # December -> January
        ("2028-01-31T23:59:00Z", "2028-02-01T00:00:30Z", "2028-03-01T00:00:00Z", 29),   # into a leap February
        ("2027-01-31T23:59:00Z", "2027-02-01T00:00:30Z", "2027-03-01T00:00:00Z", 28),
    ],
)
def test_a_monthly_state_rolls_over_when_its_month_ends(tmp_path, before, after, next_end, next_days):
    path = tmp_path / "edge_state.yaml"
    path.write_text(MONTHLY)
    clock = FakeClock(epoch(before) - 3600)
    edge_state = FileEdgeState(path, clock=clock)
    customer = edge_state.customer_for_key(b"key-a")
    customer.add_usage("api_calls", 60)            # counted here this month: 40 + 60, the hard quota
    assert decide(customer, RequestFacts((), "api_calls", 1), clock.now).reason == "quota_exceeded"
    assert customer.period_end == epoch(after[:8] + "01T00:00:00Z")

    clock.now = epoch(before)
    assert not edge_state.reload_if_changed()       # still this month: nothing rebuilt
    clock.now = epoch(after)
    assert edge_state.reload_if_changed()           # the month ended: the state for the next one
    rolled = edge_state.customer_for_key(b"key-a")
    assert rolled is not customer
    assert (rolled.quota_used("api_calls"), rolled.period_end) == (40, epoch(next_end))
    assert rolled.quotas.limit_at(rolled.quotas.slot("api_calls")).window_s == next_days * 86400
    assert decide(rolled, RequestFacts((), "api_calls", 1), clock.now).reason == "allowed"
    assert edge_state.customer_for_key(b"key-b").guard_levels["ai_tokens"].level == 2    # standings restated
    assert (edge_state.reloads, edge_state.reload_errors, edge_state.version) == (1, 0, FileEdgeState(path).version)
    assert not edge_state.reload_if_changed()       # once per month


def test_a_fixed_period_never_rolls_over(state_file):
    clock = FakeClock(PERIOD_END + 86400)
    edge_state = FileEdgeState(state_file, clock=clock)
    clock.now += 40 * 86400
    assert not edge_state.reload_if_changed()
    assert edge_state.snapshot.period_end == PERIOD_END


def test_a_broken_monthly_file_at_the_month_end_keeps_the_old_state_reported_once(tmp_path):
    path = tmp_path / "edge_state.yaml"
    path.write_text(MONTHLY)
    clock = FakeClock(epoch("2026-12-20T00:00:00Z"))
    edge_state = FileEdgeState(path, clock=clock)
    old = edge_state.snapshot
    path.write_text("period: [")
    assert not edge_state.reload_if_changed()
    clock.now = epoch("2027-01-01T00:00:05Z")
    assert not edge_state.reload_if_changed()
    assert not edge_state.reload_if_changed()
    # The old month's state stays (its quotas no longer apply); the error was reported once.
    assert (edge_state.snapshot, edge_state.reload_errors) == (old, 1)
    path.write_text(MONTHLY)
    assert edge_state.reload_if_changed()
    assert edge_state.snapshot.period_end == epoch("2027-02-01T00:00:00Z")


@pytest.mark.parametrize("today", ["2026-12-07T23:45:00Z", "2027-01-01T00:00:00Z", "2027-06-15T08:00:00Z",
                                   "2028-02-29T12:00:00Z", "2031-10-31T23:59:59Z"])
def test_the_example_is_in_force_on_any_day(today):
    now = epoch(today)
    edge_state = FileEdgeState(EXAMPLE, clock=FakeClock(now))
    outcomes = {key: decide(edge_state.customer_for_key(key), RequestFacts(features, metric, 1), now).reason
                for key, features, metric in [(b"ak_demo_wonka", (), "api_calls"),
                                              (b"ak_demo_soylent", ("large_models",), "ai_tokens"),
                                              (b"ak_demo_globex", ("large_models",), "ai_reasoning_tokens"),
                                              (b"ak_demo_acme_rotated", ("premium_compute",), "api_calls")]}
    assert list(outcomes.values()) == ["quota_exceeded", "margin_blocked", "throttle", "feature_locked"]
    assert edge_state.snapshot.period_end > now
