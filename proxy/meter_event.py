# One meter event per completed response, and its NDJSON wire form (one JSON object a
# line). An event's `id` is its idempotency key: 32 hex chars, a random 64-bit prefix
# per process (fresh after fork) and a 64-bit counter, so ids never repeat.
from __future__ import annotations

import os
from collections.abc import Iterable

import msgspec

EVENT_ID_HEX_CHARS = 32


class MeterEvent(msgspec.Struct, frozen=True, gc=False):
    """Usage of one request, recorded when its response completed.

    `id`: idempotency key (see `new_event_id`); `customer_id`, `metric` and
    `quantity` (whole units) say what is billed; `timestamp`: epoch seconds when the
    response completed; `route`, `status`, `request_bytes`, `response_bytes` and
    `latency_ms` describe the exchange; `dimensions` says more about what was used
    (e.g. the AI `model`, the MCP `tool`). Unknown fields are ignored when decoding,
    so a spool written by a newer proxy still replays on an older one, and a missing
    `dimensions` reads as None (none: most events), so an older spool replays on a
    newer one.
    """

    id: str
    customer_id: str
    metric: str
    quantity: int
    timestamp: float
    route: str
    status: int
    request_bytes: int
    response_bytes: int
    latency_ms: float
    dimensions: dict[str, str] | None = None


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(MeterEvent)


def encode_ndjson(events: Iterable[MeterEvent]) -> bytes:
    """The events as NDJSON: one JSON object per event, each ending in a newline.
    No events give b""."""
    return _ENCODER.encode_lines(events)


def decode_event(line: bytes) -> MeterEvent:
    """One NDJSON line (with or without its newline) back into a MeterEvent.
    Raises msgspec.DecodeError (ValidationError included) for a line that is not a
    complete, well-typed event, e.g. a line torn by a crash mid-write."""
    return _DECODER.decode(line)


def decode_ndjson(data: bytes) -> tuple[list[MeterEvent], int]:
    """Every event in an NDJSON document, in order, and the number of lines that
    could not be decoded (skipped). Blank lines are neither events nor errors."""
    events = []
    bad_lines = 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            events.append(_DECODER.decode(line))
        except msgspec.DecodeError:
            bad_lines += 1
    return events, bad_lines


class EventIds:
    """A source of event ids: `prefix` (64 bits; random when None) followed by a
    counter from 0, both as 16 lowercase hex chars.

    Ids from one source never repeat (2**64 of them). Two sources collide only if
    their random prefixes do: a chance of 2**-64 per pair of processes, so ids stay
    unique across processes, hosts and restarts without coordination.
    """

    def __init__(self, prefix: int | None = None):
        if prefix is None:
            prefix = int.from_bytes(os.urandom(8), "big")
        if not 0 <= prefix < 1 << 64:
            raise ValueError(f"an event id prefix is 64 bits, got {prefix}")
        self.prefix = prefix
        self.prefix_hex = "%016x" % prefix
        self._counter = 0

    def next(self) -> str:
        """The next id: 32 hex chars. Cheap: one counter step and one format."""
        event_id = f"{self.prefix_hex}{self._counter:016x}"
        self._counter += 1
        return event_id


_PROCESS_IDS = EventIds()


def _reseed_after_fork() -> None:
    # A forked child would otherwise continue the parent's prefix and counter and
    # hand out the very ids the parent is about to use.
    global _PROCESS_IDS
    _PROCESS_IDS = EventIds()


os.register_at_fork(after_in_child=_reseed_after_fork)


def new_event_id() -> str:
    """A fresh event id for this process (see EventIds): 32 lowercase hex chars,
    unique across processes and restarts; a forked child gets its own prefix."""
    return _PROCESS_IDS.next()


def process_id_prefix() -> str:
    """The 16 hex chars every id from `new_event_id()` in this process starts with."""
    return _PROCESS_IDS.prefix_hex
