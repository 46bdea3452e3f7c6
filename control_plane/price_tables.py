# What a usage event costs to serve (COGS), from the catalog as it stands at ingest:
# a metric `priced_by` tokens is priced per million tokens of the model named by the
# event's `model` dimension, one priced by tool calls per call of its `tool`; any
# other metric by its unit cost. A model or tool the tables do not price (or a kind
# of token its model has no price for) never rejects the event: it costs the metric's
# unit cost (0 without one) and its provenance says `price_missing`.
from __future__ import annotations

from typing import NamedTuple

import msgspec

from config.catalog_file import TOKEN_PRICE_OF, TOKENS_PER_PRICE, TOOL_CALLS, Metric, ModelPrice, ToolPrice
from config.documents import decode_value

MODEL_DIMENSION = "model"
TOOL_DIMENSION = "tool"


class EventCost(NamedTuple):
    """An event's COGS in nanos, and how it was priced for its provenance: None for a
    metric priced by its unit cost alone, else (name, value) pairs (`priced_by`, the
    `model` or `tool`, and the `price` used or `price_missing` with the `fallback`)."""

    cogs_nanos: int
    basis: tuple[tuple[str, object], ...] | None


def unit_cogs_nanos(metric: Metric | None, quantity: int) -> int:
    """What `quantity` units of `metric` cost to serve by its unit cost (rounded down
    to a nano); 0 without a unit cost."""
    if metric is None or metric.unit_cost is None:
        return 0
    return quantity * metric.unit_cost.nanos // metric.cost_per_units


class PriceTables:
    """The catalog's model prices (per million tokens, by kind) and tool prices (per
    call), as nanos, ready to price events."""

    def __init__(self, model_prices: dict[str, ModelPrice] | None = None,
                 tool_prices: dict[str, ToolPrice] | None = None) -> None:
        # (model, price kind) -> nanos per TOKENS_PER_PRICE tokens; kinds without a price left out.
        self.token_prices = {(model, kind): getattr(price, kind).nanos
                             for model, price in (model_prices or {}).items()
                             for kind in TOKEN_PRICE_OF.values() if getattr(price, kind) is not None}
        self.call_prices = {tool: price.per_call.nanos for tool, price in (tool_prices or {}).items()}

    @classmethod
    def from_documents(cls, model_prices, tool_prices) -> PriceTables:
        """From the (key, document) pairs the store lists for each kind."""
        return cls({key: msgspec.convert({**document, "key": key}, ModelPrice, dec_hook=decode_value)
                    for key, document in model_prices},
                   {key: msgspec.convert({**document, "key": key}, ToolPrice, dec_hook=decode_value)
                    for key, document in tool_prices})

    def cost(self, metric: Metric | None, quantity: int, dimensions: dict[str, str]) -> EventCost:
        """The COGS of an event of `quantity` units of `metric` (None: unknown, costs
        nothing) with `dimensions`. Tokens: quantity × price per million ÷ 1,000,000,
        tool calls: quantity × price per call, rounded down to a nano once. Without a
        price: the unit cost, flagged `price_missing`."""
        priced_by = metric.priced_by if metric is not None else None
        if priced_by is None:
            return EventCost(unit_cogs_nanos(metric, quantity), None)
        if priced_by == TOOL_CALLS:
            dimension, name = TOOL_DIMENSION, dimensions.get(TOOL_DIMENSION)
            price, per_units = self.call_prices.get(name), 1
        else:
            dimension, name = MODEL_DIMENSION, dimensions.get(MODEL_DIMENSION)
            price, per_units = self.token_prices.get((name, TOKEN_PRICE_OF[priced_by])), TOKENS_PER_PRICE
        if price is None:
            fallback = "unit_cost" if metric.unit_cost is not None else "none"
            return EventCost(unit_cogs_nanos(metric, quantity),
                             (("priced_by", priced_by), (dimension, name), ("price_missing", True),
                              ("fallback", fallback)))
        return EventCost(quantity * price // per_units,
                         (("priced_by", priced_by), (dimension, name), ("price_nanos", price)))
