# The demo and the all-in-one example run on any day: every subscription in their
# catalogs has started and has a billing period holding the day, renewing from its
# anchor, so the demo's quota and guard ladder are in force whenever it is tried.
import datetime
from pathlib import Path

import pytest

from config.catalog_file import load_catalog_file
from control_plane.periods import period_bounds

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "examples"
DAYS = ["2026-12-07T23:45:00+00:00", "2027-01-01T00:00:00+00:00", "2028-02-29T12:00:00+00:00",
        "2031-10-31T23:59:59+00:00"]


@pytest.mark.parametrize("catalog", [EXAMPLES / "demo" / "catalog.yaml", EXAMPLES / "catalog.yaml"])
@pytest.mark.parametrize("day", DAYS)
def test_every_subscription_of_the_examples_is_in_a_period_on_any_day(catalog, day):
    at = datetime.datetime.fromisoformat(day)
    catalog = load_catalog_file(catalog)
    periods = {plan.key: plan.period for plan in catalog.plans}
    for subscription in catalog.subscriptions:
        anchor = subscription.period_anchor.at
        start, end = period_bounds(anchor, periods[subscription.plan], at)
        assert anchor <= start <= at < end, subscription.key
