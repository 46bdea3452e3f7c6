# Meter events onto the Redis edge bus: each batch becomes one entry of the meter
# stream (config.bus), which control-plane workers read in a consumer group.
from __future__ import annotations

from collections.abc import Sequence

from config.bus import EVENTS_FIELD, METER_STREAM
from proxy.control_plane_link import usage_ndjson
from proxy.meter_event import MeterEvent
from proxy.redis_bus import RedisBus


class RedisStreamSink:
    """A MeterSink appending each batch to the meter stream on the RedisBus `bus` as
    one entry (XADD). A batch sent again (after a timeout whose XADD did land) is a
    second entry with the same events, which the control plane keeps once by their
    ids. Every call is bounded by the bus's timeout and circuit breaker; a failure
    raises BusUnavailable and the meter buffer retries, spooling to disk meanwhile.
    Closing it leaves the bus open (it is shared)."""

    def __init__(self, bus: RedisBus, stream: str = METER_STREAM) -> None:
        self.bus = bus
        self.stream = stream

    async def write_batch(self, events: Sequence[MeterEvent]) -> None:
        if events:
            fields = {EVENTS_FIELD: usage_ndjson(events)}
            await self.bus.call("meter events", lambda client: client.xadd(self.stream, fields))

    async def close(self) -> None:
        pass
