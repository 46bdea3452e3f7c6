# Guard level webhooks: built when a transition is recorded (one per notify channel,
# written to the outbox in the same transaction), then delivered from the outbox by
# WebhookSender: POSTed, signed, retried with exponential backoff until a 2xx answer or
# `max_attempts`, then kept as failed. Delivery is at least once: the id is the same
# on every attempt, so a receiver drops repeats by it.
#
# Signature (scheme v1): with the channel's secret,
#   Aforo-Webhook-Signature: v1=<hex HMAC-SHA256(secret, f"{id}.{timestamp}.".encode() + body)>
# where id is Aforo-Webhook-Id, timestamp is Aforo-Webhook-Timestamp (epoch seconds, new
# on each attempt) and body the raw request body. verify_signature checks one.
from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Literal

import aiohttp
import msgspec

from config import Guard
from config.control_plane_settings import NotifyChannel, WebhookSettings
from control_plane.store import (
    PENDING,
    Action,
    Store,
    StoreError,
    Webhook,
    WebhookDelivery,
)

log = logging.getLogger("aforo.webhooks")

LEVEL_CHANGED = "margin.level_changed"
SIGNATURE_VERSION = "v1"
ID_HEADER = "Aforo-Webhook-Id"
TIMESTAMP_HEADER = "Aforo-Webhook-Timestamp"
SIGNATURE_HEADER = "Aforo-Webhook-Signature"
WEBHOOK_ID_PREFIX = "whk_"
CLAIM_BATCH = 100                # webhooks claimed (and sent concurrently) per pass
LEASE_SLACK_S = 30.0             # a claim outlives the longest attempt by this much
MAX_IDLE_S = 5.0                 # the outbox is looked at at least this often (other processes enqueue too)
STORE_RETRY_S = 5.0              # after the store failed, wait this long before trying again
ERROR_BODY_BYTES = 200           # how much of a failed answer's body is kept as its error


class LevelChanged(msgspec.Struct, frozen=True):
    """The body of a `margin.level_changed` webhook: a customer's margin level for one
    metric (or `overall`) moved under `guard` from `level_from` to `level_to` (0 ok,
    1 warn, 2 throttle, 3 block) at `occurred_at` (RFC 3339, UTC). `margin_pct` is
    the margin that moved it (null: cost with no revenue), `min_margin_pct` the
    margin the guard protects, `mode` `enforce` or `shadow` (nothing is enforced),
    `recommended_action` a sentence for the people notified. `id` is the same on
    every delivery attempt."""

    id: str
    type: Literal["margin.level_changed"]
    customer_id: str
    metric: str
    guard: str
    level_from: int
    level_to: int
    margin_pct: float | None
    min_margin_pct: float
    mode: str
    recommended_action: str
    occurred_at: datetime.datetime


_encode = msgspec.json.Encoder().encode


def notified_channels(guard: Guard, level_from: int, level_to: int) -> tuple[str, ...]:
    """The channels told of a transition: a level's `notify` channels hear of every
    transition that touches that level or a worse one (into it, out of it, or across
    it), escalations and recoveries alike. So level 1's channels hear of every
    transition and level 3's only of blocks starting and ending. In level order,
    each channel once; empty when the levels involved notify no one."""
    worst = max(level_from, level_to)
    channels: dict[str, None] = {}
    for number, level in guard.actions.levels:
        if number <= worst:
            channels.update(dict.fromkeys(level.notify))
    return tuple(channels)


def recommended_action(guard: Guard, level_from: int, level_to: int) -> str:
    """What the people notified of a transition from `level_from` to `level_to` under
    `guard` should know and do, in one or two sentences (under a shadow guard: what
    would have been enforced)."""
    actions = guard.actions
    shadow = guard.mode == "shadow"
    if level_to == 0:
        return "Recovered: the margin is back above the guard's thresholds" + (
            "." if shadow else "; nothing is enforced any more.")
    if level_to == 1 and actions.level_1 is not None:
        lifted = "The throttle or block is lifted. " if level_from > 1 and not shadow else ""
        return (f"{lifted}Review pricing and costs for this customer: the margin is below the warning threshold "
                f"({actions.level_1.threshold}); requests proceed untouched.")
    if level_to == 2 and actions.level_2 is not None:
        rate = actions.level_2.throttle_rate
        downgrades = ", ".join(f"{asked} to {served}" for asked, served in actions.level_2.downgrade_models.items())
        if shadow:
            also = f" and downgrade {downgrades}" if downgrades else ""
            return f"Would throttle to {rate}{also} (shadow mode: nothing is enforced); review pricing and costs."
        if downgrades:
            return (f"Throttled to {rate}, and LLM calls downgraded ({downgrades}): responses carry "
                    "`X-Aforo-Throttle: true` and `X-Aforo-Downgrade`. Review pricing and costs.")
        return (f"Throttled to {rate}: responses carry `X-Aforo-Throttle: true`. Move the customer to a cheaper "
                "path or review pricing and costs.")
    if level_to == 3 and actions.level_3 is not None:
        if actions.level_3.action == "lock_features":
            what = "lock features " + ", ".join(actions.level_3.features)
            done = "Features " + ", ".join(actions.level_3.features) + " locked"
        else:
            what, done = "block every request", "Blocked"
        if shadow:
            return f"Would {what} until the billing period ends (shadow mode: nothing is enforced); review pricing."
        return (f"{done} until the billing period ends (429 Margin Limit Exceeded). Review pricing and costs "
                "before the next period.")
    return f"Margin level {level_to}; review pricing and costs."


def level_change_webhooks(action: Action, guard: Guard) -> list[Webhook]:
    """The webhooks telling of `action` (a transition under `guard`): one per channel
    of notified_channels, each with its own id; none when no channel is named."""
    webhooks = []
    for channel in notified_channels(guard, action.level_from, action.level_to):
        webhook_id = WEBHOOK_ID_PREFIX + secrets.token_hex(16)
        body = _encode(LevelChanged(
            webhook_id, LEVEL_CHANGED, action.customer_id, action.metric, action.guard_id, action.level_from,
            action.level_to, action.margin_pct, action.min_margin_pct, action.mode,
            recommended_action(guard, action.level_from, action.level_to),
            datetime.datetime.fromtimestamp(action.at, datetime.UTC)))
        webhooks.append(Webhook(webhook_id, channel, body))
    return webhooks


# -- signatures ---------------------------------------------------------------------

def sign(secret: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The Aforo-Webhook-Signature value for one attempt: `v1=<hex>`."""
    digest = hmac.new(secret, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={digest}"


def verify_signature(secret: str | bytes, webhook_id: str, timestamp: str | int, body: bytes, header: str) -> bool:
    """For receivers: True when `header` (the Aforo-Webhook-Signature value; several
    `v1=<hex>` separated by commas are accepted, e.g. while a secret is rotated)
    holds the signature of `body` with `webhook_id` and `timestamp` (the
    Aforo-Webhook-Id and Aforo-Webhook-Timestamp values) under `secret`. Compared in
    constant time. Also reject timestamps far from your clock (say 5 minutes) to
    refuse replays, and drop a repeated id."""
    key = secret.encode() if isinstance(secret, str) else secret
    expected = sign(key, webhook_id, timestamp, body)
    found = False
    for candidate in header.split(","):
        found |= hmac.compare_digest(candidate.strip().encode(), expected.encode())
    return found


# -- delivery -------------------------------------------------------------------------

def retry_delay_s(attempts: int, retry: WebhookSettings) -> float:
    """Seconds to wait after the `attempts`-th failed attempt (1-based):
    min(max_backoff_s, initial_backoff_s * 2**(attempts - 1))."""
    return min(retry.max_backoff_s, retry.initial_backoff_s * 2.0 ** min(attempts - 1, 64))


class WebhookMetrics:
    """On a Prometheus `registry`: `aforo_webhook_attempts_total{channel,result}`
    (result `delivered` or `failed`: every attempt), `aforo_webhooks_failed_total{channel}`
    (webhooks given up) and `aforo_webhooks_pending` (in the outbox, all processes)."""

    def __init__(self, registry) -> None:
        from prometheus_client import Counter, Gauge
        self.attempts = Counter("aforo_webhook_attempts_total", "Webhook delivery attempts, by channel and result.",
                                ("channel", "result"), registry=registry)
        self.given_up = Counter("aforo_webhooks_failed_total",
                                "Webhooks given up after their last attempt (kept in the outbox as failed).",
                                ("channel",), registry=registry)
        self.pending = Gauge("aforo_webhooks_pending", "Webhooks waiting in the outbox.", registry=registry)


class WebhookSender:
    """Delivers the outbox of `store` to `channels` (name -> NotifyChannel, each
    signed with `signing_secrets[name]`), retrying as `retry` says. `clock` gives epoch
    seconds. `run()` delivers until cancelled; `wake()` makes it look at the outbox
    now (call it after enqueueing); `deliver_due(session)` is one pass.
    `metrics` (WebhookMetrics) counts attempts when given.

    A webhook for a channel not in `channels` is given up at once (its error says so).
    Several senders may share one database: each webhook is claimed by one of them
    for the length of an attempt (see Store.claim_webhooks)."""

    def __init__(self, store: Store, channels: Mapping[str, NotifyChannel], signing_secrets: Mapping[str, bytes],
                 retry: WebhookSettings, *, clock: Callable[[], float] = time.time,
                 metrics: WebhookMetrics | None = None, max_idle_s: float = MAX_IDLE_S) -> None:
        self.store = store
        self.channels = dict(channels)
        self.secrets = dict(signing_secrets)
        self.retry = retry
        self.clock = clock
        self.metrics = metrics
        self.max_idle_s = max_idle_s
        self.lease_s = max((channel.timeout_s for channel in self.channels.values()), default=0.0) + LEASE_SLACK_S
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Deliver whatever is due, then sleep until the next webhook is due, wake()
        is called, or `max_idle_s` passes (webhooks enqueued by another process on
        the same database are found then); forever (until cancelled). A failing
        store is logged and tried again after STORE_RETRY_S."""
        async with aiohttp.ClientSession() as session:
            while True:
                self._wake.clear()
                try:
                    while await self.deliver_due(session) == CLAIM_BATCH:
                        pass
                    next_at = await self.store.next_webhook_at()
                    if self.metrics is not None:
                        self.metrics.pending.set((await self.store.webhook_counts())[PENDING])
                    delay = self.max_idle_s if next_at is None else max(0.0, min(self.max_idle_s,
                                                                                 next_at - self.clock()))
                except StoreError as error:
                    log.error("webhook delivery: the store failed, trying again in %g s: %s", STORE_RETRY_S, error)
                    delay = STORE_RETRY_S
                except Exception:       # the sender must outlive any bug
                    log.exception("webhook delivery failed unexpectedly")
                    delay = STORE_RETRY_S
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except TimeoutError:
                    pass

    async def deliver_due(self, session: aiohttp.ClientSession) -> int:
        """Claim the webhooks due now (at most CLAIM_BATCH), attempt each once,
        concurrently, over `session`, and record how each went. Returns how many
        were attempted."""
        due = await self.store.claim_webhooks(self.clock(), self.lease_s, CLAIM_BATCH)
        outcomes = await asyncio.gather(*(self._attempt(session, delivery) for delivery in due),
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome       # e.g. a StoreError: that webhook is due again after its claim
        return len(due)

    async def _attempt(self, session, delivery: WebhookDelivery) -> None:
        channel = self.channels.get(delivery.channel)
        if channel is None:
            error = f"no notify channel `{delivery.channel}` in the control plane settings"
        else:
            error = await self._post(session, channel, self.secrets[delivery.channel], delivery)
        at = self.clock()
        attempts = delivery.attempts + 1
        given_up = error is not None and (channel is None or attempts >= self.retry.max_attempts)
        if self.metrics is not None:           # counted first: once the store says so, /metrics does too
            self.metrics.attempts.labels(channel=delivery.channel,
                                         result="delivered" if error is None else "failed").inc()
            if given_up:
                self.metrics.given_up.labels(channel=delivery.channel).inc()
        if error is None:
            await self.store.record_webhook_attempt(delivery.id, at)
        elif given_up:
            log.warning("webhook %s to %s: given up after %d attempts: %s", delivery.id, delivery.channel, attempts,
                        error)
            await self.store.record_webhook_attempt(delivery.id, at, error)
        else:
            log.info("webhook %s to %s: attempt %d failed, retrying: %s", delivery.id, delivery.channel, attempts,
                     error)
            await self.store.record_webhook_attempt(delivery.id, at, error, at + retry_delay_s(attempts, self.retry))

    async def _post(self, session, channel: NotifyChannel, secret: bytes, delivery: WebhookDelivery) -> str | None:
        # None when the receiver answered 2xx, else what went wrong.
        timestamp = int(self.clock())
        headers = {"Content-Type": "application/json", ID_HEADER: delivery.id, TIMESTAMP_HEADER: str(timestamp),
                   SIGNATURE_HEADER: sign(secret, delivery.id, timestamp, delivery.body)}
        try:
            async with session.post(channel.url, data=delivery.body, headers=headers, allow_redirects=False,
                                    timeout=aiohttp.ClientTimeout(total=channel.timeout_s)) as response:
                if 200 <= response.status < 300:
                    return None
                said = (await response.content.read(ERROR_BODY_BYTES)).decode("utf-8", "replace")
                said = " ".join(said.split())
                return f"HTTP {response.status}" + (f": {said}" if said else "")
        except TimeoutError:
            return f"no answer within {channel.timeout_s:g} s"
        except (aiohttp.ClientError, OSError) as error:
            return f"{type(error).__name__}: {error}"
