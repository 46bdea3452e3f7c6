# Rating one usage event: what it earns (its marginal revenue under the plan's charge
# for its metric, from the period's running total of units) and what it costs to
# serve (the metric's unit cost, or its model's or tool's price: see price_tables). Money is integer nanos throughout, so the revenue
# of a period's events sums exactly to the period's rated total.
from __future__ import annotations

import datetime
import decimal
from collections.abc import Callable
from typing import NamedTuple

import msgspec

from config.catalog_file import Metric, Plan
from config.documents import decode_value
from control_plane.periods import period_bounds
from control_plane.price_tables import PriceTables, unit_cogs_nanos
from control_plane.store import COST, OVERALL, USAGE, Rating
from decision_core import event_revenue


class Rated(NamedTuple):
    """An event's money: `revenue_nanos` (0 when its metric has no charge in the
    plan) and `cogs_nanos` (0 when the metric has no unit cost)."""

    revenue_nanos: int
    cogs_nanos: int


class PlanPricing:
    """A stored plan, ready to rate usage: its charges by metric as the decision
    core's pricing models, its fixed fee and allocated value, and their allocation
    across metrics. `earns_nothing`: no fee, no charges and no allocated value (a
    free tier with nothing to hold its margin to)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.charges = {charge.metric: charge.pricing() for charge in plan.charges}
        self.fixed_fee_nanos = plan.fixed_fee.nanos
        self.allocated_nanos = plan.allocated_value.nanos
        self.earns_nothing = not self.charges and not self.fixed_fee_nanos and not self.allocated_nanos

    @classmethod
    def from_document(cls, key: str, document: dict) -> PlanPricing:
        """From the document the store keeps for plan `key` (see document_of)."""
        return cls(msgspec.convert({**document, "key": key}, Plan, dec_hook=decode_value))

    def fixed_fee_share_nanos(self, metric: str) -> int:
        """The part of the period's fixed fee allocated to `metric` (rounded down to a
        nano; with no allocation the whole fee belongs to the customer overall)."""
        return self._share_nanos(self.fixed_fee_nanos, metric)

    def allocated_share_nanos(self, metric: str) -> int:
        """The part of the period's allocated value allocated to `metric`, as the fee is."""
        return self._share_nanos(self.allocated_nanos, metric)

    def _share_nanos(self, nanos: int, metric: str) -> int:
        share = self.plan.fee_allocation.get(metric)
        if share is None:
            return 0
        return int(nanos * decimal.Decimal(repr(float(share))) / 100)

    def rate(self, metric: Metric | None, units_before: int, quantity: int) -> Rated:
        """Revenue and COGS of `quantity` units of a metric when the period's total so
        far is `units_before`; `metric` is the metric's catalog entry (None: unknown,
        no unit cost)."""
        return Rated(*self.pricer(metric, quantity)(units_before))

    def pricer(self, metric: Metric | None, quantity: int,
               cogs_nanos: int | None = None) -> Callable[[int], tuple[int, int]]:
        """rate() for `quantity` units of `metric`, as a function of the period's units
        so far, with all that does not depend on them (the charge, the COGS) looked
        up and worked out once. `cogs_nanos` is the event's COGS when priced from the
        price tables (None: by the metric's unit cost)."""
        model = self.charges.get(metric.key) if metric is not None else None
        cogs = unit_cogs_nanos(metric, quantity) if cogs_nanos is None else cogs_nanos
        if model is None:
            return lambda units_before: (0, cogs)
        return lambda units_before: (event_revenue(model, units_before, quantity), cogs)


def metric_from_document(key: str, document: dict) -> Metric:
    return msgspec.convert({**document, "key": key}, Metric, dec_hook=decode_value)


BILLABLE_STATUSES = frozenset(("active", "trialing", "past_due"))
COSTED_CONTEXTS_MAX = 1000       # pricing contexts kept per billing period (one per model or tool and basis)


class Subscription(NamedTuple):
    key: str
    customer: str
    plan: str
    anchor: datetime.datetime
    status: str


class _Period(NamedTuple):
    # A subscription's billing period as ratings carry it, built once per period.
    start: datetime.datetime
    end: datetime.datetime
    start_s: float
    end_s: float
    context: dict                # the pricing context kept in each event's provenance (shared, not to be changed)
    costed: dict                 # cost basis -> the context with it, made once per period and basis


def _in_force(candidates, at, started=False):
    # Of subscriptions sorted by anchor: the latest anchored at or before `at`, else
    # the earliest (what a proxy enforces before the first anchor), or with `started`
    # None (an event before a subscription starts belongs to no plan).
    if not candidates:
        return None
    if started and at < candidates[0].anchor:
        return None
    if len(candidates) == 1:
        return candidates[0]
    started = [subscription for subscription in candidates if subscription.anchor <= at]
    return started[-1] if started else candidates[0]


class Rater:
    """Prices events from the catalog as the store holds it (read once, at load):
    each event's subscription, plan and billing period, and what it adds to the
    period's running totals (see store.Rating). `catalog_version` is the store's
    catalog version it was read at (None when built by hand)."""

    def __init__(self, subscriptions, plans: dict[str, PlanPricing], metrics: dict[str, Metric],
                 catalog_version: int | None = None, prices: PriceTables | None = None) -> None:
        self.catalog_version = catalog_version
        self.prices = prices or PriceTables()
        self.by_customer: dict[str, list[Subscription]] = {}
        for subscription in subscriptions:
            self.by_customer.setdefault(subscription.customer, []).append(subscription)
        for candidates in self.by_customer.values():
            candidates.sort(key=lambda subscription: subscription.anchor)
        self.plans = plans
        self.metrics = metrics
        # Each customer's billable subscriptions, earliest anchor first: what
        # subscription_of chooses from, worked out once rather than per event.
        self._billable = {customer: billable for customer, candidates in self.by_customer.items()
                          if (billable := [subscription for subscription in candidates
                                           if subscription.status in BILLABLE_STATUSES
                                           and subscription.plan in plans])}
        # ... and every one on a known plan, whatever its status (what a proxy enforces).
        self._on_known_plans = {customer: known for customer, candidates in self.by_customer.items()
                                if (known := [subscription for subscription in candidates
                                              if subscription.plan in plans])}
        self._periods: dict[str, _Period] = {}      # the last one found per subscription

    @classmethod
    async def load(cls, store) -> Rater:
        # The version first: a change landing while the catalog is read makes the
        # version read here stale, never the catalog.
        version = await store.catalog_version()
        plans = {key: PlanPricing.from_document(key, document) for key, document in await store.list_catalog("plan")}
        metrics = {key: metric_from_document(key, document)
                   for key, document in await store.list_catalog("metric")}
        subscriptions = [
            Subscription(key, document["customer"], document["plan"],
                         datetime.datetime.fromisoformat(document["period_anchor"]), document["status"])
            for key, document in await store.list_catalog("subscription")]
        prices = PriceTables.from_documents(await store.list_catalog("model_price"),
                                            await store.list_catalog("tool_price"))
        return cls(subscriptions, plans, metrics, version, prices)

    def subscription_of(self, customer_id: str, at: datetime.datetime) -> Subscription | None:
        """The customer's billable subscription at `at`: the latest anchored at or
        before `at`; None when the customer has no billable one, or `at` is before
        the first one starts."""
        return _in_force(self._billable.get(customer_id), at, started=True)

    def unrated_reason(self, kind: str, event) -> str | None:
        """Why the event cannot be rated against the catalog (None when it can): an
        unknown metric, no billable subscription, or an instant before the first one
        starts. Such an event is kept as unrated, and rated once the catalog knows it."""
        if kind == USAGE and event.metric not in self.metrics:
            return f"no metric `{event.metric}` in the catalog"
        billable = self._billable.get(event.customer_id)
        if not billable:
            return (f"no billable subscription for customer `{event.customer_id}` "
                    "(an unknown customer, or none active, trialing or past due)")
        if event.timestamp < billable[0].anchor:
            return f"before customer `{event.customer_id}`'s subscription starts ({billable[0].anchor.isoformat()})"
        if kind == COST and (plan := self._foreign_currency_plan(event)) is not None:
            return (f"a cost in {event.currency}, but customer `{event.customer_id}`'s plan `{plan.key}` bills in "
                    f"{plan.currency} (amounts in two currencies are never added; send it in {plan.currency})")
        return None

    def _foreign_currency_plan(self, event):
        # The plan of a cost event's customer when the event names another currency.
        if event.currency is None:
            return None
        subscription = self.subscription_of(event.customer_id, event.timestamp)
        plan = None if subscription is None else self.plans[subscription.plan].plan
        return plan if plan is not None and plan.currency != event.currency else None

    def subscription_in_force(self, customer_id: str, at: datetime.datetime) -> Subscription | None:
        """The subscription the proxies enforce for the customer at `at`, whatever its
        status (a canceled one still answers `subscription canceled`), chosen as
        subscription_of chooses among subscriptions to a known plan; None without any."""
        return _in_force(self._on_known_plans.get(customer_id), at)

    def period_of(self, subscription: Subscription, at: datetime.datetime):
        """[start, end) of the subscription's billing period holding `at` (the last
        one found per subscription is remembered: a batch mostly falls in one)."""
        period = self._period(subscription, at)
        return period.start, period.end

    def _period(self, subscription, at):
        known = self._periods.get(subscription.key)
        if known is not None and known.start <= at < known.end:
            return known
        start, end = period_bounds(subscription.anchor, self.plans[subscription.plan].plan.period, at)
        period = _Period(start, end, start.timestamp(), end.timestamp(),
                         {"subscription": subscription.key, "plan": subscription.plan,
                          "period_start": start.isoformat(), "period_end": end.isoformat()}, {})
        self._periods[subscription.key] = period
        return period

    def rating(self, kind: str, event, leased_elsewhere: bool = False) -> Rating | None:
        """What a usage or cost event (ingest's decoded event) adds to its period's
        totals, or None when its customer has no billable subscription. Usage on a
        hard quota counts against the quota's lease ledger too (Rating.ledgered)
        unless `leased_elsewhere` (a proxy admitted it against units leased to it)."""
        at = event.timestamp
        subscription = self.subscription_of(event.customer_id, at)
        if subscription is None:
            return None
        period = self._period(subscription, at)
        if kind == USAGE:
            metric = self.metrics.get(event.metric)
            cost = self.prices.cost(metric, event.quantity, event.dimensions)
            pricer = self.plans[subscription.plan].pricer(metric, event.quantity, cost.cogs_nanos)
            context = period.context
            if cost.basis is not None:
                # A batch prices a few models and tools: each period shares one context per basis.
                # (Names come from events: past COSTED_CONTEXTS_MAX, a context is made per event.)
                context = period.costed.get(cost.basis)
                if context is None:
                    context = {**period.context, **dict(cost.basis)}
                    if len(period.costed) < COSTED_CONTEXTS_MAX:
                        period.costed[cost.basis] = context
            quota = None if leased_elsewhere else self.plans[subscription.plan].plan.quotas.get(event.metric)
            return Rating(event.customer_id, event.metric, period.start_s, period.end_s, subscription.key,
                          event.quantity, pricer, context, quota is not None and quota.hard)
        if self._foreign_currency_plan(event) is not None:
            return None                 # kept unrated (unrated_reason says why)
        amount = event.amount_nanos
        return Rating(event.customer_id, event.metric or OVERALL, period.start_s, period.end_s,
                      subscription.key, 0, lambda units_before: (0, amount), period.context)


class CurrentRater:
    """The Rater for the catalog as the store holds it now, for every batch: kept
    while the store's catalog version stays where it was read, loaded again as soon
    as it moves (a catalog change in any process moves it, in the change's own
    transaction), so a batch is never priced by a plan that has since changed."""

    def __init__(self, store) -> None:
        self._store = store
        self._rater: Rater | None = None

    async def get(self) -> Rater:
        """The Rater for the catalog as of now (one version read when it is current)."""
        rater = self._rater
        if rater is None or rater.catalog_version != await self._store.catalog_version():
            rater = await Rater.load(self._store)
            # Of two loads racing, the later catalog stays.
            if self._rater is None or rater.catalog_version >= self._rater.catalog_version:
                self._rater = rater
        return rater
