# Guard evaluation: after margins move, each (customer, metric) and each customer
# overall is judged by the guard that applies to it (customer > tier > global scope),
# its new level computed from its margin and current level (with the guard's
# recovery band), and every change recorded once in the actions trail.
from __future__ import annotations

import math

from config.guards import GuardSet
from control_plane.guard_levels import level_thresholds
from control_plane.margins import customer_margins, margins_of
from control_plane.rating import Rater
from control_plane.store import OVERALL, Action, Store
from decision_core import margin_level


async def evaluate_guards(store: Store, guards: GuardSet, now: float, customers=None,
                          rater: Rater | None = None) -> list[Action]:
    """Judge the current billing period's margins of `customers` (default: all) under
    `guards` at `now`; returns the level transitions recorded (each exactly once,
    even when evaluations race)."""
    rater = rater or await Rater.load(store)
    if customers is None:
        levels = await store.guard_levels()
        margins = await customer_margins(store, now, rater=rater)
    else:
        # Two reads for the batch's customers, however many: their levels and totals.
        levels = await store.guard_levels_of(customers)
        margins = await margins_of(store, now, customers, rater)
    levels = {(level.customer_id, level.metric): level.level for level in levels}
    recorded = []
    for margin in margins:
        tier = rater.plans[margin.plan].plan.tier
        judged = [(row.metric, row.margin_pct) for row in margin.metrics] + [(OVERALL, margin.margin_pct)]
        for metric, pct in judged:
            guard = guards.resolve(margin.customer_id, tier, metric)
            if guard is None:
                continue
            current = levels.get((margin.customer_id, metric), 0)
            level = margin_level(-math.inf if pct is None else pct, level_thresholds(guard), current)
            if level == current:
                continue
            action = Action(margin.customer_id, metric, guard.id, current, level, pct,
                            float(guard.min_margin), guard.mode, now)
            if await store.transition_level(action):
                recorded.append(action)
    return recorded
