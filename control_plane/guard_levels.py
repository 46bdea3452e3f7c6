# From a guard in the configuration to the decision core's values: the level
# thresholds a margin is judged against, and the standing a proxy enforces at a level.
# The guard's mode decides whether the standing acts (enforce) or only reports (shadow).
from __future__ import annotations

from config import Guard
from decision_core import GuardStanding, LevelThresholds, TokenBucket


def level_thresholds(guard: Guard) -> LevelThresholds:
    """The guard's level 1..3 thresholds (None for a level it leaves out) and its
    recovery band, in percent, as margin_level() takes them."""
    actions = guard.actions
    return LevelThresholds(
        None if actions.level_1 is None else float(actions.level_1.threshold),
        None if actions.level_2 is None else float(actions.level_2.threshold),
        None if actions.level_3 is None else float(actions.level_3.threshold),
        band=float(guard.recovery_band),
    )


def guard_standing(guard: Guard, level: int, now: float) -> GuardStanding:
    """A customer's standing under `guard` at margin `level` (0..3), built at `now`.

    Level 2 gets a full token bucket at the guard's throttle rate and burst, and its
    model downgrades; level 3 with `lock_features` suspends just those features. A level the guard does not
    define acts as no level (a standing at 0): only configured actions are enforced.
    """
    actions = guard.actions
    enforce = guard.mode == "enforce"
    if level == 3 and actions.level_3 is not None:
        locked = actions.level_3.features if actions.level_3.action == "lock_features" else ()
        return GuardStanding(guard.id, 3, enforce, None, frozenset(locked))
    if level == 2 and actions.level_2 is not None:
        rate = actions.level_2.throttle_rate
        bucket = TokenBucket(rate.tokens, rate.per_s, actions.level_2.effective_burst, now)
        return GuardStanding(guard.id, 2, enforce, bucket, frozenset(), actions.level_2.downgrade_models)
    if level == 1 and actions.level_1 is not None:
        return GuardStanding(guard.id, 1, enforce)
    return GuardStanding(guard.id, 0, enforce)
