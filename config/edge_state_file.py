# The edge state file: the billing period, the plans, and per customer the plan,
# subscription status, hashed API keys, usage so far and margin standings. Every
# customer names a defined plan; ids and key digests are unique across the file.
#
#   period     {start, end}: RFC 3339 timestamps with a timezone, end after start;
#              or `monthly`: the calendar month (UTC) the clock is in, rolling over
#              on the first of each month (then no customer has its own period_end)
#   plans      name -> {tier, features, quotas: metric -> {limit, hard}}
#   customers  list of {id, plan, status, api_keys (sha256 hex), usage, levels,
#              period_end (optional: this customer's period ends elsewhere)}
#   levels     metric or `overall` -> {guard, level 0..3, mode, throttle_rate, burst
#              and downgrade_models (level 2), locked_features (level 3 lock variant)},
#              or a list of two such standings: the enforcing guard's and a shadow one's
from __future__ import annotations

import datetime
from os import PathLike
from typing import Annotated, Literal

import msgspec

from config.documents import Problem, duplicate_names, parse_document, read_document
from config.schema import (
    PATTERN_MEANINGS,
    GuardId,
    MeteredMetric,
    Mode,
    Name,
    PricedName,
    Schema,
)
from config.values import Rate, Timestamp

EDGE_STATE_EXPECTED = "a mapping with `period`, `plans` and `customers`"
# The decision core counts usage in a fixed number of slots per customer
# (decision_core.MAX_QUOTA_METRICS); a test keeps the two equal.
MAX_PLAN_QUOTAS = 8
KEY_DIGEST_PATTERN = r"^[0-9a-f]{64}$"
CUSTOMER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
EDGE_STATE_PATTERN_MEANINGS = {
    **PATTERN_MEANINGS,
    KEY_DIGEST_PATTERN: "the sha256 of an API key as 64 lowercase hex characters",
    CUSTOMER_ID_PATTERN: "a customer id (letters, digits, `_`, `.`, `:`, `-`)",
}
KeyDigest = Annotated[str, msgspec.Meta(pattern=KEY_DIGEST_PATTERN)]
CustomerId = Annotated[str, msgspec.Meta(pattern=CUSTOMER_ID_PATTERN)]
Units = Annotated[int, msgspec.Meta(ge=0)]
MarginLevel = Annotated[int, msgspec.Meta(ge=0, le=3)]
SubscriptionStatus = Literal["active", "trialing", "past_due", "canceled", "paused", "expired"]
RollingPeriod = Literal["monthly"]


class Period(Schema):
    """The current billing period, [start, end). Quotas and margin standings belong
    to it; the proxy ignores them once `end` has passed."""

    start: Timestamp
    end: Timestamp

    def __post_init__(self) -> None:
        if not self.end.at > self.start.at:
            raise ValueError(f"Period `end` ({self.end}) must be after `start` ({self.start})")


def calendar_month(at: datetime.datetime) -> tuple[datetime.datetime, datetime.datetime]:
    """[first of `at`'s month 00:00, first of the next month 00:00) in `at`'s timezone
    (December's ends on January 1st of the next year; February's has 28 or 29 days)."""
    start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start, (start + datetime.timedelta(days=32)).replace(day=1)


def rolling_period_at(now: float) -> Period:
    """The `monthly` period in force at `now` (epoch seconds): its calendar month in UTC."""
    start, end = calendar_month(datetime.datetime.fromtimestamp(now, datetime.timezone.utc))
    return Period(start=Timestamp(start), end=Timestamp(end))


class Quota(Schema):
    """A plan's limit on one metric per period: `hard` refuses requests beyond it,
    soft (`hard: false`) lets them through and bills the overage."""

    limit: Units
    hard: bool


class Plan(Schema):
    """A rate plan as the proxy needs it: the tier guards are scoped by, the features
    it entitles, and its quotas (at most MAX_PLAN_QUOTAS metrics)."""

    tier: Name
    features: tuple[Name, ...] = ()
    quotas: dict[MeteredMetric, Quota] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.quotas) > MAX_PLAN_QUOTAS:
            raise ValueError(
                f"A plan can set quotas on at most {MAX_PLAN_QUOTAS} metrics, got {len(self.quotas)}"
            )


class Standing(Schema):
    """A customer's standing under one guard, as the control plane computed it.

    Level 0 (fine) and 1 (warned) do not touch requests; level 2 throttles to
    `throttle_rate` with bursts of `burst` (default: one second of the rate, at
    least 1) and asks LLM upstreams for the models `downgrade_models` maps the
    requested ones to; level 3 blocks every request, or with `locked_features` only
    requests needing one of them. `mode: shadow` reports what would happen and never acts.
    """

    guard: GuardId
    level: MarginLevel
    mode: Mode = "enforce"
    throttle_rate: Rate | None = None
    burst: Annotated[int, msgspec.Meta(ge=1)] | None = None
    downgrade_models: dict[PricedName, PricedName] = msgspec.field(default_factory=dict)
    locked_features: tuple[Name, ...] = ()

    def __post_init__(self) -> None:
        if self.level == 2 and self.throttle_rate is None:
            raise ValueError("Level 2 (throttle) needs a `throttle_rate` such as `5req/sec`")
        if self.level != 2 and (self.throttle_rate is not None or self.burst is not None):
            raise ValueError(f"`throttle_rate` and `burst` only apply at level 2, not level {self.level}")
        if self.level != 2 and self.downgrade_models:
            raise ValueError(f"`downgrade_models` only apply at level 2, not level {self.level}")
        if self.level != 3 and self.locked_features:
            raise ValueError(f"`locked_features` only apply at level 3, not level {self.level}")

    @property
    def effective_burst(self) -> int:
        """The throttle bucket size: `burst` when given, else the rate's default burst
        (1 for a standing without a rate)."""
        if self.burst is not None:
            return self.burst
        return self.throttle_rate.default_burst if self.throttle_rate is not None else 1


class Customer(Schema):
    """One customer: its plan, subscription `status` (only `active` and `trialing`
    send traffic), the sha256 digests of its API keys, units used so far this
    period per metric, and margin standings per metric (or `overall`): one, or
    the enforcing guard's and a shadow guard's beside it.
    `period_end`: when this customer's billing period ends, if not at the file's
    `period.end` (subscriptions anchored on different days)."""

    id: CustomerId
    plan: Name
    status: SubscriptionStatus
    api_keys: tuple[KeyDigest, ...] = ()
    usage: dict[MeteredMetric, Units] = msgspec.field(default_factory=dict)
    levels: dict[MeteredMetric, Standing | tuple[Standing, ...]] = msgspec.field(default_factory=dict)
    period_end: Timestamp | None = None


class EdgeStateFile(Schema):
    """A validated edge state file. `period` is fixed, or `monthly` (rolling): then
    the usage and standings it lists are those of whichever month is current, and
    state built from it is built again for each new month (see period_at)."""

    period: Period | RollingPeriod
    plans: dict[Name, Plan] = msgspec.field(default_factory=dict)
    customers: tuple[Customer, ...] = ()

    @property
    def rolling(self) -> bool:
        """True for a period that rolls over with the clock (`monthly`)."""
        return not isinstance(self.period, Period)

    def period_at(self, now: float) -> Period:
        """The billing period in force at `now` (epoch seconds): `period` as written,
        or for `monthly` the calendar month (UTC) holding `now`, which ends on the
        first of the next month. A fixed period is returned even when `now` lies
        outside it (its quotas and standings then no longer apply)."""
        return rolling_period_at(now) if self.rolling else self.period


def parse_edge_state_file(text: str, file: str = "<string>") -> EdgeStateFile:
    """Validate edge state YAML `text`; `file` names it in errors.

    Raises ConfigError (ConfigErrors for several cross-field problems) naming file,
    line and path for YAML and schema errors (a naive timestamp, an end not after
    the start, level 2 without a rate, ...), a customer naming an unknown plan, a
    duplicate customer id, and a key digest listed twice. An empty `customers` list
    is valid: every API key is then unknown.
    """
    return parse_document(
        text,
        file,
        EdgeStateFile,
        expected=EDGE_STATE_EXPECTED,
        pattern_meanings=EDGE_STATE_PATTERN_MEANINGS,
        cross_check=_customer_problems,
    )


def load_edge_state_file(path: str | PathLike[str]) -> EdgeStateFile:
    """Read and validate the edge state file at `path`. Raises OSError when it cannot
    be read and ConfigError as parse_edge_state_file does (and for non-UTF-8 text)."""
    text, _ = read_document(path)
    return parse_edge_state_file(text, str(path))


def _customer_problems(state: EdgeStateFile) -> list[Problem]:
    """Unknown plans, duplicate customer ids, key digests listed twice (a key that
    identified two customers would bill one for the other's traffic), and two
    standings of one guard mode for a metric."""
    problems: list[Problem] = []
    known = ", ".join(f"`{name}`" for name in state.plans) or "none"
    problems += duplicate_names((customer.id for customer in state.customers), "$.customers", "id", "customer id")
    first_by_digest: dict[str, tuple[str, str]] = {}
    for index, customer in enumerate(state.customers):
        path = f"$.customers[{index}]"
        if state.rolling and customer.period_end is not None:
            problems.append(Problem(
                f"{path}.period_end",
                f"With `period: {state.period}` every customer's period is the calendar month; "
                "a customer's own `period_end` needs a fixed `period: {start, end}`"))
        if customer.plan not in state.plans:
            problems.append(
                Problem(f"{path}.plan", f"Unknown plan `{customer.plan}`; the plans are {known}")
            )
        for metric, standings in customer.levels.items():
            if isinstance(standings, tuple) and (
                    not standings or len({standing.mode for standing in standings}) != len(standings)):
                modes = f" ({', '.join(standing.mode for standing in standings)})" if standings else ""
                problems.append(Problem(
                    f"{path}.levels.{metric}",
                    f"The standings of `{metric}` are one per guard mode: at most one `enforce` and one "
                    f"`shadow`, got {len(standings)}{modes}"))
        for key_index, digest in enumerate(customer.api_keys):
            key_path = f"{path}.api_keys[{key_index}]"
            owner, first_path = first_by_digest.setdefault(digest, (customer.id, key_path))
            if first_path != key_path:
                problems.append(
                    Problem(
                        key_path,
                        f"API key digest `{digest[:12]}...` already belongs to customer "
                        f"`{owner}` (`{first_path}`); a key may belong to one customer only",
                    )
                )
    return problems
