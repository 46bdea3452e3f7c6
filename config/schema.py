# The guard file schema, and the base and names every configuration file shares. Every
# struct forbids unknown fields (a typo is an error, not a silently ignored key) and is
# frozen; cross-field rules live in __post_init__ and raise ValueError (msgspec adds the path).
from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from config.values import Band, Percent, Rate, Scope

WILDCARD_METRIC = "*"
OVERALL_METRIC = "overall"

GUARD_ID_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"
# A metric name, `*` (any metric without a more specific guard) or `overall`.
# A partial wildcard such as `ai_*` is rejected rather than silently never matching.
METRIC_PATTERN = r"^(\*|[A-Za-z0-9][A-Za-z0-9_.:-]*)$"
# A metric usage is counted in (routes, quotas, usage): a name, never `*`.
METERED_METRIC_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
# A model or tool name as upstreams spell them (`gpt-4o-mini`, `claude-sonnet-4@20250514`,
# `meta-llama/Llama-3.3-70B`); in a REST path a `/` is written `%2F`.
PRICED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]*$"
# What each pattern means, for error messages (msgspec would show the regex).
PATTERN_MEANINGS = {
    GUARD_ID_PATTERN: "a guard id (lowercase letters, digits, `_`, `.`, `-`)",
    METRIC_PATTERN: "a metric name (letters, digits, `_`, `.`, `:`, `-`), `*` or `overall`",
    METERED_METRIC_PATTERN: "a metric name (letters, digits, `_`, `.`, `:`, `-`)",
    PRICED_NAME_PATTERN: "a model or tool name (letters, digits, `_`, `.`, `:`, `@`, `/`, `-`)",
}
GuardId = Annotated[str, msgspec.Meta(pattern=GUARD_ID_PATTERN)]
MetricName = Annotated[str, msgspec.Meta(pattern=METRIC_PATTERN)]
MeteredMetric = Annotated[str, msgspec.Meta(pattern=METERED_METRIC_PATTERN)]
Name = Annotated[str, msgspec.Meta(min_length=1)]
PricedName = Annotated[str, msgspec.Meta(pattern=PRICED_NAME_PATTERN)]
Mode = Literal["enforce", "shadow"]
MODES: tuple[str, ...] = ("enforce", "shadow")
Level3Action = Literal["block_request", "lock_features"]


class Schema(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every configuration struct."""


class Level1(Schema):
    """Warn: notify the channels; the request proceeds untouched."""

    threshold: Percent
    notify: tuple[Name, ...] = ()


class Level2(Schema):
    """Throttle: mark responses and rate-limit the customer to `throttle_rate`.
    `downgrade_models`: requested model -> a cheaper model the proxy asks for
    instead on LLM routes (the response says so in `X-Aforo-Downgrade`)."""

    threshold: Percent
    throttle_rate: Rate
    burst: Annotated[int, msgspec.Meta(ge=1)] | None = None
    downgrade_models: dict[PricedName, PricedName] = msgspec.field(default_factory=dict)
    notify: tuple[Name, ...] = ()

    def __post_init__(self) -> None:
        for requested, served in self.downgrade_models.items():
            if requested == served:
                raise ValueError(f"`downgrade_models` maps `{requested}` to itself")

    @property
    def effective_burst(self) -> int:
        """The token bucket size: `burst` when given, else the rate's default burst."""
        return self.burst if self.burst is not None else self.throttle_rate.default_burst


class Level3(Schema):
    """Block every request, or with `lock_features` only the named features."""

    threshold: Percent
    action: Level3Action = "block_request"
    features: tuple[Name, ...] = ()
    notify: tuple[Name, ...] = ()

    def __post_init__(self) -> None:
        if self.action == "lock_features" and not self.features:
            raise ValueError("`action: lock_features` needs a non-empty `features` list")
        if self.action == "block_request" and self.features:
            raise ValueError(
                "`features` only applies to `action: lock_features`; "
                "`block_request` blocks every request"
            )


class Actions(Schema):
    """The warn -> throttle -> block ladder; at least one level, thresholds descending."""

    level_1: Level1 | None = None
    level_2: Level2 | None = None
    level_3: Level3 | None = None

    def __post_init__(self) -> None:
        present = self.levels
        if not present:
            raise ValueError("At least one of `level_1`, `level_2`, `level_3` is required")
        for (upper_n, upper), (lower_n, lower) in zip(present, present[1:]):
            if not lower.threshold < upper.threshold:
                raise ValueError(
                    "Thresholds must descend from level 1 to level 3: "
                    f"`level_{lower_n}` threshold {lower.threshold} is not below "
                    f"`level_{upper_n}` threshold {upper.threshold}"
                )

    @property
    def levels(self) -> tuple[tuple[int, Level1 | Level2 | Level3], ...]:
        """The levels present as (number, level), from level 1 to level 3."""
        candidates = ((1, self.level_1), (2, self.level_2), (3, self.level_3))
        return tuple((number, level) for number, level in candidates if level is not None)


class Guard(Schema):
    """A margin guard: when `metric`'s margin for a customer in `scope` falls below a
    level's threshold, that level's action applies (in `shadow` mode it is only
    reported). Recovering from level k needs margin >= threshold_k + recovery_band.
    `min_margin` is the margin the guard protects, reported with each transition.
    """

    # Required fields first: msgspec applies `kw_only` only to the class that sets it.
    id: GuardId
    metric: MetricName
    min_margin: Percent
    actions: Actions
    scope: Scope = Scope.GLOBAL
    mode: Mode = "enforce"
    recovery_band: Band = Band(2.0)


class GuardFile(Schema):
    """The top level of a guard file: `guards:`, a list (possibly empty)."""

    guards: tuple[Guard, ...]
