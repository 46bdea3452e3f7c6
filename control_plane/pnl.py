# Profit and loss for the current billing period: every customer's margin (worst
# first), with totals per currency, since amounts in different currencies are never
# added. One grand total is given only in a single currency: the plans' own when they
# all share one, or the reporting currency when the operator set rates for every other
# currency present (control plane settings `reporting`), the rates used stated beside it.
from __future__ import annotations

from collections.abc import Sequence

import msgspec

from config.control_plane_settings import Reporting
from config.values import NANOS_PER_UNIT
from control_plane.margins import CustomerMargin, margin_pct_of


class CurrencyTotals(msgspec.Struct):
    currency: str
    customers: int
    revenue_nanos: int           # earned: what the customers are invoiced
    allocated_nanos: int         # the plans' allocated value, never invoiced
    cogs_nanos: int
    margin_pct: float | None     # against revenue plus allocated value


class ProfitAndLoss(msgspec.Struct):
    customers: list[CustomerMargin]
    by_currency: list[CurrencyTotals]
    # The grand total, in `currency`; all None when there is none (several currencies
    # and no rate for `missing_rates`).
    currency: str | None
    revenue_nanos: int | None
    allocated_nanos: int | None
    cogs_nanos: int | None
    margin_pct: float | None
    exchange_rates: dict[str, str]   # currency -> units of `currency` per unit, as used
    missing_rates: list[str]


def profit_and_loss(margins: Sequence[CustomerMargin], reporting: Reporting | None = None) -> ProfitAndLoss:
    """The P&L of `margins` (customer_margins' list, kept in its order). Amounts are
    converted (rounded half to even, to a nano) only at `reporting`'s rates, and only
    when the customers' currencies differ or differ from its currency."""
    totals: dict[str, list[int]] = {}
    for margin in margins:
        row = totals.setdefault(margin.currency, [0, 0, 0, 0])
        row[0] += 1
        row[1] += margin.revenue_nanos
        row[2] += margin.allocated_nanos
        row[3] += margin.cogs_nanos
    by_currency = [CurrencyTotals(currency, count, revenue, allocated, cogs, margin_pct_of(revenue + allocated, cogs))
                   for currency, (count, revenue, allocated, cogs) in sorted(totals.items())]
    currencies = set(totals)
    if reporting is None:
        target, rates = (next(iter(currencies)) if len(currencies) == 1 else None), {}
    else:
        target = reporting.currency
        rates = {code: reporting.exchange_rates[code].nanos for code in sorted(currencies - {target})
                 if code in reporting.exchange_rates}
    missing = sorted(currencies - {target} - set(rates)) if target is not None else sorted(currencies)
    if target is None or missing:
        return ProfitAndLoss(list(margins), by_currency, None, None, None, None, None, {}, missing)
    grand = [0, 0, 0]
    for row in by_currency:
        rate = rates.get(row.currency, NANOS_PER_UNIT)
        for index, amount in enumerate((row.revenue_nanos, row.allocated_nanos, row.cogs_nanos)):
            grand[index] += _converted(amount, rate)
    revenue, allocated, cogs = grand
    shown = {code: str(reporting.exchange_rates[code]) for code in rates} if reporting is not None else {}
    return ProfitAndLoss(list(margins), by_currency, target, revenue, allocated, cogs,
                         margin_pct_of(revenue + allocated, cogs), shown, [])


def _converted(nanos: int, rate_nanos: int) -> int:
    # nanos * rate, rate in billionths, rounded half to even (exact integers).
    whole, rest = divmod(nanos * rate_nanos, NANOS_PER_UNIT)
    if rest * 2 > NANOS_PER_UNIT or rest * 2 == NANOS_PER_UNIT and whole % 2:
        whole += 1
    return whole
