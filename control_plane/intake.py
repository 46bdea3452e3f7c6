# What happens to a batch of usage or cost events, however it arrives (the REST API,
# the meter stream): ingest (gates, idempotency, rating), then the guards judge the
# customers whose events were kept, the proxies hear of level changes, and the
# webhook sender is woken for what the transitions put in the outbox. A new guard
# file has every customer judged again at once (relaxing a guard unblocks a
# customer without waiting for its next event).
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from control_plane.edge_feed import EdgeFeed
from control_plane.guard_actions import evaluate_guards
from control_plane.ingest import IngestReport, Rerated, ingest_batch, rate_unrated
from control_plane.rating import CurrentRater
from control_plane.store import Store, StoreError

log = logging.getLogger("aforo.control_plane")


class Intake:
    """Takes batches in for `store`: `guards` is the watched guard file (or None),
    `feed` the edge feed, `webhooks` the WebhookSender (or None), `clock` epoch
    seconds (the gates' now), `ledger` the Redis bus's quota ledger (or None: the
    store's own counts usage from outside a lease in the batch's transaction)."""

    def __init__(self, store: Store, rater: CurrentRater, feed: EdgeFeed, guards=None, webhooks=None,
                 clock: Callable[[], float] = time.time, ledger=None, count_unrated=None) -> None:
        self.store = store
        self.ledger = ledger        # the Redis bus's quota ledger, when the proxies lease there
        self.count_unrated = count_unrated      # hears of each n events kept unrated
        # The guard file version customers were last all judged under (each ingest
        # judges its own customers under the file in force).
        self._judged_guards = guards.value.version if guards is not None else None
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
                                                         rater=rater, tally_ledgered=self.ledger is not None)
        if ledgered and self.ledger is not None:
            await self.ledger.count(ledgered, self.store)
        if report.unrated and self.count_unrated is not None:
            self.count_unrated(report.unrated)
        if self.guards is not None and customers:
            await self._judge(now, customers, rater)
        return report

    async def _judge(self, now, customers, rater):
        # The guards judge `customers` (None: everyone); the proxies and the webhook
        # sender hear of what moved.
        recorded = await evaluate_guards(self.store, self.guards.value, now, customers, rater)
        self.feed.changed(action.customer_id for action in recorded)
        if recorded and self.webhooks is not None:
            self.webhooks.wake()
        return recorded

    async def rate_unrated(self) -> Rerated:
        """Rate the unrated events the catalog now can (see ingest.rate_unrated), and
        judge the customers whose totals moved."""
        rater = await self.rater.get()
        rerated, customers = await rate_unrated(self.store, rater)
        if self.guards is not None and customers:
            await self._judge(self.clock(), customers, rater)
        return rerated

    async def judge_on_new_guards(self, interval_s: float) -> None:
        """Until cancelled, every `interval_s`: when the guard file in force is a new
        version, judge every customer under it (a store failure is logged and tried
        again at the next check)."""
        while True:
            await asyncio.sleep(interval_s)
            version = self.guards.value.version
            if version == self._judged_guards:
                continue
            try:
                moved = await self._judge(self.clock(), None, await self.rater.get())
            except StoreError as error:
                log.warning("guards %s: cannot judge the customers under them yet (%s); trying again", version, error)
                continue
            self._judged_guards = version
            log.info("guards %s in force: every customer judged again, %d level changes", version, len(moved))
