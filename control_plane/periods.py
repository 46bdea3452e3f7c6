# Billing periods of a subscription: they start at its anchor and repeat every plan
# period (day, week, month, year), in the anchor's timezone. A month period keeps the
# anchor's day of month, clamped to shorter months (anchored on the 31st: Jan 31,
# Feb 28 or 29, Mar 31, ...), and always counts from the anchor, so the days lost in
# February come back in March. Periods are contiguous: each ends where the next starts.
from __future__ import annotations

import calendar
import datetime

PERIODS = ("day", "week", "month", "year")
_FIXED = {"day": datetime.timedelta(days=1), "week": datetime.timedelta(weeks=1)}


def period_start(anchor: datetime.datetime, period: str, index: int) -> datetime.datetime:
    """The start of period number `index` (0 = the one beginning at `anchor`;
    negative numbers count back). `anchor` must carry a timezone."""
    if anchor.tzinfo is None:
        raise ValueError("a billing anchor needs a timezone")
    if period in _FIXED:
        return anchor + index * _FIXED[period]
    months = index * (12 if period == "year" else 1) if period in ("month", "year") else None
    if months is None:
        raise ValueError(f"unknown billing period {period!r}; expected one of {', '.join(PERIODS)}")
    year, month = divmod(anchor.month - 1 + months, 12)
    year += anchor.year
    day = min(anchor.day, calendar.monthrange(year, month + 1)[1])
    return anchor.replace(year=year, month=month + 1, day=day)


def period_bounds(anchor: datetime.datetime, period: str,
                  at: datetime.datetime) -> tuple[datetime.datetime, datetime.datetime]:
    """[start, end) of the billing period that contains the instant `at` (which may
    lie before the anchor: periods extend backwards too). Both must carry timezones."""
    if at.tzinfo is None:
        raise ValueError("an instant needs a timezone")
    if period in _FIXED:
        index = (at - anchor) // _FIXED[period]
    else:
        months_per = 12 if period == "year" else 1
        at_local = at.astimezone(anchor.tzinfo)
        index = ((at_local.year - anchor.year) * 12 + at_local.month - anchor.month) // months_per
        # The estimate counts calendar months; step to the period that holds `at`.
        while period_start(anchor, period, index) > at:
            index -= 1
        while period_start(anchor, period, index + 1) <= at:
            index += 1
    return period_start(anchor, period, index), period_start(anchor, period, index + 1)
