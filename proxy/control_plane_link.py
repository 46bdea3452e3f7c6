# A proxy fed by the control plane: ControlPlaneEdgeState pulls the whole edge state
# once, then follows the change stream (long polls), and ControlPlaneSink posts meter
# events to the control plane's ingest in batches. Neither is on the request path:
# requests read the snapshot in force, which is replaced whole or restated in place.
from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Sequence

import aiohttp
import msgspec

from config.documents import decode_value
from config.edge_state_file import Customer, EdgeStateFile
from decision_core import CustomerState
from proxy.edge_snapshot import EdgeSnapshot, build_snapshot
from proxy.meter_event import MeterEvent

log = logging.getLogger("aforo.proxy")

LONG_POLL_S = 20.0
REQUEST_TIMEOUT_S = 10.0
RETRY_INITIAL_S = 0.2
RETRY_MAX_S = 5.0
_UTC = datetime.timezone.utc


class _WireState(msgspec.Struct):
    version: str
    state: EdgeStateFile


class _WireChanges(msgspec.Struct):
    version: str
    customers: list[Customer] = []
    removed: list[str] = []
    resync: bool = False


class ControlPlaneUnavailable(Exception):
    """The control plane did not answer as it should (status, body or connection)."""


class ControlPlaneClient:
    """The proxy's HTTP client for the control plane at `url`, authenticated with
    `token` (an admin bearer token)."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers)
        return self._session

    async def call(self, method: str, path: str, *, timeout_s: float = REQUEST_TIMEOUT_S, **kwargs) -> bytes:
        """The body of a 2xx answer; ControlPlaneUnavailable for anything else."""
        try:
            async with self.session().request(method, self.url + path,
                                              timeout=aiohttp.ClientTimeout(total=timeout_s), **kwargs) as response:
                body = await response.read()
                if response.status // 100 != 2:
                    raise ControlPlaneUnavailable(
                        f"{method} {path}: {response.status} {body[:200].decode(errors='replace')}")
                return body
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            raise ControlPlaneUnavailable(f"{method} {path}: {error!r}") from error

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class ControlPlaneEdgeState:
    """Edge state followed from the control plane (an EdgeState).

    `start(timeout_s)` pulls the whole state and returns once it is served (raises
    ControlPlaneUnavailable when it cannot within the time); `follow()` then long-polls
    for changes until cancelled, riding out outages with the last state in force
    (`age_s()` says for how long it has not heard from the control plane).

    A changed customer whose plan, keys and period are as before is restated in place
    (its usage counted here and unchanged throttle buckets stay); any other change
    builds a new snapshot, into which usage counted here since the last pull is
    carried (a customer's count is never lowered by a state the control plane built
    before it ingested this proxy's latest events).

    With `leased_quotas`, hard quotas are admitted against leases (see
    proxy.quota_leases): their counters start at the limit (nothing leased yet) and
    are carried into a new snapshot exactly as they stand.
    """

    def __init__(self, client: ControlPlaneClient, clock: Callable[[], float] = time.time,
                 leased_quotas: bool = False) -> None:
        self.client = client
        self.clock = clock
        self.leased_quotas = leased_quotas
        self.ready = False
        self.version = ""
        self.snapshot: EdgeSnapshot = build_snapshot({}, (), 0.0, 1.0, 0.0, "empty")
        self._state: EdgeStateFile | None = None
        self._customers: dict[str, Customer] = {}
        self._heard_at = time.monotonic()
        self.errors = 0

    def customer_for_key(self, api_key: bytes) -> CustomerState | None:
        return self.snapshot.customer_for_key(api_key)

    def age_s(self) -> float:
        """Seconds since the control plane last answered."""
        return time.monotonic() - self._heard_at

    async def start(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        delay = RETRY_INITIAL_S
        while True:
            try:
                await self.pull()
                return
            except ControlPlaneUnavailable as error:
                if time.monotonic() + delay > deadline:
                    raise ControlPlaneUnavailable(f"no edge state from {self.client.url}: {error}") from error
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def pull(self) -> None:
        """Pull and serve the whole state."""
        wire = self._decode(await self.client.call("GET", "/v1/edge/state"), _WireState)
        self._state = wire.state
        self._customers = {customer.id: customer for customer in wire.state.customers}
        self._rebuild(wire.version)
        self.ready = True

    async def follow(self) -> None:
        """Apply the change stream until cancelled; on any failure wait (backing off)
        and go on, pulling everything again when the stream says so."""
        delay = RETRY_INITIAL_S
        while True:
            try:
                if not self.ready:
                    await self.pull()
                await self.apply_next_changes(LONG_POLL_S)
                delay = RETRY_INITIAL_S
            except ControlPlaneUnavailable as error:
                self.errors += 1
                log.warning("edge state: %s; serving version %s (%.0f s old), retrying in %.1f s",
                            error, self.version, self.age_s(), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            except Exception:  # noqa: BLE001 - following must outlive a state it cannot build
                self.errors += 1
                log.exception("edge state: a change could not be applied; serving version %s, pulling "
                              "everything again in %.1f s", self.version, delay)
                self.version = ""           # an unknown version: the next poll says resync
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def apply_next_changes(self, wait_s: float) -> None:
        """One long poll: wait up to `wait_s` for changes after the version served,
        then apply them (or pull everything on `resync`)."""
        body = await self.client.call("GET", "/v1/edge/changes", params={"since": self.version, "wait_s": wait_s},
                                      timeout_s=wait_s + REQUEST_TIMEOUT_S)
        changes = self._decode(body, _WireChanges)
        if changes.resync:
            await self.pull()
            return
        if changes.version == self.version:
            return
        now = self.clock()
        rebuild = bool(changes.removed)
        for customer in changes.customers:
            old = self._customers.get(customer.id)
            self._customers[customer.id] = customer
            if rebuild or old is None or (old.plan, old.api_keys, old.period_end) != (
                    customer.plan, customer.api_keys, customer.period_end):
                rebuild = True
            elif old != customer:
                self.snapshot.restate(customer, now, old.levels)
        for customer_id in changes.removed:
            self._customers.pop(customer_id, None)
        if rebuild:
            self._rebuild(changes.version)
        self.version = changes.version
        log.info("edge state: now serving version %s (%d changed, %d removed)", changes.version,
                 len(changes.customers), len(changes.removed))

    def _decode(self, body: bytes, kind):
        try:
            value = msgspec.json.decode(body, type=kind, dec_hook=decode_value)
        except msgspec.DecodeError as error:
            raise ControlPlaneUnavailable(f"the control plane sent edge state this proxy cannot read: {error}") \
                from error
        self._heard_at = time.monotonic()
        return value

    def _rebuild(self, version: str) -> None:
        state = self._state
        old = self.snapshot
        customers = self._customers.values()
        if self.leased_quotas:
            customers = (_unleased(customer, state.plans[customer.plan]) if customer.plan in state.plans else customer
                         for customer in customers)
        new = build_snapshot(state.plans, customers, state.period.start.epoch_s, state.period.end.epoch_s,
                             self.clock(), version)
        for seen in old.seen_customers():
            carried = new.customer_by_id(seen.customer_id)
            if carried is None or carried.period_end != seen.period_end:
                continue
            for metric, slot in carried.quotas.slots.items():
                here, there = seen.quota_used(metric), carried.quota_used(metric)
                exact = self.leased_quotas and carried.quotas.limit_at(slot).hard
                if here != there and (exact or here > there):
                    carried.add_usage(metric, here - there)
        self.snapshot = new
        self.version = version

    async def close(self) -> None:
        await self.client.close()


def _unleased(customer: Customer, plan) -> Customer:
    # A customer as this worker holds it before any lease: hard quotas used up.
    hard = {metric: quota.limit for metric, quota in plan.quotas.items() if quota.hard}
    if not hard:
        return customer
    return msgspec.structs.replace(customer, usage={**customer.usage, **hard})


class _WireUsage(msgspec.Struct):
    id: str
    customer_id: str
    metric: str
    quantity: int
    timestamp: datetime.datetime
    dimensions: dict[str, str]
    source: str


_encode_lines = msgspec.json.Encoder().encode_lines


def usage_ndjson(events: Sequence[MeterEvent]) -> bytes:
    """Meter events as the control plane ingests usage: NDJSON, route and status as
    dimensions, source `proxy`."""
    return _encode_lines(
        _WireUsage(event.id, event.customer_id, event.metric, event.quantity,
                   datetime.datetime.fromtimestamp(event.timestamp, _UTC),
                   {"route": event.route, "status": str(event.status)}, "proxy")
        for event in events)


class _IngestReport(msgspec.Struct):
    results: list[dict] = []


class ControlPlaneSink:
    """A MeterSink posting meter events to the control plane's `POST /v1/events` as
    NDJSON (route and status as dimensions, source `proxy`). The control plane keeps
    each event once by its id, so a batch sent again counts nothing twice. Events it
    rejects (an unknown metric, too old after a long outage, ...) cannot succeed on a
    retry: they are logged and counted in `rejected`, and the batch is done."""

    def __init__(self, client: ControlPlaneClient) -> None:
        self.client = client
        self.rejected = 0

    async def write_batch(self, events: Sequence[MeterEvent]) -> None:
        if not events:
            return
        body = usage_ndjson(events)
        answer = await self.client.call("POST", "/v1/events", data=body,
                                        headers={"Content-Type": "application/x-ndjson", "X-Aforo-Source": "proxy"})
        try:
            report = msgspec.json.decode(answer, type=_IngestReport)
        except msgspec.DecodeError as error:
            raise ControlPlaneUnavailable(f"unreadable ingest report: {error}") from error
        rejected = [result for result in report.results if result.get("status") == "rejected"]
        if rejected:
            self.rejected += len(rejected)
            log.error("the control plane rejected %d of %d meter events; first: %s", len(rejected), len(events),
                      rejected[0].get("reason"))

    async def close(self) -> None:
        await self.client.close()
