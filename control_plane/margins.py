# Margin for the current billing period, per customer and metric and per customer
# overall: revenue (usage charges rated so far plus the fixed fee, allocated across
# metrics as the plan says; the unallocated rest counts overall only) plus the plan's
# allocated value (allocated as the fee is) against COGS (unit costs of usage plus
# cost events), all in the plan's currency. margin % = (revenue + allocated - COGS) /
# (revenue + allocated) * 100, with the zero-revenue cases of decision_core.margin_pct.
from __future__ import annotations

import datetime
import math
from collections.abc import Iterable

import msgspec

from control_plane.rating import Rater
from control_plane.store import OVERALL, Store
from decision_core import margin_pct


class MetricMargin(msgspec.Struct):
    metric: str
    units: int
    revenue_nanos: int             # earned: what the customer is invoiced
    cogs_nanos: int
    margin_pct: float | None       # None: cost with no revenue (an unbounded loss)
    allocated_nanos: int = 0       # the plan's allocated value, never invoiced


class CustomerMargin(msgspec.Struct):
    customer_id: str
    subscription: str
    plan: str
    period_start: str
    period_end: str
    revenue_nanos: int
    cogs_nanos: int
    margin_pct: float | None
    metrics: list[MetricMargin]
    currency: str = "USD"          # of every amount here: the plan's
    allocated_nanos: int = 0


def margin_pct_of(revenue: int, cogs: int) -> float | None:
    """decision_core.margin_pct rounded to 4 places as reports show it; None for an
    unbounded loss (cost with no revenue)."""
    value = margin_pct(revenue, cogs)
    return None if math.isinf(value) else round(value, 4)


async def customer_margins(store: Store, now: float, customer_id: str | None = None,
                           rater: Rater | None = None) -> list[CustomerMargin]:
    """Each customer's margin for the billing period holding `now` (epoch seconds),
    worst first; only `customer_id` when given. A customer counts when it has a
    billable subscription at `now`."""
    rater = rater or await Rater.load(store)
    rows = await store.period_totals(now, customer_id)
    customers = [customer_id] if customer_id is not None else None
    margins = _margins(rater, now, rows, customers)
    margins.sort(key=lambda margin: (-math.inf if margin.margin_pct is None else margin.margin_pct,
                                     margin.customer_id))
    return margins


async def margins_of(store: Store, now: float, customer_ids: Iterable[str], rater: Rater) -> list[CustomerMargin]:
    """customer_margins() of several customers, with one read of their totals, in
    customer order (a customer without a billable subscription at `now` is left out)."""
    customers = sorted(set(customer_ids))
    return _margins(rater, now, await store.period_totals_of(now, customers), customers)


def _margins(rater, now, rows, customers):
    # The margins of `customers` (None: every customer with a subscription or totals)
    # from their totals `rows`, in customer order.
    at = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    totals = {}
    for row in rows:
        totals.setdefault(row.customer_id, []).append(row)
    if customers is None:
        customers = sorted(set(rater.by_customer) | set(totals))
    margins = []
    for customer in customers:
        subscription = rater.subscription_of(customer, at)
        if subscription is None:
            continue
        pricing = rater.plans[subscription.plan]
        start, end = rater.period_of(subscription, at)
        rows = [row for row in totals.get(customer, ()) if row.subscription == subscription.key]
        by_metric = {row.metric: row for row in rows}
        metrics = []
        for metric in sorted((set(by_metric) | set(pricing.plan.fee_allocation)) - {OVERALL}):
            row = by_metric.get(metric)
            revenue = (row.revenue_nanos if row else 0) + pricing.fixed_fee_share_nanos(metric)
            allocated = pricing.allocated_share_nanos(metric)
            cogs = row.cogs_nanos if row else 0
            metrics.append(MetricMargin(metric, row.units if row else 0, revenue, cogs,
                                        margin_pct_of(revenue + allocated, cogs), allocated))
        revenue = sum(row.revenue_nanos for row in rows) + pricing.fixed_fee_nanos
        cogs = sum(row.cogs_nanos for row in rows)
        margins.append(CustomerMargin(customer, subscription.key, subscription.plan, start.isoformat(),
                                      end.isoformat(), revenue, cogs, margin_pct_of(revenue + pricing.allocated_nanos, cogs),
                                      metrics, pricing.plan.currency, pricing.allocated_nanos))
    return margins
