# Billing periods: where each starts and ends, month-end anchors, instants before the
# anchor, and (as invariants) contiguity and containment.
import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control_plane.periods import period_bounds, period_start

UTC = datetime.timezone.utc


def at(text):
    return datetime.datetime.fromisoformat(text)


@pytest.mark.parametrize("anchor, period, instant, start, end", [
    ("2026-11-01T00:00:00+00:00", "month", "2026-11-23T12:00:00+00:00", "2026-11-01T00:00:00+00:00",
     "2026-12-01T00:00:00+00:00"),
    ("2026-01-31T00:00:00+00:00", "month", "2026-02-28T12:00:00+00:00", "2026-02-28T00:00:00+00:00",
     "2026-03-31T00:00:00+00:00"),
    ("2026-01-31T00:00:00+00:00", "month", "2028-02-29T06:00:00+00:00", "2028-02-29T00:00:00+00:00",
     "2028-03-31T00:00:00+00:00"),
    ("2026-11-15T00:00:00+00:00", "month", "2026-11-14T23:59:59+00:00", "2026-10-15T00:00:00+00:00",
     "2026-11-15T00:00:00+00:00"),
    ("2026-11-15T00:00:00+01:00", "month", "2026-12-14T23:30:00+00:00", "2026-12-15T00:00:00+01:00",
     "2027-01-15T00:00:00+01:00"),
    ("2024-02-29T00:00:00+00:00", "year", "2025-03-01T00:00:00+00:00", "2025-02-28T00:00:00+00:00",
     "2026-02-28T00:00:00+00:00"),
    ("2026-11-02T09:00:00+00:00", "week", "2026-11-23T08:59:59+00:00", "2026-11-16T09:00:00+00:00",
     "2026-11-23T09:00:00+00:00"),
    ("2026-11-02T00:00:00+00:00", "day", "2026-11-02T00:00:00+00:00", "2026-11-02T00:00:00+00:00",
     "2026-11-03T00:00:00+00:00"),
])
def test_the_period_holding_an_instant(anchor, period, instant, start, end):
    assert period_bounds(at(anchor), period, at(instant)) == (at(start), at(end))


def test_times_without_a_timezone_or_unknown_periods_are_refused():
    with pytest.raises(ValueError, match="timezone"):
        period_start(datetime.datetime(2026, 11, 1), "month", 0)
    with pytest.raises(ValueError, match="timezone"):
        period_bounds(at("2026-11-01T00:00:00+00:00"), "month", datetime.datetime(2026, 11, 2))
    with pytest.raises(ValueError, match="unknown billing period 'quarter'"):
        period_start(at("2026-11-01T00:00:00+00:00"), "quarter", 1)


@given(
    anchor=st.datetimes(min_value=datetime.datetime(2000, 1, 1), max_value=datetime.datetime(2100, 1, 1),
                        timezones=st.just(UTC)),
    offset_s=st.integers(min_value=-20 * 365 * 86400, max_value=20 * 365 * 86400),
    period=st.sampled_from(["day", "week", "month", "year"]),
)
def test_every_instant_lies_in_exactly_one_period_and_periods_touch(anchor, offset_s, period):
    instant = anchor + datetime.timedelta(seconds=offset_s)
    start, end = period_bounds(anchor, period, instant)
    assert start <= instant < end
    assert period_bounds(anchor, period, end)[0] == end          # the next period starts where this one ends
    assert period_bounds(anchor, period, start) == (start, end)
