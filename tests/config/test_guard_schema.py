# Guard schema semantics: how percentages, rates, scopes and the level ladder are
# read, and the exact message (line and path included) a user gets when one is wrong.
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from config import Band, ConfigError, Percent, Rate, Scope, parse_guards

GUARD_TEMPLATE = """\
guards:
  - id: api-calls-floor
    metric: api_calls
    min_margin: 20%
{extra}    actions:
{actions}
"""
LEVEL_1_ONLY = "      level_1: {threshold: 15%}"


def guard_file(actions: str = LEVEL_1_ONLY, extra: str = "") -> str:
    """A one-guard file: `extra` lines go before `actions:` (line 5 when one line)."""
    return GUARD_TEMPLATE.format(actions=actions, extra=extra)


def only_guard(text: str):
    (guard,) = parse_guards(text, "guards.yaml").guards
    return guard


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_guards(text, "guards.yaml")
    return str(caught.value)


@pytest.mark.parametrize(
    ("written", "percent"),
    [
        ("25%", 25.0),
        ("12.5%", 12.5),
        ("-10%", -10.0),
        ("+5%", 5.0),
        ("0%", 0.0),
        ("100%", 100.0),
        ("-1000%", -1000.0),
        (" 7 %", 7.0),
    ],
)
def test_percent_accepts_percent_strings(written, percent):
    parsed = Percent.parse(written)
    assert parsed == percent
    assert isinstance(parsed, Percent)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (25, "Expected a percentage like `25%`, got `25`"),
        (12.5, "Expected a percentage like `25%`, got `12.5`"),
        ("25", "Expected a percentage like `25%`, got `25`"),
        ("abc", "Expected a percentage like `25%`, got `abc`"),
        ("25%%", "Expected a percentage like `25%`, got `25%%`"),
        ("%25", "Expected a percentage like `25%`, got `%25`"),
        ("1e2%", "Expected a percentage like `25%`, got `1e2%`"),
        ("", "Expected a percentage like `25%`, got ``"),
        (None, "Expected a percentage like `25%`, got `null`"),
        (True, "Expected a percentage like `25%`, got `true`"),
        ("100.01%", "Expected a percentage between -1000% and 100%, got `100.01%`"),
        ("-1000.5%", "Expected a percentage between -1000% and 100%, got `-1000.5%`"),
    ],
)
def test_percent_rejects_everything_else(raw, message):
    with pytest.raises(ValueError) as caught:
        Percent.parse(raw)
    assert str(caught.value) == message


def test_recovery_band_may_be_zero_but_not_negative():
    assert Band.parse("0%") == 0.0
    with pytest.raises(ValueError, match=r"^Expected a percentage between 0% and 100%, got `-1%`$"):
        Band.parse("-1%")


@given(st.decimals(min_value=-1000, max_value=100, places=2))
def test_percent_reads_back_what_it_prints(value):
    percent = Percent.parse(f"{value}%")
    assert percent == float(value)
    assert Percent.parse(str(percent)) == percent


@pytest.mark.parametrize(
    ("written", "tokens", "per_s", "default_burst"),
    [
        ("5req/sec", 5, 1, 5),
        ("10 req/s", 10, 1, 10),
        ("2 req / second", 2, 1, 2),
        ("300req/min", 300, 60, 5),
        ("90req/m", 90, 60, 2),
        ("1req/minute", 1, 60, 1),
        ("1000req/hour", 1000, 3600, 1),
        ("7200req/h", 7200, 3600, 2),
    ],
)
def test_rate_forms(written, tokens, per_s, default_burst):
    rate = Rate.parse(written)
    assert (rate.tokens, rate.per_s, rate.default_burst) == (tokens, per_s, default_burst)


RATE_FORMS_MESSAGE = (
    "Expected a rate like `5req/sec`, `300req/min` or `1000req/hour` "
    "(units: s, sec, second, m, min, minute, h, hour), got `{}`"
)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("5req/day", RATE_FORMS_MESSAGE.format("5req/day")),
        ("5/sec", RATE_FORMS_MESSAGE.format("5/sec")),
        ("5req/secs", RATE_FORMS_MESSAGE.format("5req/secs")),
        ("five req/sec", RATE_FORMS_MESSAGE.format("five req/sec")),
        ("5.5req/sec", RATE_FORMS_MESSAGE.format("5.5req/sec")),
        ("-5req/sec", RATE_FORMS_MESSAGE.format("-5req/sec")),
        (5, RATE_FORMS_MESSAGE.format("5")),
        ("0req/sec", "Expected a positive request count, got `0req/sec`"),
    ],
)
def test_rate_rejects_other_forms(raw, message):
    with pytest.raises(ValueError) as caught:
        Rate.parse(raw)
    assert str(caught.value) == message


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["sec", "min", "hour"]))
def test_rate_reads_back_what_it_prints(tokens, unit):
    rate = Rate.parse(f"{tokens}req/{unit}")
    assert Rate.parse(str(rate)) == rate
    assert rate.default_burst == max(1, math.ceil(rate.tokens / rate.per_s))


def test_omitted_fields_take_documented_defaults():
    guard = only_guard(guard_file())
    assert guard.scope == Scope.GLOBAL
    assert guard.mode == "enforce"
    assert guard.recovery_band == 2.0
    assert guard.actions.level_2 is None and guard.actions.level_3 is None


@pytest.mark.parametrize(
    ("written", "scope"),
    [
        ("global", Scope.GLOBAL),
        ("{tier: pro}", Scope("tier", "pro")),
        ("{customer: cus_42}", Scope("customer", "cus_42")),
        ('{customer: "1001"}', Scope("customer", "1001")),
    ],
)
def test_scope_forms(written, scope):
    assert only_guard(guard_file(extra=f"    scope: {written}\n")).scope == scope


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("pro", "Expected a scope like `global`, `{tier: NAME}` or `{customer: ID}`, got `pro`"),
        ("[tier, pro]", "Expected a scope like `global`, `{tier: NAME}` or `{customer: ID}`, got `['tier', 'pro']`"),
        ("{}", "Scope takes exactly one of `tier` or `customer`, got an empty mapping"),
        ("{tier: pro, customer: c1}", "Scope takes exactly one of `tier` or `customer`, got `customer`, `tier`"),
        ("{plan: pro}", "Unknown scope key `plan`; expected exactly one of `tier` or `customer`"),
        ("{tier: ''}", "Scope `tier` must be a non-empty string, got ``"),
        ("{customer: 42}", "Scope `customer` must be a non-empty string, got `42`"),
    ],
)
def test_bad_scope_forms(written, message):
    text = guard_file(extra=f"    scope: {written}\n")
    assert error_of(text) == f"guards.yaml:5: {message} - at `$.guards[0].scope`"


@pytest.mark.parametrize(
    "actions",
    [
        "      level_1: {threshold: 30%}\n      level_2: {threshold: 20%, throttle_rate: 5req/sec}\n"
        "      level_3: {threshold: 10%}",
        "      level_3: {threshold: -5%}",
        "      level_1: {threshold: 30%}\n      level_3: {threshold: 29.5%}",
        "      level_2: {threshold: 0%, throttle_rate: 1req/min}\n      level_3: {threshold: -1000%}",
        "      level_3: {threshold: 0%, action: lock_features, features: [large_models]}",
    ],
    ids=["full-ladder", "block-only", "gap-allowed", "down-to-minimum", "lock"],
)
def test_valid_ladders(actions):
    only_guard(guard_file(actions))


@pytest.mark.parametrize(
    ("actions", "message"),
    [
        (
            "      level_1: {threshold: 20%}\n      level_2: {threshold: 20%, throttle_rate: 5req/sec}",
            "guards.yaml:5: Thresholds must descend from level 1 to level 3: `level_2` threshold "
            "20% is not below `level_1` threshold 20% - at `$.guards[0].actions`",
        ),
        (
            "      level_1: {threshold: 30%}\n      level_3: {threshold: 40%}",
            "guards.yaml:5: Thresholds must descend from level 1 to level 3: `level_3` threshold "
            "40% is not below `level_1` threshold 30% - at `$.guards[0].actions`",
        ),
        (
            "      level_2: {threshold: 20%, throttle_rate: 5req/sec}\n      level_3: {threshold: 20.5%}",
            "guards.yaml:5: Thresholds must descend from level 1 to level 3: `level_3` threshold "
            "20.5% is not below `level_2` threshold 20% - at `$.guards[0].actions`",
        ),
        (
            "      level_1: null",
            "guards.yaml:5: At least one of `level_1`, `level_2`, `level_3` is required"
            " - at `$.guards[0].actions`",
        ),
        (
            "      level_2: {threshold: 20%}",
            "guards.yaml:6: Object missing required field `throttle_rate`"
            " - at `$.guards[0].actions.level_2`",
        ),
        (
            "      level_2: {threshold: 20%, throttle_rate: 5req/sec, burst: 0}",
            "guards.yaml:6: Expected `int` >= 1 - at `$.guards[0].actions.level_2.burst`",
        ),
        (
            "      level_2: {threshold: 20%, throttle_rate: 5req/sec, downgrade_models: {gpt-4o: gpt-4o}}",
            "guards.yaml:6: `downgrade_models` maps `gpt-4o` to itself - at `$.guards[0].actions.level_2`",
        ),
        (
            "      level_2: {threshold: 20%, throttle_rate: 5req/sec, downgrade_models: {gpt-4o: 'gpt 4o mini'}}",
            "guards.yaml:6: Expected a model or tool name (letters, digits, `_`, `.`, `:`, `@`, `/`, `-`), got "
            "`gpt 4o mini` - at `$.guards[0].actions.level_2.downgrade_models['gpt-4o']`",
        ),
        (
            "      level_3: {threshold: 0%, action: lock_features, features: []}",
            "guards.yaml:6: `action: lock_features` needs a non-empty `features` list"
            " - at `$.guards[0].actions.level_3`",
        ),
        (
            "      level_3: {threshold: 0%, action: throttle}",
            "guards.yaml:6: Expected one of `block_request`, `lock_features`, got `throttle`"
            " - at `$.guards[0].actions.level_3.action`",
        ),
        (
            "      level_1: {threshold: 30%, notify: finance-ops}",
            "guards.yaml:6: Expected `array`, got `str` - at `$.guards[0].actions.level_1.notify`",
        ),
        (
            "      level_4: {threshold: 5%}",
            "guards.yaml:6: Object contains unknown field `level_4` - at `$.guards[0].actions`",
        ),
    ],
    ids=[
        "equal-thresholds",
        "ascending-across-gap",
        "ascending-2-3",
        "no-level",
        "throttle-without-rate",
        "zero-burst",
        "downgrade-to-itself",
        "downgrade-to-a-bad-name",
        "lock-empty-features",
        "unknown-level-3-action",
        "notify-not-a-list",
        "no-level-4",
    ],
)
def test_level_rules(actions, message):
    assert error_of(guard_file(actions)) == message


def test_throttle_burst_defaults_to_one_second_of_the_rate():
    throttle = "      level_2: {threshold: 20%, throttle_rate: 300req/min}"
    assert only_guard(guard_file(throttle)).actions.level_2.effective_burst == 5
    throttle = "      level_2: {threshold: 20%, throttle_rate: 300req/min, burst: 40}"
    assert only_guard(guard_file(throttle)).actions.level_2.effective_burst == 40


def test_a_guard_reads_as_written():
    guard = only_guard(
        guard_file(
            "      level_1: {threshold: 30%, notify: [engineering-alerts, finance-ops]}\n"
            "      level_2: {threshold: 20%, throttle_rate: 5req/sec}\n"
            "      level_3: {threshold: 10%, action: lock_features, features: [large_models]}",
            extra="    scope: {tier: pro}\n    mode: shadow\n    recovery_band: 5%\n",
        )
    )
    assert (guard.id, guard.metric, guard.min_margin) == ("api-calls-floor", "api_calls", 20.0)
    assert (guard.scope, guard.mode, guard.recovery_band) == (Scope("tier", "pro"), "shadow", 5.0)
    assert [number for number, _ in guard.actions.levels] == [1, 2, 3]
    assert guard.actions.level_1.notify == ("engineering-alerts", "finance-ops")
    assert guard.actions.level_2.throttle_rate == Rate(5, 1)
    assert guard.actions.level_3.features == ("large_models",)


@pytest.mark.parametrize("metric", ["api_calls", "ai.tokens", "egress:bytes", '"*"', "overall"])
def test_metric_names(metric):
    text = guard_file().replace("metric: api_calls", f"metric: {metric}")
    assert only_guard(text).metric == metric.strip('"')


def test_guards_may_be_an_empty_list():
    assert parse_guards("guards: []\n").guards == ()
