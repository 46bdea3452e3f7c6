import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decision_core import (
    IllegalTransitionError,
    InvalidStateError,
    LevelThresholds,
    ThresholdOrderError,
    margin_level,
    margin_pct,
    transition_kind,
)
from decision_core.margin import MARGIN_NO_LOSS, MARGIN_UNBOUNDED_LOSS


@pytest.mark.parametrize(
    "revenue, cogs, expected",
    [
        (100, 25, 75.0),
        (100, 100, 0.0),
        (100, 150, -50.0),
        (100, 0, 100.0),
        (0, 0, MARGIN_NO_LOSS),               # nothing earned, nothing spent: no risk
        (0, 5, MARGIN_UNBOUNDED_LOSS),        # cost with no revenue: every level applies
        (-10, 0, MARGIN_UNBOUNDED_LOSS),      # refunds above charges lose money
        (-10, -20, MARGIN_NO_LOSS),           # ... unless cost credits cover it
        (0, -3, MARGIN_NO_LOSS),
    ],
)
def test_margin_is_defined_for_every_revenue(revenue, cogs, expected):
    assert margin_pct(revenue, cogs) == expected


def test_nan_is_an_error_not_a_margin():
    with pytest.raises(InvalidStateError):
        margin_pct(math.nan, 1)


GUARD = LevelThresholds(30, 20, 10, band=2)


@pytest.mark.parametrize(
    "margin, current, expected",
    [
        (50, 0, 0),
        (30, 0, 0),        # at the threshold is not below it
        (29.9, 0, 1),
        (15, 0, 2),
        (5, 0, 3),         # may skip levels
        (MARGIN_UNBOUNDED_LOSS, 0, 3),
        # hysteresis: recovery needs threshold + band
        (31, 1, 1),
        (32, 1, 0),
        (21.5, 2, 2),
        (22, 2, 1),
        (32, 2, 0),
        (11, 3, 3),
        (12, 3, 2),
        (25, 3, 1),
        (40, 3, 0),
        # escalation ignores the band
        (19.99, 1, 2),
    ],
)
def test_levels_escalate_at_once_and_recover_past_the_band(margin, current, expected):
    assert margin_level(margin, GUARD, current) == expected


def test_unused_levels_are_never_entered():
    warn_only = LevelThresholds(30, None, None)
    assert margin_level(MARGIN_UNBOUNDED_LOSS, warn_only, 0) == 1
    block_only = LevelThresholds(None, None, 0)
    assert margin_level(5, block_only, 0) == 0
    assert margin_level(-1, block_only, 0) == 3


@pytest.mark.parametrize(
    "thresholds",
    [(20, 30, 10), (30, 30, 10), (30, None, 30), (None, None, None)],
)
def test_thresholds_must_descend(thresholds):
    with pytest.raises(ThresholdOrderError):
        LevelThresholds(*thresholds)


def test_negative_band_is_refused():
    with pytest.raises(ThresholdOrderError):
        LevelThresholds(30, 20, 10, band=-1)


@pytest.mark.parametrize("current", [-1, 4])
def test_levels_outside_the_ladder_are_refused(current):
    with pytest.raises(InvalidStateError):
        margin_level(10, GUARD, current)


@pytest.mark.parametrize(
    "level_from, level_to, kind",
    [(0, 1, "escalate"), (0, 3, "escalate"), (2, 3, "escalate"), (3, 0, "recover"), (2, 1, "recover")],
)
def test_transition_table(level_from, level_to, kind):
    assert transition_kind(level_from, level_to) == kind


@pytest.mark.parametrize("level_from, level_to", [(1, 1), (0, 0), (3, 4), (-1, 0)])
def test_illegal_transitions_raise(level_from, level_to):
    with pytest.raises(IllegalTransitionError):
        transition_kind(level_from, level_to)


@settings(max_examples=300, deadline=None)
@given(
    revenue=st.integers(0, 10**12),
    cost_steps=st.lists(st.integers(0, 10**10), min_size=1, max_size=50),
    thresholds=st.lists(st.floats(-500, 100), min_size=3, max_size=3, unique=True),
    band=st.floats(0, 20),
)
def test_margin_level_never_improves_when_only_cogs_grows(revenue, cost_steps, thresholds, band):
    high, mid, low = sorted(thresholds, reverse=True)
    guard = LevelThresholds(high, mid, low, band=band)
    cogs = 0
    level = margin_level(margin_pct(revenue, cogs), guard, 0)
    for step in cost_steps:
        cogs += step
        new_level = margin_level(margin_pct(revenue, cogs), guard, level)
        assert new_level >= level
        level = new_level
