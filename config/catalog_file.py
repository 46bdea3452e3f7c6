# The catalog file `aforo apply -f` reads: metrics, model and tool prices, features,
# plans, customers and subscriptions, each a list of entries with a unique `key`. Within the file: keys are
# unique per section, a plan's prices are valid for the decision core's pricing models,
# and a plan's fixed-fee allocation adds up to 100%. References to other entries
# (a plan's metrics and features, a subscription's customer and plan) are checked at
# apply time, against this file and what the store already holds. An entry sent on
# its own (the REST API's PUT) is held to the same rules: parse_catalog_entry.
#
#   metrics        {key, aggregation: sum|count|max, unit, unit_cost (COGS per unit),
#                   priced_by: input_tokens|output_tokens|cached_input_tokens|
#                              cache_write_tokens|reasoning_tokens|tool_calls
#                              (COGS from the price tables)}
#   model_prices   {key: model, input, output, cached_input, cache_write, reasoning
#                   (per 1M tokens)}
#   tool_prices    {key: tool, per_call}
#   features       {key, description}
#   plans          {key, tier, period, currency, fixed_fee, fee_allocation, features,
#                   quotas: metric -> {limit, hard}, charges: [{metric, model, ...}]}
#   customers      {key, name, email}
#   subscriptions  {key, customer, plan, status, period_anchor}
from __future__ import annotations

from collections.abc import Collection, Mapping
from os import PathLike
from typing import Annotated, Literal, NamedTuple

import msgspec

from config.currencies import CURRENCY_MEANING, CURRENCY_PATTERN, CurrencyCode, currency_problem
from config.documents import Problem, duplicate_names, parse_document, read_document, validate_data
from config.edge_state_file import CUSTOMER_ID_PATTERN, SubscriptionStatus
from config.schema import (
    METERED_METRIC_PATTERN,
    PATTERN_MEANINGS,
    MeteredMetric,
    Name,
    PricedName,
    Schema,
)
from config.values import Money, Percent, Timestamp
from config.yaml_source import child_path_of
from decision_core import Graduated, Package, PerUnit, PricingError, Tier, Volume

CATALOG_EXPECTED = ("a mapping with any of `metrics`, `model_prices`, `tool_prices`, `features`, `plans`, "
                    "`customers`, `subscriptions`")
KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
CATALOG_PATTERN_MEANINGS = {
    **PATTERN_MEANINGS,
    KEY_PATTERN: "a key (letters, digits, `_`, `.`, `:`, `-`)",
    CURRENCY_PATTERN: CURRENCY_MEANING,
    CUSTOMER_ID_PATTERN: "a customer id (letters, digits, `_`, `.`, `:`, `-`)",
    METERED_METRIC_PATTERN: "a metric name (letters, digits, `_`, `.`, `:`, `-`)",
}
Key = Annotated[str, msgspec.Meta(pattern=KEY_PATTERN)]
Count = Annotated[int, msgspec.Meta(ge=0)]
PositiveCount = Annotated[int, msgspec.Meta(ge=1)]


# What a metric can count for pricing, and the price it is priced at: a model price
# (per million tokens, from the event's `model` dimension) or a tool price (per call,
# from its `tool` dimension).
TOKEN_PRICE_OF = {"input_tokens": "input", "output_tokens": "output", "cached_input_tokens": "cached_input",
                  "cache_write_tokens": "cache_write", "reasoning_tokens": "reasoning"}
TOOL_CALLS = "tool_calls"
PricedBy = Literal["input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens", "reasoning_tokens",
                   "tool_calls"]
TOKENS_PER_PRICE = 1_000_000


class Metric(Schema):
    """A billable unit. `aggregation` says how a period's events add up; `unit_cost`
    is what one unit costs to serve (COGS), per `cost_per_units` units. With
    `priced_by`, an event's COGS comes from the model or tool price tables instead
    (the unit cost is the fallback for a model or tool they do not price)."""

    key: MeteredMetric
    aggregation: Literal["sum", "count", "max"] = "sum"
    unit: str = ""
    unit_cost: Money | None = None
    cost_per_units: PositiveCount = 1
    priced_by: PricedBy | None = None

    def __post_init__(self) -> None:
        # A price per token or per call is paid on every event's quantity: a period's
        # cost is the sum of its events', whatever else the metric could aggregate by.
        allowed = ("sum", "count") if self.priced_by == TOOL_CALLS else ("sum",)
        if self.priced_by is not None and self.aggregation not in allowed:
            raise ValueError(f"`priced_by: {self.priced_by}` prices the quantity of every event; it needs "
                             f"`aggregation: {' or '.join(allowed)}`, not `{self.aggregation}`")


class ModelPrice(Schema):
    """What an AI model costs per million tokens of each kind (each optional; a kind
    without a price is priced as a model missing from the table)."""

    key: PricedName
    input: Money | None = None
    output: Money | None = None
    cached_input: Money | None = None
    cache_write: Money | None = None
    reasoning: Money | None = None

    def __post_init__(self) -> None:
        if all(getattr(self, kind) is None for kind in TOKEN_PRICE_OF.values()):
            raise ValueError("A model price needs at least one of `input`, `output`, `cached_input`, `cache_write`, "
                             "`reasoning`")


class ToolPrice(Schema):
    """What one call of an (MCP) tool costs."""

    key: PricedName
    per_call: Money


class Feature(Schema):
    key: Key
    description: str = ""


class PriceTier(Schema):
    """One tier of a graduated or volume charge: units up to and including `up_to`
    (null for the last, unbounded tier) at `price` per `per_units`, plus `flat` once."""

    up_to: PositiveCount | None
    price: Money
    per_units: PositiveCount = 1
    flat: Money = Money(0)


class Charge(Schema):
    """A usage charge on one metric. `per_unit`: `price` per `per_units`; `graduated`
    and `volume`: `tiers`; `package`: `price` per started `package_size` units."""

    metric: MeteredMetric
    model: Literal["per_unit", "graduated", "volume", "package"]
    price: Money | None = None
    per_units: PositiveCount = 1
    tiers: tuple[PriceTier, ...] = ()
    package_size: PositiveCount | None = None

    def __post_init__(self) -> None:
        needs_price = self.model in ("per_unit", "package")
        if needs_price and self.price is None:
            raise ValueError(f"`model: {self.model}` needs a `price`")
        if not needs_price and self.price is not None:
            raise ValueError(f"`model: {self.model}` is priced by its `tiers`, not `price`")
        if (self.model in ("graduated", "volume")) != bool(self.tiers):
            raise ValueError("`tiers` are for `model: graduated` or `volume`, and those need them")
        if (self.model == "package") != (self.package_size is not None):
            raise ValueError("`package_size` is for `model: package`, and that needs it")

    def pricing(self):
        """The decision core's pricing model for this charge (PricingError if invalid)."""
        if self.model == "per_unit":
            return PerUnit(self.price.nanos, self.per_units)
        if self.model == "package":
            return Package(self.package_size, self.price.nanos)
        tiers = [Tier(tier.up_to, tier.price.nanos, tier.per_units, tier.flat.nanos) for tier in self.tiers]
        return Graduated(tiers) if self.model == "graduated" else Volume(tiers)


class Quota(Schema):
    limit: Count
    hard: bool = True


class Plan(Schema):
    """A rate plan: `tier`, billing `period`, `currency` (ISO 4217) of every amount
    in it, `fixed_fee` per period (allocated across metrics by `fee_allocation` for
    per-metric margin; shares add up to 100%), `features`, `quotas` per metric and
    usage `charges`.

    `allocated_value` per period: what serving a customer on the plan is worth to
    the business beyond what it pays (a free tier's acquisition budget, a
    partner's credit), never invoiced. Margins are computed against revenue plus
    this value (allocated across metrics as the fee is), so a plan that earns
    nothing can still be held to a margin floor: with `allocated_value: "1.00"` a
    5% floor blocks once a customer's costs pass 0.95 in the period. A plan that
    earns nothing and sets no allocated value has no margin for guards to judge."""

    key: Key
    tier: Name
    period: Literal["day", "week", "month", "year"] = "month"
    currency: CurrencyCode = "USD"
    fixed_fee: Money = Money(0)
    fee_allocation: dict[MeteredMetric, Percent] = {}
    features: tuple[Key, ...] = ()
    quotas: dict[MeteredMetric, Quota] = {}
    charges: tuple[Charge, ...] = ()
    allocated_value: Money = Money(0)


class Customer(Schema):
    key: Annotated[str, msgspec.Meta(pattern=CUSTOMER_ID_PATTERN)]
    name: str = ""
    email: str = ""


class Subscription(Schema):
    """`customer` on `plan` from `period_anchor` (periods start there and repeat)."""

    key: Key
    customer: Annotated[str, msgspec.Meta(pattern=CUSTOMER_ID_PATTERN)]
    plan: Key
    period_anchor: Timestamp
    status: SubscriptionStatus = "active"


class CatalogFile(Schema):
    metrics: tuple[Metric, ...] = ()
    model_prices: tuple[ModelPrice, ...] = ()
    tool_prices: tuple[ToolPrice, ...] = ()
    features: tuple[Feature, ...] = ()
    plans: tuple[Plan, ...] = ()
    customers: tuple[Customer, ...] = ()
    subscriptions: tuple[Subscription, ...] = ()


# Sections in the order they are written (a plan names metrics and features, a
# subscription names a customer and a plan), with the store's kind for each.
SECTIONS = (("metrics", "metric"), ("model_prices", "model_price"), ("tool_prices", "tool_price"),
            ("features", "feature"), ("plans", "plan"), ("customers", "customer"),
            ("subscriptions", "subscription"))
ENTRY_TYPES = {"metric": Metric, "model_price": ModelPrice, "tool_price": ToolPrice, "feature": Feature,
               "plan": Plan, "customer": Customer, "subscription": Subscription}


def _cross_check(catalog: CatalogFile) -> list[Problem]:
    problems = []
    for section, kind in SECTIONS:
        problems += duplicate_names((entry.key for entry in getattr(catalog, section)), f"$.{section}", "key",
                                    kind.replace("_", " "))
        for index, entry in enumerate(getattr(catalog, section)):
            problems += entry_problems(kind, entry, f"$.{section}[{index}]")
    return problems


def entry_problems(kind: str, entry: Schema, path: str) -> list[Problem]:
    """What is wrong with one catalog entry of `kind` beyond what its schema checks
    (a plan's fee allocation, its charges' metrics and prices), each at a path under
    `path`, where the entry is (`$.plans[2]` in a file, `$` for a REST body). The
    one place these rules live: a file's entries and a body are both checked here."""
    check = _ENTRY_CHECKS.get(kind)
    return check(entry, path) if check is not None else []


def _plan_problems(plan: Plan, path: str) -> list[Problem]:
    problems = []
    if (unknown := currency_problem(plan.currency)) is not None:
        problems.append(Problem(f"{path}.currency", unknown))
    if plan.fee_allocation and abs(sum(plan.fee_allocation.values()) - 100.0) > 1e-9:
        problems.append(Problem(f"{path}.fee_allocation",
                                f"Fee allocation shares add up to {sum(plan.fee_allocation.values()):g}%, "
                                "not 100%"))
    problems += duplicate_names((charge.metric for charge in plan.charges), f"{path}.charges", "metric",
                                "charge for metric")
    for number, charge in enumerate(plan.charges):
        try:
            charge.pricing()
        except PricingError as error:
            at = f"{path}.charges[{number}]"
            if error.tier is not None:
                at += f".tiers[{error.tier}]" + (f".{error.field}" if error.field else "")
            problems.append(Problem(at, f"Invalid price: {error}"))
    return problems


_ENTRY_CHECKS = {"plan": _plan_problems}


class Reference(NamedTuple):
    """An entry named by another: its `kind` and `key`, and where the naming entry
    names it (`path`, under the naming entry's own path)."""

    kind: str
    key: str
    path: str


def references_of(kind: str, document: dict, path: str = "$") -> list[Reference]:
    """The entries a catalog entry of `kind` names, from its document (as the store
    keeps it, see document_of), with paths under `path` (where the entry is): a plan
    its features and the metrics of its quotas, fee allocation and charges; a
    subscription its customer and plan. The one place what refers to what is written:
    a catalog file's check, apply and the REST API check these exist, and a delete checks nothing live names
    what it would remove."""
    references = []
    if kind == "plan":
        references += [Reference("feature", feature, f"{path}.features") for feature in document.get("features", ())]
        for field in ("quotas", "fee_allocation"):
            references += [Reference("metric", metric, child_path_of(f"{path}.{field}", metric))
                           for metric in document.get(field, {})]
        references += [Reference("metric", charge["metric"], f"{path}.charges[{number}].metric")
                       for number, charge in enumerate(document.get("charges", ()))]
    elif kind == "subscription":
        references += [Reference("customer", document["customer"], f"{path}.customer"),
                       Reference("plan", document["plan"], f"{path}.plan")]
    return references


def unknown_reference(reference: Reference) -> str:
    """What is wrong with a reference to an entry that does not exist."""
    return f"Unknown {reference.kind} `{reference.key}`; define it under `{reference.kind}s`"


def unknown_references(catalog: CatalogFile, others: Mapping[str, Collection[str]]) -> list[Problem]:
    """A Problem for every entry of `catalog` naming a metric, feature, customer or
    plan that is neither in `catalog` nor among `others` (kind -> keys held
    elsewhere: what the store holds, or nothing for a catalog that must be whole)."""
    known = {kind: {entry.key for entry in getattr(catalog, section)} for section, kind in SECTIONS}
    return [Problem(reference.path, unknown_reference(reference))
            for section, kind in SECTIONS
            for index, entry in enumerate(getattr(catalog, section))
            for reference in references_of(kind, document_of(entry), f"$.{section}[{index}]")
            if reference.key not in known[reference.kind] and reference.key not in others.get(reference.kind, ())]


def parse_catalog_file(text: str, file: str, others: Mapping[str, Collection[str]] | None = None) -> CatalogFile:
    """Validate a catalog file's text; ConfigError(s) with file, line and path. With
    `others` (see unknown_references) every entry the file names must be in it or
    among them; None leaves references to the caller (apply_catalog checks them)."""
    def cross_check(catalog: CatalogFile) -> list[Problem]:
        return _cross_check(catalog) + ([] if others is None else unknown_references(catalog, others))
    return parse_document(text, file, CatalogFile, expected=CATALOG_EXPECTED,
                          pattern_meanings=CATALOG_PATTERN_MEANINGS, cross_check=cross_check)


def parse_catalog_entry(kind: str, data: object, source: str = "body") -> Schema:
    """One catalog entry of `kind` given on its own, already decoded (a REST request's
    JSON body, its key included), validated exactly as an entry of a catalog file is:
    its schema, then entry_problems. ConfigError(s) naming `source`, with paths from
    the entry's top (`$.charges[0].tiers[1].up_to`); references to other entries are
    the caller's to check (control_plane.catalog)."""
    return validate_data(data, source, ENTRY_TYPES[kind], pattern_meanings=CATALOG_PATTERN_MEANINGS,
                         cross_check=lambda entry: entry_problems(kind, entry, "$"))


def load_catalog_file(path: str | PathLike[str], others: Mapping[str, Collection[str]] | None = None) -> CatalogFile:
    """Read and validate the catalog file at `path` (OSError when it cannot be read),
    its references checked against `others` as parse_catalog_file does."""
    text, _ = read_document(path)
    return parse_catalog_file(text, str(path), others)


def document_of(entry: Schema) -> dict:
    """A catalog entry as the JSON document the store keeps (money and percentages as
    decimal strings, timestamps in RFC 3339), without its key."""
    document = msgspec.to_builtins(entry, enc_hook=str)
    document.pop("key")
    return document
