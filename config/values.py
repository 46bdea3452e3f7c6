# Value types written as YAML scalars: percentages (`25%`), request rates (`5req/sec`),
# guard scopes (`global`, `{tier: pro}`) and timestamps with a timezone. Each `parse`
# takes the raw YAML value and raises ValueError with a message that shows the form.
from __future__ import annotations

import decimal
import math
import re
from datetime import datetime
from typing import ClassVar, Literal

_PERCENT = re.compile(r"([+-]?\d+(?:\.\d+)?)\s*%")
_RATE = re.compile(r"(\d+)\s*req\s*/\s*(s|sec|second|m|min|minute|h|hour)")
_PERIOD_S = {
    "s": 1, "sec": 1, "second": 1,
    "m": 60, "min": 60, "minute": 60,
    "h": 3600, "hour": 3600,
}
_UNIT_NAME = {1: "sec", 60: "min", 3600: "hour"}
RATE_FORMS = (
    "`5req/sec`, `300req/min` or `1000req/hour` "
    "(units: s, sec, second, m, min, minute, h, hour)"
)


def show(value: object) -> str:
    """Render a raw YAML value the way the user wrote it, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class Percent(float):
    """A percentage, stored in percent units: `25%` is Percent(25.0).

    Written only as a string with a `%` sign; a bare number is rejected because
    `25` could mean 25% or 0.25 and the difference is a factor of 100 in money.
    """

    MIN: ClassVar[float] = -1000.0
    MAX: ClassVar[float] = 100.0

    @classmethod
    def parse(cls, raw: object) -> Percent:
        """`"25%"`, `"12.5%"`, `"-10%"` -> Percent. ValueError for a bare number,
        another string, or a value outside [MIN, MAX] (bounds inclusive)."""
        match = _PERCENT.fullmatch(raw.strip()) if isinstance(raw, str) else None
        if match is None:
            raise ValueError(f"Expected a percentage like `25%`, got `{show(raw)}`")
        value = float(match.group(1))
        if not cls.MIN <= value <= cls.MAX:
            raise ValueError(
                f"Expected a percentage between {cls.MIN:g}% and {cls.MAX:g}%, "
                f"got `{raw.strip()}`"
            )
        return cls(value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({float(self)!r})"

    def __str__(self) -> str:
        return f"{float(self):g}%"


class ConfigValue:
    """Base of the small immutable values decoded by their `parse` classmethod through
    the schema's dec_hook (msgspec would decode a dataclass or named tuple by itself,
    bypassing the hook): equality, hashing and repr over the fields in __slots__."""

    __slots__ = ()

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in zip(self.__slots__, self._fields()))
        return f"{type(self).__name__}({fields})"


class Band(Percent):
    """A non-negative percentage: the hysteresis width a recovering margin must clear."""

    MIN: ClassVar[float] = 0.0


class Rate(ConfigValue):
    """A request rate: `tokens` requests per `per_s` seconds (`5req/sec` -> 5 per 1 s).

    Immutable and hashable. `default_burst` is the bucket size used when a guard
    gives none: one second's worth of requests, at least 1.
    """

    __slots__ = ("tokens", "per_s")
    tokens: int
    per_s: int

    def __init__(self, tokens: int, per_s: int) -> None:
        if tokens < 1 or per_s < 1:
            raise ValueError(f"Rate needs tokens >= 1 and per_s >= 1, got {tokens}/{per_s}s")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "per_s", per_s)

    @classmethod
    def parse(cls, raw: object) -> Rate:
        """`"5req/sec"`, `"10 req/s"`, `"300req/min"`, `"1000req/hour"` -> Rate.
        ValueError for any other form or a zero count."""
        match = _RATE.fullmatch(raw.strip()) if isinstance(raw, str) else None
        if match is None:
            raise ValueError(f"Expected a rate like {RATE_FORMS}, got `{show(raw)}`")
        tokens = int(match.group(1))
        if tokens < 1:
            raise ValueError(f"Expected a positive request count, got `{raw.strip()}`")
        return cls(tokens, _PERIOD_S[match.group(2)])

    @property
    def default_burst(self) -> int:
        return max(1, math.ceil(self.tokens / self.per_s))

    def __str__(self) -> str:
        unit = _UNIT_NAME.get(self.per_s)
        return f"{self.tokens}req/{unit}" if unit else f"{self.tokens}req/{self.per_s}s"


ScopeKind = Literal["global", "tier", "customer"]
_SCOPE_FORMS = "`global`, `{tier: NAME}` or `{customer: ID}`"


class Scope(ConfigValue):
    """Who a guard applies to: everyone (`global`), one plan tier, or one customer.

    `kind` is "global", "tier" or "customer"; `name` is the tier name or customer id
    (None for global). Immutable and hashable; `Scope.GLOBAL` is the default.
    """

    __slots__ = ("kind", "name")
    kind: ScopeKind
    name: str | None
    GLOBAL: ClassVar[Scope]

    def __init__(self, kind: ScopeKind, name: str | None = None) -> None:
        if (kind == "global") != (name is None):
            raise ValueError(f"Scope {kind!r} takes {'no name' if kind == 'global' else 'a name'}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "name", name)

    @classmethod
    def parse(cls, raw: object) -> Scope:
        """`"global"` or a mapping with exactly one of `tier` / `customer` -> Scope.
        ValueError for other strings, unknown or extra keys, empty names."""
        if raw == "global":
            return cls.GLOBAL
        if not isinstance(raw, dict):
            raise ValueError(f"Expected a scope like {_SCOPE_FORMS}, got `{show(raw)}`")
        unknown = sorted(str(key) for key in raw if key not in ("tier", "customer"))
        if unknown:
            raise ValueError(
                f"Unknown scope key `{unknown[0]}`; expected exactly one of `tier` or `customer`"
            )
        if len(raw) != 1:
            got = ", ".join(f"`{key}`" for key in sorted(raw)) or "an empty mapping"
            raise ValueError(f"Scope takes exactly one of `tier` or `customer`, got {got}")
        ((kind, name),) = raw.items()
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"Scope `{kind}` must be a non-empty string, got `{show(name)}`")
        return cls(kind, name)

    def __str__(self) -> str:
        return "global" if self.name is None else f"{self.kind}: {self.name}"


Scope.GLOBAL = Scope("global")


TIMESTAMP_FORM = "`2026-11-01T00:00:00Z` or `2026-11-01T00:00:00+01:00`"


class Timestamp(ConfigValue):
    """An instant written in RFC 3339 with a timezone (`2026-11-01T00:00:00Z`).

    `at` is the timezone-aware datetime; `epoch_s` the Unix time in seconds. A time
    without a timezone is refused: read on servers in other zones it would name
    other instants, and a billing period must end at the same moment everywhere.
    """

    __slots__ = ("at",)
    at: datetime

    def __init__(self, at: datetime) -> None:
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError(f"Timestamp needs a timezone, got {at.isoformat()}")
        object.__setattr__(self, "at", at)

    @classmethod
    def parse(cls, raw: object) -> Timestamp:
        """`"2026-11-01T00:00:00Z"` -> Timestamp. ValueError for anything that is not
        an ISO 8601 date and time, and for one without `Z` or an offset."""
        try:
            at = datetime.fromisoformat(raw.strip()) if isinstance(raw, str) else None
        except ValueError:
            at = None
        if at is None:
            raise ValueError(f"Expected a timestamp like {TIMESTAMP_FORM}, got `{show(raw)}`")
        if at.tzinfo is None:
            raise ValueError(
                f"Timestamp `{raw.strip()}` has no timezone; add `Z` (UTC) or an offset like `+01:00`"
            )
        return cls(at)

    @property
    def epoch_s(self) -> float:
        """Seconds since the Unix epoch."""
        return self.at.timestamp()

    def __str__(self) -> str:
        return self.at.isoformat().replace("+00:00", "Z")


NANOS_PER_UNIT = 1_000_000_000
# The most units one usage event may carry (a proxy meters no more; ingest refuses more).
MAX_EVENT_QUANTITY = 10**15


# An amount as a decimal string (`"49.00"`), as JSON Schema states it: >= 0 and not
# an exponent (more than 9 decimal places is refused by to_nanos, not by the pattern).
AMOUNT_PATTERN = r"^[0-9]+(\.[0-9]+)?$"


def to_nanos(amount: decimal.Decimal) -> int:
    """An amount of money in whole nanos of its currency (exact). ValueError for an
    amount that is negative, not finite, or finer than a nano (10 decimal places)."""
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"Expected an amount >= 0, got `{amount}`")
    nanos = amount * NANOS_PER_UNIT
    if nanos != nanos.to_integral_value():
        raise ValueError(f"Amount `{amount}` has more than 9 decimal places")
    return int(nanos)


class Money(ConfigValue):
    """An amount of money >= 0 in the plan's currency, written as a decimal string
    (`"49.00"`, `"0.000002"`) or a number, exact to 9 decimal places. `nanos` is the
    amount in billionths (the decision core's unit); str() gives the decimal back."""

    __slots__ = ("nanos",)
    nanos: int

    def __init__(self, nanos: int) -> None:
        object.__setattr__(self, "nanos", int(nanos))

    @classmethod
    def parse(cls, raw: object) -> Money:
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise ValueError(f"Expected an amount like `\"49.00\"`, got `{show(raw)}`")
        try:
            amount = decimal.Decimal(raw.strip() if isinstance(raw, str) else str(raw))
        except decimal.InvalidOperation:
            raise ValueError(f"Expected an amount like `\"49.00\"`, got `{show(raw)}`") from None
        return cls(to_nanos(amount))

    def __str__(self) -> str:
        whole, fraction = divmod(self.nanos, NANOS_PER_UNIT)
        return f"{whole}.{fraction:09d}".rstrip("0").rstrip(".") if fraction else str(whole)
