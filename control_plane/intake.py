# What happens to a batch of usage or cost events, however it arrives (the REST API,
# the meter stream): ingest (gates, idempotency, rating), then the guards judge the
# customers whose events were kept, the proxies hear of level changes, and the
# webhook sender is woken for what the transitions put in the outbox.
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from control_plane.edge_feed import EdgeFeed
from control_plane.guard_actions import evaluate_guards
from control_plane.ingest import IngestReport, ingest_batch
from control_plane.rating import CurrentRater
from control_plane.store import Store


class Intake:
    """Takes batches in for `store`: `guards` is the watched guard file (or None),
    `feed` the edge feed, `webhooks` the WebhookSender (or None), `clock` epoch
    seconds (the gates' now), `ledger` the Redis bus's quota ledger (or None: the
    store's own counts usage from outside a lease in the batch's transaction)."""

    def __init__(self, store: Store, rater: CurrentRater, feed: EdgeFeed, guards=None, webhooks=None,
                 clock: Callable[[], float] = time.time, ledger=None) -> None:
        self.store = store
        self.ledger = ledger        # the Redis bus's quota ledger, when the proxies lease there
        self.rater = rater
        self.feed = feed
        self.guards = guards
        self.webhooks = webhooks
        self.clock = clock

    async def take(self, kind: str, raw_events: Sequence[bytes | None], source: str) -> IngestReport:
        """Ingest one batch (raw JSON per event) and act on what it moved; the report
        has a result per event. Raises StoreError when the store fails; the batch may
        be sent again (what was kept counts once)."""
        now = self.clock()
        rater = await self.rater.get()
        report, customers, ledgered = await ingest_batch(self.store, kind, raw_events, now, source=source,
                                                         rater=rater)
        if ledgered and self.ledger is not None:
            await self.ledger.count(ledgered, self.store)
        if self.guards is not None and customers:
            recorded = await evaluate_guards(self.store, self.guards.value, now, customers, rater)
            self.feed.changed(action.customer_id for action in recorded)
            if recorded and self.webhooks is not None:
                self.webhooks.wake()
        return report
