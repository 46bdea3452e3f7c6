# Meter events onto the Redis edge bus: each batch becomes one entry of the meter
# stream (config.bus), which control-plane workers read in a consumer group.
from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as redis

from config.bus import EVENTS_FIELD, METER_STREAM
from proxy.control_plane_link import usage_ndjson
from proxy.meter_event import MeterEvent

REDIS_TIMEOUT_S = 2.0


class RedisStreamSink:
    """A MeterSink appending each batch to the meter stream at `redis_url` as one
    entry (XADD). A batch sent again (after a timeout whose XADD did land) is a second
    entry with the same events, which the control plane keeps once by their ids.
    Every call is bounded by `timeout_s`; a failure raises and the meter buffer
    retries, spooling to disk meanwhile."""

    def __init__(self, redis_url: str, stream: str = METER_STREAM, timeout_s: float = REDIS_TIMEOUT_S) -> None:
        self.stream = stream
        self.redis = redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    async def write_batch(self, events: Sequence[MeterEvent]) -> None:
        if events:
            await self.redis.xadd(self.stream, {EVENTS_FIELD: usage_ndjson(events)})

    async def close(self) -> None:
        await self.redis.aclose()
