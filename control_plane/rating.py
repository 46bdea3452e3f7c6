# Rating one usage event: what it earns (its marginal revenue under the plan's charge
# for its metric, from the period's running total of units) and what it costs to
# serve (the metric's unit cost). Money is integer nanos throughout, so the revenue
# of a period's events sums exactly to the period's rated total.
from __future__ import annotations

import decimal
from typing import NamedTuple

import msgspec

from config.catalog_file import Metric, Plan
from config.documents import decode_value
from decision_core import event_revenue


class Rated(NamedTuple):
    """An event's money: `revenue_nanos` (0 when its metric has no charge in the
    plan) and `cogs_nanos` (0 when the metric has no unit cost)."""

    revenue_nanos: int
    cogs_nanos: int


class PlanPricing:
    """A stored plan, ready to rate usage: its charges by metric as the decision
    core's pricing models, its fixed fee and the fee's allocation across metrics."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.charges = {charge.metric: charge.pricing() for charge in plan.charges}
        self.fixed_fee_nanos = plan.fixed_fee.nanos

    @classmethod
    def from_document(cls, key: str, document: dict) -> PlanPricing:
        """From the document the store keeps for plan `key` (see document_of)."""
        return cls(msgspec.convert({**document, "key": key}, Plan, dec_hook=decode_value))

    def fixed_fee_share_nanos(self, metric: str) -> int:
        """The part of the period's fixed fee allocated to `metric` (rounded down to a
        nano; with no allocation the whole fee belongs to the customer overall)."""
        share = self.plan.fee_allocation.get(metric)
        if share is None:
            return 0
        return int(self.fixed_fee_nanos * decimal.Decimal(repr(float(share))) / 100)

    def rate(self, metric: Metric | None, units_before: int, quantity: int) -> Rated:
        """Revenue and COGS of `quantity` units of a metric when the period's total so
        far is `units_before`; `metric` is the metric's catalog entry (None: unknown,
        no unit cost)."""
        key = metric.key if metric is not None else None
        model = self.charges.get(key)
        revenue = 0 if model is None else event_revenue(model, units_before, quantity)
        return Rated(revenue, unit_cogs_nanos(metric, quantity))


def unit_cogs_nanos(metric: Metric | None, quantity: int) -> int:
    """What `quantity` units of `metric` cost to serve by its unit cost (rounded down
    to a nano); 0 without a unit cost."""
    if metric is None or metric.unit_cost is None:
        return 0
    return quantity * metric.unit_cost.nanos // metric.cost_per_units


def metric_from_document(key: str, document: dict) -> Metric:
    return msgspec.convert({**document, "key": key}, Metric, dec_hook=decode_value)
