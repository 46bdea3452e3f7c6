# Guard evaluation: after margins move, each (customer, metric) and each customer
# overall is judged by the enforcing guard that applies to it (customer > tier >
# global scope) and, beside it, by the shadow guard that applies, each with a level
# of its own; its new level computed from its margin and current level (with the guard's
# recovery band), and every change recorded once in the actions trail, with its
# webhooks put in the outbox in the same transaction. A level reached in an earlier
# billing period is first recorded as back to 0: each period starts clean.
from __future__ import annotations

import datetime
import itertools

from config.guards import GuardSet
from config.schema import MODES
from control_plane.guard_levels import level_thresholds
from control_plane.margins import customer_margins, margins_of
from control_plane.rating import Rater
from control_plane.store import OVERALL, Action, Store
from control_plane.webhooks import level_change_webhooks
from decision_core import margin_level
from decision_core.margin import MARGIN_NO_LOSS, MARGIN_UNBOUNDED_LOSS


def _judged_pct(pct, pricing) -> float:
    # The margin a guard judges: None (cost with no revenue) is an unbounded loss, but
    # a plan that earns nothing and sets no allocated value (a free tier) has no margin
    # to hold a customer to: judged as losing nothing (level 0), never blocked for it.
    if pct is not None:
        return pct
    return MARGIN_NO_LOSS if pricing.earns_nothing else MARGIN_UNBOUNDED_LOSS


async def evaluate_guards(store: Store, guards: GuardSet, now: float, customers=None,
                          rater: Rater | None = None) -> list[Action]:
    """Judge the current billing period's margins of `customers` (default: all) under
    `guards` at `now`; returns the level transitions recorded (each exactly once,
    even when evaluations race).

    Every transition, escalation or recovery, in enforce or shadow mode, enqueues a
    `margin.level_changed` webhook for each channel its guard's levels notify (see
    webhooks.notified_channels): level 1 is the warning, but the people warned also
    need to hear that a customer was throttled, blocked or has recovered, and the
    payload's level_from, level_to and mode let a receiver filter. The
    webhooks are written with the transition, so a transition recorded once is
    announced once. Wake the WebhookSender afterwards."""
    rater = rater or await Rater.load(store)
    if customers is None:
        levels = await store.guard_levels()
        margins = await customer_margins(store, now, rater=rater)
    else:
        # Two reads for the batch's customers, however many: their levels and totals.
        levels = await store.guard_levels_of(customers)
        margins = await margins_of(store, now, customers, rater)
    levels = {(level.customer_id, level.metric, level.mode): level for level in levels}
    recorded = []
    for margin in margins:
        pricing = rater.plans[margin.plan]
        tier = pricing.plan.tier
        period_start = datetime.datetime.fromisoformat(margin.period_start).timestamp()
        judged = [(row.metric, row.margin_pct) for row in margin.metrics] + [(OVERALL, margin.margin_pct)]
        for (metric, pct), mode in itertools.product(judged, MODES):
            guard = guards.resolve(margin.customer_id, tier, metric, mode)
            if guard is None:
                continue
            stored = levels.get((margin.customer_id, metric, mode))
            current = stored.level if stored is not None else 0
            if current and stored.changed_at < period_start:
                # A level belongs to the period it was reached in: a new period starts
                # at 0 (as the proxies already enforce it), said in the trail.
                reset = Action(margin.customer_id, metric, guard.id, current, 0, pct,
                               float(guard.min_margin), guard.mode, now)
                if await store.transition_level(reset, level_change_webhooks(reset, guard)):
                    recorded.append(reset)
                current = 0
            level = margin_level(_judged_pct(pct, pricing), level_thresholds(guard), current)
            if level == current:
                continue
            action = Action(margin.customer_id, metric, guard.id, current, level, pct,
                            float(guard.min_margin), guard.mode, now)
            if await store.transition_level(action, level_change_webhooks(action, guard)):
                recorded.append(action)
    return recorded
