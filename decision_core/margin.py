# Margin and guard levels. margin % = (revenue - COGS) / revenue * 100 for revenue > 0.
# Level k (1 warn, 2 throttle, 3 block) is entered as soon as the margin falls below
# threshold k; leaving it needs the margin back at threshold k + recovery band, so a
# customer hovering at a threshold does not flap. Changes follow TRANSITIONS.

from decision_core.errors import IllegalTransitionError, InvalidStateError, ThresholdOrderError

LEVEL_OK = 0
LEVEL_WARN = 1
LEVEL_THROTTLE = 2
LEVEL_BLOCK = 3

# Result for zero revenue and zero cost (and, generally, revenue <= 0 with no loss):
# nothing is at risk, so no guard fires.
MARGIN_NO_LOSS = 100.0
# Result for revenue <= 0 with a loss (cost with no revenue, refunds above charges):
# below every threshold, so every configured level applies.
MARGIN_UNBOUNDED_LOSS = float("-inf")

_INF = float("inf")
_NEG_INF = float("-inf")

# (level from, level to) -> what the change means. A pair not in the table (staying
# put, or a level outside 0..3) is not a transition and raises.
TRANSITIONS = {}
for _from in range(4):
    for _to in range(4):
        if _from != _to:
            TRANSITIONS[(_from, _to)] = "escalate" if _to > _from else "recover"


def margin_pct(revenue, cogs):
    """Margin in percent of revenue for one period.

    revenue > 0: (revenue - cogs) / revenue * 100 (negative when cost exceeds revenue).
    revenue <= 0: MARGIN_NO_LOSS (100.0) when revenue - cogs >= 0, i.e. zero revenue
    with zero cost; MARGIN_UNBOUNDED_LOSS (-inf) when money is lost, i.e. zero revenue
    with cost or negative revenue. Never divides by zero. NaN inputs raise
    InvalidStateError.
    """
    if revenue != revenue or cogs != cogs:
        raise InvalidStateError("margin needs numeric revenue and cost, got NaN")
    if revenue > 0:
        return (revenue - cogs) / revenue * 100.0
    if revenue - cogs >= 0:
        return MARGIN_NO_LOSS
    return MARGIN_UNBOUNDED_LOSS


class LevelThresholds:
    """A guard's level thresholds in percent, and its recovery band in points.

    Pass None for a level the guard does not use. Present thresholds must strictly
    descend from level 1 to 3 (ThresholdOrderError), the band must be >= 0.
    """

    def __init__(self, level_1, level_2, level_3, band=0.0):
        present = [t for t in (level_1, level_2, level_3) if t is not None]
        if not present:
            raise ThresholdOrderError("a guard needs at least one level threshold")
        for higher, lower in zip(present, present[1:]):
            if not higher > lower:
                raise ThresholdOrderError(
                    f"level thresholds must descend from level 1 to 3, got {higher}% then {lower}%"
                )
        if not band >= 0:
            raise ThresholdOrderError(f"recovery band must be >= 0, got {band}")
        # An unused level can never be entered: nothing is below -inf.
        self.level_1 = _NEG_INF if level_1 is None else float(level_1)
        self.level_2 = _NEG_INF if level_2 is None else float(level_2)
        self.level_3 = _NEG_INF if level_3 is None else float(level_3)
        self.band = float(band)

    def threshold(self, level):
        """Threshold of level 1..3 (-inf for an unused level)."""
        if level == 1:
            return self.level_1
        if level == 2:
            return self.level_2
        if level == 3:
            return self.level_3
        raise InvalidStateError(f"no threshold for level {level}")


def margin_level(margin, thresholds, current):
    """The level for `margin` given the `current` level (0..3) and the guard's thresholds.

    Escalation is immediate (and may skip levels). Recovery steps down only to the
    highest level whose threshold + band the margin has not yet reached, so the result
    never improves when the margin drops. NaN margin or a level outside 0..3 raises
    InvalidStateError.
    """
    if margin != margin:
        raise InvalidStateError("margin level needs a numeric margin, got NaN")
    if current < 0 or current > 3:
        raise InvalidStateError(f"margin level must be 0..3, got {current}")
    raw = LEVEL_OK
    if margin < thresholds.level_1:
        raw = LEVEL_WARN
    if margin < thresholds.level_2:
        raw = LEVEL_THROTTLE
    if margin < thresholds.level_3:
        raw = LEVEL_BLOCK
    if raw >= current:
        return raw
    level = current
    while level > raw:
        if margin < thresholds.threshold(level) + thresholds.band:
            return level
        level -= 1
    return raw


def transition_kind(level_from, level_to):
    """"escalate" or "recover" for a level change; IllegalTransitionError when the
    pair is no transition (same level, or a level outside 0..3)."""
    try:
        return TRANSITIONS[(level_from, level_to)]
    except KeyError:
        raise IllegalTransitionError(f"no margin level transition from {level_from} to {level_to}") from None
