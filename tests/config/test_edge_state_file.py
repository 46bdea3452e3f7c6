# The edge state file: how plans, customers and standings read, and the exact message,
# line and path for each mistake a control plane or an operator could write.
import hashlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import decision_core
from config import ConfigError, Rate
from config.edge_state_file import (
    MAX_PLAN_QUOTAS,
    load_edge_state_file,
    parse_edge_state_file,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "examples" / "edge_state.yaml"
KEY_A = hashlib.sha256(b"key-a").hexdigest()
KEY_B = hashlib.sha256(b"key-b").hexdigest()

# Line numbers are referred to by the failure table below.
STATE = f"""\
period: {{start: "2026-11-01T00:00:00Z", end: "2026-12-01T00:00:00Z"}}
plans:
  free:
    tier: free
    quotas: {{api_calls: {{limit: 1000, hard: true}}}}
  pro:
    tier: pro
    features: [large_models]
customers:
  - id: cus_a
    plan: free
    status: active
    api_keys: [{KEY_A}]
  - id: cus_b
    plan: pro
    status: trialing
    api_keys: [{KEY_B}]
    usage: {{api_calls: 10}}
    levels:
      ai_tokens: {{guard: tokens-floor, level: 2, throttle_rate: 5req/sec}}
"""


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_edge_state_file(text, "edge.yaml")
    return str(caught.value)


def test_a_state_reads_as_written():
    state = parse_edge_state_file(STATE, "edge.yaml")
    assert state.period.start.at == datetime(2026, 11, 1, tzinfo=timezone.utc)
    assert state.period.end.epoch_s - state.period.start.epoch_s == 30 * 86400
    assert state.plans["free"].quotas["api_calls"].limit == 1000
    assert state.plans["free"].features == ()
    cus_a, cus_b = state.customers
    assert (cus_a.id, cus_a.plan, cus_a.status, cus_a.api_keys) == ("cus_a", "free", "active", (KEY_A,))
    assert (cus_a.usage, cus_a.levels) == ({}, {})
    standing = cus_b.levels["ai_tokens"]
    assert (standing.guard, standing.level, standing.mode) == ("tokens-floor", 2, "enforce")
    assert (standing.throttle_rate, standing.effective_burst) == (Rate(5, 1), 5)


def test_a_shadow_standing_can_sit_beside_the_enforcing_one():
    state = parse_edge_state_file(STATE.replace(LEVEL_LINE, (
        "      ai_tokens:\n"
        "        - {guard: tokens-floor, level: 3}\n"
        "        - {guard: tokens-trial, level: 2, mode: shadow, throttle_rate: 5req/sec}")), "edge.yaml")
    enforcing, shadow = state.customers[1].levels["ai_tokens"]
    assert (enforcing.guard, enforcing.mode) == ("tokens-floor", "enforce")
    assert (shadow.guard, shadow.mode) == ("tokens-trial", "shadow")


def test_the_example_is_valid():
    state = load_edge_state_file(EXAMPLE)
    assert {customer.status for customer in state.customers} == {
        "active", "trialing", "past_due", "canceled", "paused", "expired"
    }
    standings = [standing for customer in state.customers for value in customer.levels.values()
                 for standing in (value if isinstance(value, tuple) else (value,))]
    assert {standing.level for standing in standings} == {0, 1, 2, 3}
    assert {standing.mode for standing in standings} == {"enforce", "shadow"}


def test_the_example_lists_the_digests_of_its_demo_keys():
    # The comment says which plain key each digest is for; `printf %s KEY | sha256sum`.
    text = EXAMPLE.read_text()
    state = load_edge_state_file(EXAMPLE)
    for customer in state.customers:
        for digest in customer.api_keys:
            line = next(line for line in text.splitlines() if digest in line)
            plain_key = line.rsplit("# ", 1)[1].strip()
            assert hashlib.sha256(plain_key.encode()).hexdigest() == digest


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z"),
        ("2026-11-01T00:00:00+01:00", "2026-11-30T23:00:00-01:00"),
        ("2026-11-01T00:00:00.250Z", "2026-11-01T00:00:01Z"),
    ],
)
def test_timestamps_with_any_timezone(start, end):
    text = STATE.replace("2026-11-01T00:00:00Z", start).replace("2026-12-01T00:00:00Z", end)
    period = parse_edge_state_file(text, "edge.yaml").period
    assert period.start.at == datetime.fromisoformat(start)
    assert period.end.at - period.start.at > timedelta(0)


def test_customers_and_plans_may_be_empty():
    state = parse_edge_state_file('period: {start: "2026-11-01T00:00:00Z", end: "2026-12-01T00:00:00Z"}\n')
    assert (state.plans, state.customers) == ({}, ())


def test_the_quota_slot_limit_matches_the_decision_core():
    assert MAX_PLAN_QUOTAS == decision_core.MAX_QUOTA_METRICS


PERIOD_LINE = 'period: {start: "2026-11-01T00:00:00Z", end: "2026-12-01T00:00:00Z"}'
LEVEL_LINE = "      ai_tokens: {guard: tokens-floor, level: 2, throttle_rate: 5req/sec}"
BAD_STATES = [
    ("unknown-plan", "    plan: pro\n", "    plan: business\n",
     "edge.yaml:15: Unknown plan `business`; the plans are `free`, `pro` - at `$.customers[1].plan`"),
    ("duplicate-key-digest", f"api_keys: [{KEY_B}]", f"api_keys: [{KEY_B}, {KEY_A}]",
     f"edge.yaml:17: API key digest `{KEY_A[:12]}...` already belongs to customer `cus_a` "
     "(`$.customers[0].api_keys[0]`); a key may belong to one customer only - at `$.customers[1].api_keys[1]`"),
    ("duplicate-customer-id", "  - id: cus_b", "  - id: cus_a",
     "edge.yaml:14: Duplicate customer id `cus_a`; first used by `$.customers[0]` - at `$.customers[1].id`"),
    ("level-2-without-rate", LEVEL_LINE, "      ai_tokens: {guard: tokens-floor, level: 2}",
     "edge.yaml:20: Level 2 (throttle) needs a `throttle_rate` such as `5req/sec` - at `$.customers[1].levels.ai_tokens`"),
    ("rate-at-level-3", LEVEL_LINE, "      ai_tokens: {guard: tokens-floor, level: 3, throttle_rate: 5req/sec}",
     "edge.yaml:20: `throttle_rate` and `burst` only apply at level 2, not level 3"
     " - at `$.customers[1].levels.ai_tokens`"),
    ("locked-features-at-level-2", LEVEL_LINE,
     "      ai_tokens: {guard: tokens-floor, level: 2, throttle_rate: 5req/sec, locked_features: [x]}",
     "edge.yaml:20: `locked_features` only apply at level 3, not level 2 - at `$.customers[1].levels.ai_tokens`"),
    ("downgrades-at-level-3", LEVEL_LINE,
     "      ai_tokens: {guard: tokens-floor, level: 3, downgrade_models: {gpt-4o: gpt-4o-mini}}",
     "edge.yaml:20: `downgrade_models` only apply at level 2, not level 3 - at `$.customers[1].levels.ai_tokens`"),
    ("two-enforcing-standings", LEVEL_LINE,
     "      ai_tokens: [{guard: a, level: 2, throttle_rate: 5req/sec}, {guard: b, level: 1}]",
     "edge.yaml:20: The standings of `ai_tokens` are one per guard mode: at most one `enforce` and one `shadow`,"
     " got 2 (enforce, enforce) - at `$.customers[1].levels.ai_tokens`"),
    ("no-standing-in-a-list", LEVEL_LINE, "      ai_tokens: []",
     "edge.yaml:20: The standings of `ai_tokens` are one per guard mode: at most one `enforce` and one `shadow`,"
     " got 0 - at `$.customers[1].levels.ai_tokens`"),
    ("level-4", LEVEL_LINE, "      ai_tokens: {guard: tokens-floor, level: 4}",
     "edge.yaml:20: Expected `int` <= 3 - at `$.customers[1].levels.ai_tokens.level`"),
    ("bad-rate", "5req/sec", "5 per second",
     "edge.yaml:20: Expected a rate like `5req/sec`, `300req/min` or `1000req/hour` (units: s, sec, second, m, min,"
     " minute, h, hour), got `5 per second` - at `$.customers[1].levels.ai_tokens.throttle_rate`"),
    ("naive-timestamp", '"2026-11-01T00:00:00Z"', '"2026-11-01T00:00:00"',
     "edge.yaml:1: Timestamp `2026-11-01T00:00:00` has no timezone; add `Z` (UTC) or an offset like `+01:00`"
     " - at `$.period.start`"),
    ("not-a-timestamp", '"2026-12-01T00:00:00Z"', "next month",
     "edge.yaml:1: Expected a timestamp like `2026-11-01T00:00:00Z` or `2026-11-01T00:00:00+01:00`,"
     " got `next month` - at `$.period.end`"),
    ("end-before-start", '"2026-12-01T00:00:00Z"', '"2026-10-01T00:00:00Z"',
     "edge.yaml:1: Period `end` (2026-10-01T00:00:00Z) must be after `start` (2026-11-01T00:00:00Z) - at `$.period`"),
    ("end-equals-start", '"2026-12-01T00:00:00Z"', '"2026-11-01T01:00:00+01:00"',
     "edge.yaml:1: Period `end` (2026-11-01T01:00:00+01:00) must be after `start` (2026-11-01T00:00:00Z) - at `$.period`"),
    ("key-not-hashed", f"api_keys: [{KEY_A}]", "api_keys: [key-a]",
     "edge.yaml:13: Expected the sha256 of an API key as 64 lowercase hex characters, got `key-a`"
     " - at `$.customers[0].api_keys[0]`"),
    ("upper-case-digest", f"api_keys: [{KEY_A}]", f"api_keys: [{KEY_A.upper()}]",
     f"edge.yaml:13: Expected the sha256 of an API key as 64 lowercase hex characters, got `{KEY_A.upper()}`"
     " - at `$.customers[0].api_keys[0]`"),
    ("unknown-status", "status: trialing", "status: suspended",
     "edge.yaml:16: Expected one of `active`, `trialing`, `past_due`, `canceled`, `paused`, `expired`, got `suspended` - at `$.customers[1].status`"),
    ("negative-usage", "usage: {api_calls: 10}", "usage: {ai_tokens: 5, api_calls: -10}",
     "edge.yaml:18: Expected `int` >= 0 - at `$.customers[1].usage.api_calls`"),
    ("negative-limit", "limit: 1000", "limit: -1",
     "edge.yaml:5: Expected `int` >= 0 - at `$.plans.free.quotas.api_calls.limit`"),
    ("soft-or-hard-unsaid", "{limit: 1000, hard: true}", "{limit: 1000}",
     "edge.yaml:5: Object missing required field `hard` - at `$.plans.free.quotas.api_calls`"),
    ("bad-customer-id", "  - id: cus_a", "  - id: 'acme corp'",
     "edge.yaml:10: Expected a customer id (letters, digits, `_`, `.`, `:`, `-`), got `acme corp` - at `$.customers[0].id`"),
    ("unknown-customer-key", "    status: active\n", "    status: active\n    email: a@example.com\n",
     "edge.yaml:13: Object contains unknown field `email` - at `$.customers[0]`"),
    ("missing-period", PERIOD_LINE + "\n", "",
     "edge.yaml:1: Object missing required field `period`"),
]


@pytest.mark.parametrize(("old", "new", "message"), [case[1:] for case in BAD_STATES], ids=[case[0] for case in BAD_STATES])
def test_bad_edge_state(old, new, message):
    assert old in STATE
    assert error_of(STATE.replace(old, new, 1)) == message


def test_too_many_quotas_in_a_plan():
    quotas = ", ".join(f"m{n}: {{limit: 1, hard: true}}" for n in range(MAX_PLAN_QUOTAS + 1))
    text = STATE.replace("quotas: {api_calls: {limit: 1000, hard: true}}", f"quotas: {{{quotas}}}")
    assert error_of(text) == "edge.yaml:3: A plan can set quotas on at most 8 metrics, got 9 - at `$.plans.free`"


def test_every_cross_reference_problem_is_reported_at_once():
    text = STATE.replace("    plan: free\n", "    plan: gold\n").replace("  - id: cus_b", "  - id: cus_a")
    assert error_of(text).splitlines() == [
        "edge.yaml:11: Unknown plan `gold`; the plans are `free`, `pro` - at `$.customers[0].plan`",
        "edge.yaml:14: Duplicate customer id `cus_a`; first used by `$.customers[0]` - at `$.customers[1].id`",
    ]


def test_not_utf8(tmp_path):
    path = tmp_path / "edge.yaml"
    path.write_bytes(STATE.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_edge_state_file(path)
    assert str(caught.value) == f"{path}:21: File is not UTF-8 text (byte 0xe9 at offset {len(STATE) + 5})"


def test_a_file_of_many_customers_loads(tmp_path):
    # Without aliases a file may be as long as the customers it lists (the bound is
    # on what aliases add, not on what is written).
    lines = [PERIOD_LINE, "plans:", "  free: {tier: free}", "customers:"]
    # (Such a file was once refused past 100,000 values although it has no alias.)
    lines += [f"  - {{id: cus_{n}, plan: free, status: active}}" for n in range(110_000)]
    (tmp_path / "edge.yaml").write_text("\n".join(lines) + "\n")
    state = load_edge_state_file(tmp_path / "edge.yaml")
    assert len(state.customers) == 110_000 and state.customers[-1].id == "cus_109999"


MONTHLY = STATE.replace(PERIOD_LINE, "period: monthly")


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.parametrize(
    ("at", "start", "end"),
    [
        ("2026-12-07T23:45:00Z", "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"),   # December -> January
        ("2026-12-31T23:59:59.999Z", "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"),
        ("2027-01-01T00:00:00Z", "2027-01-01T00:00:00Z", "2027-02-01T00:00:00Z"),   # the boundary is the next month's
        ("2026-11-30T23:59:59Z", "2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z"),
        ("2027-02-14T12:00:00Z", "2027-02-01T00:00:00Z", "2027-03-01T00:00:00Z"),   # 28 days
        ("2028-02-29T12:00:00Z", "2028-02-01T00:00:00Z", "2028-03-01T00:00:00Z"),   # a leap year: 29 days
        ("2026-07-31T22:30:00-02:00", "2026-08-01T00:00:00Z", "2026-09-01T00:00:00Z"),  # months are UTC's
    ],
)
def test_a_monthly_period_is_the_calendar_month_of_the_clock(at, start, end):
    state = parse_edge_state_file(MONTHLY, "edge.yaml")
    period = state.period_at(utc(at).timestamp())
    assert state.rolling
    assert (period.start.at, period.end.at) == (utc(start), utc(end))
    assert period.start.at.tzinfo == timezone.utc


def test_a_fixed_period_is_the_same_at_any_time():
    state = parse_edge_state_file(STATE, "edge.yaml")
    assert not state.rolling
    assert state.period_at(utc("2030-05-05T00:00:00Z").timestamp()) is state.period


def test_the_example_state_rolls_monthly():
    # So its quotas and standings are in force whenever someone tries it.
    assert load_edge_state_file(EXAMPLE).period == "monthly"


@pytest.mark.parametrize(
    ("period", "message"),
    [
        ("weekly", "edge.yaml:1: Expected one of `monthly`, got `weekly` - at `$.period`"),
        ("{every: month}", "edge.yaml:1: Object contains unknown field `every` - at `$.period`"),
    ],
)
def test_an_unknown_rolling_period_is_refused(period, message):
    assert error_of(STATE.replace(PERIOD_LINE, f"period: {period}")) == message


def test_a_customer_of_a_monthly_file_has_no_period_of_its_own():
    text = MONTHLY.replace("    plan: free\n", '    plan: free\n    period_end: "2026-12-15T00:00:00Z"\n')
    assert error_of(text) == (
        "edge.yaml:12: With `period: monthly` every customer's period is the calendar month; "
        "a customer's own `period_end` needs a fixed `period: {start, end}` - at `$.customers[0].period_end`")
