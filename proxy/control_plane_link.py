# A proxy fed by the control plane over its REST API: ControlPlaneSource serves the
# edge state a FollowedEdgeState follows (the whole state, then long polls of the
# change stream), ControlPlaneSink posts meter events to its ingest in batches, and
# ControlPlaneLedger leases hard quotas from it. None of it is on the request path.
from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Sequence

import aiohttp
import msgspec

from config.documents import decode_value
from proxy.followed_edge_state import EdgeStateUnavailable, WireChanges, WireState
from proxy.meter_event import MeterEvent
from proxy.quota_ledger import LedgerUnavailable

log = logging.getLogger("aforo.proxy")

REQUEST_TIMEOUT_S = 10.0
_UTC = datetime.timezone.utc


class ControlPlaneUnavailable(EdgeStateUnavailable):
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
    """Meter events as the control plane ingests usage: NDJSON, the event's own
    dimensions plus route and status, source `proxy`."""
    return _encode_lines(
        _WireUsage(event.id, event.customer_id, event.metric, event.quantity,
                   datetime.datetime.fromtimestamp(event.timestamp, _UTC),
                   {**(event.dimensions or {}), "route": event.route, "status": str(event.status)}, "proxy")
        for event in events)


class _IngestReport(msgspec.Struct):
    results: list[dict] = []


class ControlPlaneSource:
    """The edge state as the control plane at `client` serves it: `pull()` the whole
    state (GET /v1/edge/state), `changes(since, wait_s)` one long poll of the change
    stream (GET /v1/edge/changes)."""

    def __init__(self, client: ControlPlaneClient) -> None:
        self.client = client
        self.where = client.url

    async def pull(self) -> WireState:
        return _decode(await self.client.call("GET", "/v1/edge/state"), WireState)

    async def changes(self, since: str, wait_s: float) -> WireChanges:
        body = await self.client.call("GET", "/v1/edge/changes", params={"since": since, "wait_s": wait_s},
                                      timeout_s=wait_s + REQUEST_TIMEOUT_S)
        return _decode(body, WireChanges)

    async def close(self) -> None:
        await self.client.close()


def _decode(body: bytes, kind):
    try:
        return msgspec.json.decode(body, type=kind, dec_hook=decode_value)
    except msgspec.DecodeError as error:
        raise ControlPlaneUnavailable(f"the control plane sent edge state this proxy cannot read: {error}") from error


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


class _Granted(msgspec.Struct):
    granted: int
    period_start: float
    leased: int


class _Tokens(msgspec.Struct):
    granted: int
    wait_s: float


class ControlPlaneLedger:
    """A QuotaLedger (proxy.quota_leases) kept by the control plane at `client`
    (POST /v1/edge/leases and /v1/edge/leases/return), which counts leases per billing
    period in its store. A period is named by its start. Throttle tokens come from
    POST /v1/edge/throttles."""

    def __init__(self, client: ControlPlaneClient) -> None:
        self.client = client
        self.where = client.url

    async def lease(self, customer_id, metric, *, needed, wanted, limit, period_end, recorded, debt):
        try:
            body = await self.client.call("POST", "/v1/edge/leases", json={
                "customer_id": customer_id, "metric": metric, "needed": needed, "wanted": wanted, "debt": debt})
            granted = msgspec.json.decode(body, type=_Granted)
        except (ControlPlaneUnavailable, msgspec.DecodeError) as error:
            raise LedgerUnavailable(f"control plane at {self.where}: {error}") from error
        return granted.granted, granted.period_start, granted.leased

    async def give_back(self, customer_id, metric, period, units):
        try:
            await self.client.call("POST", "/v1/edge/leases/return", json={
                "customer_id": customer_id, "metric": metric, "period_start": period, "units": units})
        except ControlPlaneUnavailable as error:
            raise LedgerUnavailable(f"control plane at {self.where}: {error}") from error

    async def take_tokens(self, customer_id, guard_id, metric, *, tokens, per_s, burst, wanted):
        try:
            body = await self.client.call("POST", "/v1/edge/throttles", json={
                "customer_id": customer_id, "guard_id": guard_id, "metric": metric, "tokens": tokens, "per_s": per_s,
                "burst": burst, "wanted": max(wanted, 1)})
            taken = msgspec.json.decode(body, type=_Tokens)
        except (ControlPlaneUnavailable, msgspec.DecodeError) as error:
            raise LedgerUnavailable(f"control plane at {self.where}: {error}") from error
        return taken.granted, taken.wait_s

    async def close(self) -> None:
        await self.client.close()
