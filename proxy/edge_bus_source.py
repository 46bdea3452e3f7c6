# Edge state from the Redis edge bus (config.bus), for a FollowedEdgeState: the whole
# state from its hash, then the changes stream read from where that state was taken.
# A follower never applies an older version over a newer one: entries at or below
# the version held are skipped, and a gap in versions (entries trimmed before it read
# them) means pulling the whole state again.
from __future__ import annotations

import msgspec
import redis.asyncio as redis
from redis.exceptions import RedisError

from config.bus import EDGE_CHANGES, EDGE_STATE
from config.documents import decode_value
from config.edge_state_file import Customer, EdgeStateFile
from proxy.followed_edge_state import EdgeStateUnavailable, WireChanges, WireState

REDIS_TIMEOUT_S = 2.0
BLOCK_S = 1.0                   # below the socket timeout: a blocking read is a plain read
ENTRIES_PER_READ = 100


class _Changed(msgspec.Struct):
    customers: list[Customer] = []
    removed: list[str] = []


class EdgeBusSource:
    """The edge state on the bus at `redis_url` (an EdgeStateSource)."""

    def __init__(self, redis_url: str, timeout_s: float = REDIS_TIMEOUT_S) -> None:
        self.where = redis_url
        self.client = redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.version = 0
        self.position = "0-0"

    async def pull(self) -> WireState:
        try:
            fields = await self.client.hgetall(EDGE_STATE)
        except (RedisError, OSError) as error:
            raise EdgeStateUnavailable(f"Redis at {self.where}: {error}") from error
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
        try:
            answer = await self.client.xread({EDGE_CHANGES: self.position}, count=ENTRIES_PER_READ,
                                             block=int(min(wait_s, BLOCK_S) * 1000) or None)
        except (RedisError, OSError) as error:
            raise EdgeStateUnavailable(f"Redis at {self.where}: {error}") from error
        customers: dict[str, Customer] = {}
        removed: set[str] = set()
        for entry_id, fields in answer[0][1] if answer else ():
            self.position = entry_id.decode()
            version = int(fields[b"version"])
            if version <= self.version:
                continue                                    # already in the state held
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
        await self.client.aclose()
