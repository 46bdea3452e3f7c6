# Errors raised by the decision core. Plain Python (never compiled) so that callers
# can catch them the same way whichever build of the core is loaded.


class DecisionCoreError(Exception):
    """Base of every error the decision core raises."""


class InvalidStateError(DecisionCoreError, ValueError):
    """Edge state that cannot be decided on (unknown subscription status, bad level, ...)."""


class ThresholdOrderError(DecisionCoreError, ValueError):
    """Guard level thresholds that do not strictly descend from level 1 to level 3."""


class IllegalTransitionError(DecisionCoreError, ValueError):
    """A margin-level change that the transition table does not allow."""


class PricingError(DecisionCoreError, ValueError):
    """A pricing model that cannot rate (bad tiers, negative units or prices).
    `tier` is the index (from 0) of the tier at fault and `field` the tier's field
    (`up_to`) when one tier is to blame, else both are None."""

    def __init__(self, message, tier=None, field=None):
        super().__init__(message)
        self.tier = tier
        self.field = field


class RateError(DecisionCoreError, ValueError):
    """A throttle rate or burst the token bucket cannot represent."""
