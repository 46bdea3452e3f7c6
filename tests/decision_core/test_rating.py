import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decision_core import (
    FlatFee,
    Graduated,
    Package,
    PerUnit,
    PricingError,
    Tier,
    Volume,
    event_revenue,
)

NANOS = 1_000_000_000
CENT = NANOS // 100

# Graduated: first 1,000 free, next 9,000 at 1 cent, the rest at 0.5 cent plus a $5 entry fee.
GRADUATED = Graduated([Tier(1000, 0), Tier(10_000, CENT), Tier(None, CENT // 2, flat_nanos=5 * NANOS)])
# Volume: every unit at the price of the tier the total lands in.
VOLUME = Volume([Tier(1000, 2 * CENT), Tier(10_000, CENT), Tier(None, CENT // 2)])


@pytest.mark.parametrize(
    "model, units, expected_nanos",
    [
        (PerUnit(CENT), 0, 0),
        (PerUnit(CENT), 250, 250 * CENT),
        # $0.15 per 1M tokens: 1 token rounds down to 150 nanos... rounding is on the total
        (PerUnit(150 * NANOS // 1000, per_units=1_000_000), 1, 150),
        (PerUnit(90 * NANOS // 1000, per_units=10**9), 1, 0),          # $0.09/GB, one byte
        (PerUnit(90 * NANOS // 1000, per_units=10**9), 10**9, 90_000_000),
        (GRADUATED, 0, 0),
        (GRADUATED, 1000, 0),
        (GRADUATED, 1001, CENT),
        (GRADUATED, 10_000, 9000 * CENT),
        (GRADUATED, 10_001, 9000 * CENT + CENT // 2 + 5 * NANOS),
        (VOLUME, 0, 0),
        (VOLUME, 1000, 1000 * 2 * CENT),
        (VOLUME, 1001, 1001 * CENT),                                   # cheaper than 1000 units
        (VOLUME, 20_000, 20_000 * CENT // 2),
        (Package(100, 3 * NANOS), 0, 0),
        (Package(100, 3 * NANOS), 1, 3 * NANOS),
        (Package(100, 3 * NANOS), 100, 3 * NANOS),
        (Package(100, 3 * NANOS), 101, 6 * NANOS),
        (FlatFee(49 * NANOS), 0, 49 * NANOS),
        (FlatFee(49 * NANOS), 10**9, 49 * NANOS),
    ],
)
def test_each_pricing_model_rates_the_period_total(model, units, expected_nanos):
    assert model.revenue(units) == expected_nanos


def test_crossing_into_a_cheaper_volume_tier_gives_negative_event_revenue():
    assert event_revenue(VOLUME, 1000, 1) == 1001 * CENT - 1000 * 2 * CENT < 0


def test_a_flat_fee_earns_nothing_per_event():
    assert event_revenue(FlatFee(49 * NANOS), 500, 100) == 0


@pytest.mark.parametrize(
    "build",
    [
        lambda: PerUnit(-1),
        lambda: PerUnit(1, per_units=0),
        lambda: Package(0, 1),
        lambda: Graduated([]),
        lambda: Graduated([Tier(100, 1), Tier(50, 1), Tier(None, 1)]),
        lambda: Graduated([Tier(None, 1), Tier(None, 1)]),
        lambda: Volume([Tier(100, 1)]),
        lambda: Tier(0, 1),
        lambda: FlatFee(-5),
        lambda: PerUnit(1).revenue(-1),
        lambda: event_revenue(PerUnit(1), 10, -3),
    ],
)
def test_unratable_prices_and_usage_are_refused(build):
    with pytest.raises(PricingError):
        build()


prices = st.integers(0, 10 * NANOS)
per_units = st.sampled_from([1, 1000, 1_000_000, 10**9])


@st.composite
def tiers(draw):
    bounds = sorted(set(draw(st.lists(st.integers(1, 100_000), min_size=0, max_size=4))))
    result = [Tier(b, draw(prices), draw(per_units), draw(st.integers(0, NANOS))) for b in bounds]
    result.append(Tier(None, draw(prices), draw(per_units), draw(st.integers(0, NANOS))))
    return result


models = st.one_of(
    st.builds(PerUnit, prices, per_units),
    st.builds(Graduated, tiers()),
    st.builds(Volume, tiers()),
    st.builds(Package, st.integers(1, 10_000), prices),
    st.builds(FlatFee, prices),
)


@settings(max_examples=300, deadline=None)
@given(model=models, sizes=st.lists(st.integers(0, 50_000), max_size=60), data=st.data())
def test_event_revenues_sum_to_the_period_total_in_any_order(model, sizes, data):
    order = data.draw(st.permutations(sizes))
    total_units = 0
    earned = 0
    for units in order:
        earned += event_revenue(model, total_units, units)
        total_units += units
    assert earned == model.revenue(sum(sizes)) - model.revenue(0)


@settings(max_examples=200, deadline=None)
@given(model=st.one_of(st.builds(PerUnit, prices, per_units), st.builds(Graduated, tiers()),
                       st.builds(Package, st.integers(1, 10_000), prices)),
       a=st.integers(0, 10**6), b=st.integers(0, 10**6))
def test_usage_priced_models_other_than_volume_never_pay_back(model, a, b):
    low, high = sorted((a, b))
    assert model.revenue(low) <= model.revenue(high)
