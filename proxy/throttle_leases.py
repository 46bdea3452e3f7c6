# Level-2 throttles with several proxy workers: a customer throttled to `throttle_rate`
# gets that rate across every worker of every proxy, not per worker. Each enforcing
# level-2 standing's bucket is fed (decision_core.bucket): time adds nothing to it,
# and its tokens come from one bucket per customer and guard that the QuotaLedger
# keeps for the whole deployment (the control plane's store, or Redis), so the
# requests admitted by all workers together in any span of L seconds are at most
# burst + rate * L.
#
# A request the fed bucket cannot admit asks the shared bucket for a token (requests
# waiting on one worker ask together, one round trip) and is decided again with what
# comes. Nothing is held for later: tokens a request did not take (it went away) are
# dropped, so the customer may get fewer than the rate, never more. With none left,
# the worker refuses that customer's throttled requests itself, with no round trip,
# until the shared bucket said one would be there.
#
# When the ledger cannot be asked, that bucket refills by time again (full, as a new
# bucket starts): each worker throttles on its own, as a single worker would, until
# OWN_BUCKET_S has passed and the ledger is asked again.
from __future__ import annotations

import logging
import time

from proxy.quota_ledger import LedgerUnavailable

log = logging.getLogger("aforo.proxy")

# After the ledger failed, a worker throttles on its own bucket this long.
OWN_BUCKET_S = 1.0


class ThrottleLeases:
    """The shared level-2 throttles of one worker, from `ledger` (a QuotaLedger)."""

    def __init__(self, ledger, loop, clock=time.monotonic, wall_clock=time.time) -> None:
        self.ledger = ledger
        self.loop = loop
        self.clock = clock
        self.wall_clock = wall_clock
        self._waiting: dict[tuple[str, str], list] = {}       # asked for: exchanges waiting on it
        self._empty_until: dict[tuple[str, str], float] = {}  # the shared bucket said: none before then
        self._own: dict[tuple[str, str], tuple[object, float]] = {}   # on its own bucket: (bucket, until)

    def wait(self, exchange, customer, decision) -> bool:
        """A request refused by a level-2 throttle (`decision`): ask the shared bucket
        and `exchange.lease_settled(True)` when the answer comes. False when the
        refusal stands (the shared bucket is empty for now, or this worker throttles
        on its own bucket while the ledger cannot be asked)."""
        found = _throttling(customer, decision.guard_id)
        if found is None:
            return False
        metric, standing = found
        key = (customer.customer_id, decision.guard_id, metric)
        bucket = standing.bucket
        if not bucket.fed:
            own = self._own.get(key)
            if own is not None and own[1] > self.clock():
                return False
            self._own.pop(key, None)
            bucket.run_on_time(self.wall_clock(), True)       # back to the shared bucket
        empty_until = self._empty_until.get(key)
        if empty_until is not None:
            if empty_until > self.clock():
                return False
            del self._empty_until[key]
        waiting = self._waiting.get(key)
        if waiting is None:
            self._waiting[key] = [exchange]
            self.loop.create_task(self._ask(customer, metric, standing, key))
        else:
            waiting.append(exchange)
        return True

    def admitted(self, customer, decision) -> None:
        """A throttled request was admitted: a worker on its own bucket since the
        ledger failed goes back to the shared one once OWN_BUCKET_S has passed."""
        if not self._own:
            return
        now = self.clock()
        for key, (bucket, until) in list(self._own.items()):
            if key[0] == customer.customer_id and key[1] == decision.guard_id and until <= now:
                del self._own[key]
                bucket.run_on_time(self.wall_clock(), True)

    async def _ask(self, customer, metric, standing, key) -> None:
        bucket = standing.bucket
        try:
            # The rate as the standing says it (the guard's), and as many tokens as
            # requests wait here (all those asking by the time the answer comes).
            granted, wait_s = await self.ledger.take_tokens(
                customer.customer_id, standing.guard_id, metric, tokens=bucket.tokens_per_period,
                per_s=bucket.period_ns / 1e9, burst=bucket.burst, wanted=len(self._waiting.get(key, ())))
        except LedgerUnavailable as error:
            if key not in self._own:                    # said once per outage and customer
                log.warning("throttle of %s under %s: %s; throttling on this worker's own bucket for now",
                            customer.customer_id, standing.guard_id, error)
            bucket.run_on_time(self.wall_clock(), False)
            self._own[key] = (bucket, self.clock() + OWN_BUCKET_S)
        except Exception:  # noqa: BLE001 - whatever happens, the waiting requests get an answer
            log.exception("throttle tokens for %s under %s failed", customer.customer_id, standing.guard_id)
            bucket.run_on_time(self.wall_clock(), False)
            self._own[key] = (bucket, self.clock() + OWN_BUCKET_S)
        else:
            if granted:
                bucket.feed(granted)
            else:
                self._empty_until[key] = self.clock() + wait_s
        for exchange in self._waiting.pop(key, ()):
            exchange.lease_settled(True)
        if bucket.fed:
            bucket.drain()                              # tokens nobody took are not kept


def _throttling(customer, guard_id):
    # (metric, standing) of the enforcing level-2 standing of `guard_id` whose bucket
    # has no token (the one that refused), or None. A guard on `*` has a standing per
    # metric, each with a bucket of its own.
    levels = customer.acting_levels
    if levels is None:
        return None
    for metric, standing in levels.items():
        # available(0.0): the credit as it is, not refilled (a clock at 0 adds nothing).
        if standing.guard_id == guard_id and standing.level == 2 and standing.bucket.available(0.0) < 1.0:
            return metric, standing
    return None
