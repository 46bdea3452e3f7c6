# Edge state from the Redis edge bus (config.bus), for a FollowedEdgeState: the whole
# state from its hash, then the changes stream read from where that state was taken.
# A follower never applies an older version over a newer one: any entry but the next
# version (a gap: entries trimmed before it read them; or a lower one: a Redis that
# lost its data) means pulling the whole state again.
from __future__ import annotations

import msgspec

from config.bus import EDGE_CHANGES, EDGE_STATE
from config.documents import decode_value
from config.edge_state_file import Customer, EdgeStateFile
from proxy.followed_edge_state import EdgeStateUnavailable, WireChanges, WireState
from proxy.redis_bus import BLOCK_S, BusUnavailable, RedisBus

ENTRIES_PER_READ = 100


class _Changed(msgspec.Struct):
    customers: list[Customer] = []
    removed: list[str] = []


class EdgeBusSource:
    """The edge state on the RedisBus `bus` (an EdgeStateSource). Closing it leaves
    the bus open (it is shared)."""

    def __init__(self, bus: RedisBus) -> None:
        self.bus = bus
        self.where = bus.where
        self.version = 0
        self.position = "0-0"

    async def pull(self) -> WireState:
        try:
            fields = await self.bus.call("edge state", lambda client: client.hgetall(EDGE_STATE))
        except BusUnavailable as error:
            raise EdgeStateUnavailable(str(error)) from error
        if not fields:
            raise EdgeStateUnavailable(f"no edge state is published on {self.where} yet")
        try:
            state = msgspec.json.decode(fields[b"state"], type=EdgeStateFile, dec_hook=decode_value)
        except msgspec.DecodeError as error:
            raise EdgeStateUnavailable(f"the edge state on {self.where} cannot be read: {error}") from error
        self.version = int(fields[b"version"])
        self.position = fields[b"entry"].decode()        # its resync entry: changes follow it
        return WireState(str(self.version), state)

    async def changes(self, since: str, wait_s: float) -> WireChanges:
        if since != str(self.version):
            return WireChanges(str(self.version), resync=True)        # the follower lost its place
        position = self.position
        block_ms = int(min(wait_s, BLOCK_S) * 1000) or None
        try:
            answer = await self.bus.call(
                "edge state changes",
                lambda client: client.xread({EDGE_CHANGES: position}, count=ENTRIES_PER_READ, block=block_ms),
                blocking=True)
        except BusUnavailable as error:
            raise EdgeStateUnavailable(str(error)) from error
        customers: dict[str, Customer] = {}
        removed: set[str] = set()
        for entry_id, fields in answer[0][1] if answer else ():
            self.position = entry_id.decode()
            version = int(fields[b"version"])
            # Entries after the position rise in version (numbered and appended in one
            # script): one at or below the version held means the bus lost its data
            # and counts again from 1, a gap that entries were trimmed. Both: pull.
            if version != self.version + 1 or b"resync" in fields:
                return WireChanges(str(version), resync=True)
            try:
                changed = msgspec.json.decode(fields[b"changes"], type=_Changed, dec_hook=decode_value)
            except (KeyError, msgspec.DecodeError) as error:
                raise EdgeStateUnavailable(f"a change on {self.where} cannot be read: {error}") from error
            for customer in changed.customers:
                customers[customer.id] = customer
                removed.discard(customer.id)
            for customer_id in changed.removed:
                customers.pop(customer_id, None)
                removed.add(customer_id)
            self.version = version
        return WireChanges(str(self.version), list(customers.values()), sorted(removed))

    async def close(self) -> None:
        pass
