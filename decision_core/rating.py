# Rating: what a period's usage of one metric is worth under a plan's pricing model.
# Money is integer nanos of the plan's currency (1 unit = 1_000_000_000 nanos) and
# usage is whole units, so rating is exact. `revenue(total)` is the charge for the
# period's cumulative usage; an event's revenue is revenue(after) - revenue(before),
# which makes per-event revenue sum exactly to the period's rated total.
# Rounding happens once, on the cumulative total (down to a whole nano), never per event.

from decision_core.errors import PricingError


def _check_units(units):
    if units < 0:
        raise PricingError(f"usage must be >= 0 units, got {units}")


def _check_price(name, nanos):
    if nanos < 0:
        raise PricingError(f"{name} must be >= 0, got {nanos}")


class PerUnit:
    """`price_nanos` for every `per_units` units (e.g. a price per 1,000,000 tokens)."""

    def __init__(self, price_nanos, per_units=1):
        _check_price("price", price_nanos)
        if per_units < 1:
            raise PricingError(f"per_units must be >= 1, got {per_units}")
        self.price_nanos = int(price_nanos)
        self.per_units = int(per_units)

    def revenue(self, units):
        """Charge for `units` this period, rounded down to a nano; 0 for 0 units."""
        _check_units(units)
        return units * self.price_nanos // self.per_units


class Tier:
    """A tier of a graduated or volume price: units up to and including `up_to`
    (None = no upper bound) at `price_nanos` per `per_units`, plus `flat_nanos` once."""

    def __init__(self, up_to, price_nanos, per_units=1, flat_nanos=0):
        _check_price("tier price", price_nanos)
        _check_price("tier flat fee", flat_nanos)
        if per_units < 1:
            raise PricingError(f"per_units must be >= 1, got {per_units}")
        if up_to is not None and up_to < 1:
            raise PricingError(f"tier up_to must be >= 1, got {up_to}")
        self.up_to = up_to
        self.price_nanos = int(price_nanos)
        self.per_units = int(per_units)
        self.flat_nanos = int(flat_nanos)

    def charge(self, units):
        """Price of `units` at this tier's rate (the flat fee when units > 0)."""
        if units <= 0:
            return 0
        return units * self.price_nanos // self.per_units + self.flat_nanos


def _check_tiers(tiers):
    tiers = tuple(tiers)
    if not tiers:
        raise PricingError("tiered pricing needs at least one tier")
    for index, tier in enumerate(tiers):
        last = index == len(tiers) - 1
        if tier.up_to is None and not last:
            raise PricingError(f"only the last tier may be unbounded (tier {index + 1})", index, "up_to")
        if index and tier.up_to is not None and tier.up_to <= tiers[index - 1].up_to:
            raise PricingError(
                f"tier bounds must ascend, tier {index + 1} ends at {tier.up_to} "
                f"after {tiers[index - 1].up_to}", index, "up_to"
            )
        if last and tier.up_to is not None:
            raise PricingError("the last tier must be unbounded (up_to: null)", index, "up_to")
    return tiers


class Graduated:
    """Each tier prices the units that fall inside it (first 1,000 at one price, the
    next 9,000 at another, ...); a tier's flat fee is charged once it is entered."""

    def __init__(self, tiers):
        self.tiers = _check_tiers(tiers)

    def revenue(self, units):
        """Sum of every tier's charge for its slice of `units`; 0 for 0 units."""
        _check_units(units)
        total = 0
        floor = 0
        for tier in self.tiers:
            if units <= floor:
                break
            top = units if tier.up_to is None or units < tier.up_to else tier.up_to
            total += tier.charge(top - floor)
            floor = top
        return total


class Volume:
    """All units are priced at the tier the period's total falls in. Moving into a
    cheaper tier can lower the total, so one event's revenue may be negative."""

    def __init__(self, tiers):
        self.tiers = _check_tiers(tiers)

    def revenue(self, units):
        """`units` at the rate of the tier containing `units`; 0 for 0 units."""
        _check_units(units)
        for tier in self.tiers:
            if tier.up_to is None or units <= tier.up_to:
                return tier.charge(units)
        raise PricingError("unreachable: the last tier is unbounded")


class Package:
    """`price_nanos` for each started package of `package_size` units (rounded up)."""

    def __init__(self, package_size, price_nanos):
        _check_price("package price", price_nanos)
        if package_size < 1:
            raise PricingError(f"package size must be >= 1, got {package_size}")
        self.package_size = int(package_size)
        self.price_nanos = int(price_nanos)

    def revenue(self, units):
        """ceil(units / package_size) packages; 0 for 0 units."""
        _check_units(units)
        return (units + self.package_size - 1) // self.package_size * self.price_nanos


class FlatFee:
    """A fixed charge for the period whatever the usage: revenue(units) is the fee
    for any units, including 0, so each event's revenue is 0."""

    def __init__(self, amount_nanos):
        _check_price("flat fee", amount_nanos)
        self.amount_nanos = int(amount_nanos)

    def revenue(self, units):
        """The fee, for any `units` >= 0."""
        _check_units(units)
        return self.amount_nanos


def event_revenue(model, units_before, units):
    """Revenue of one event of `units` when the period already has `units_before`:
    model.revenue(units_before + units) - model.revenue(units_before). Summed over a
    period's events it equals revenue(total) - revenue(0) exactly, in any order of
    event sizes. Negative units or usage raise PricingError."""
    _check_units(units)
    return model.revenue(units_before + units) - model.revenue(units_before)
