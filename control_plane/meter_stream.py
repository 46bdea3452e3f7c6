# Reading the meter stream (config.bus): every control-plane worker is a consumer in
# one group. An entry (a proxy's batch) is taken in through the same intake as
# POST /v1/events, then acknowledged and deleted; only then is it done. An entry
# whose worker died before acknowledging it stays pending in the group, and after
# `claim_idle_ms` another worker claims it and takes it in again: the store keeps
# each event once by its id, so nothing is lost or counted twice.
#
# Nothing wedges the stream: the events of an entry ingest refuses (each with its
# reason) go to the store's dead letters, the rest of the entry is kept, and the
# entry is done. An entry that fails in another way than the store being away (it
# refuses the entry's data, or taking it in raises) is tried MAX_ATTEMPTS times by a
# consumer, then its events go to the dead letters with why, and the stream moves on.
from __future__ import annotations

import asyncio
import logging

import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

from config.bus import EVENTS_FIELD, METER_GROUP, METER_STREAM
from control_plane.ingest import PROXY_SOURCE, REJECTED
from control_plane.intake import Intake
from control_plane.store import USAGE, DeadLetter, StoreError

log = logging.getLogger("aforo.control_plane")

ENTRIES_PER_READ = 16
BLOCK_MS = 1000
CLAIM_IDLE_MS = 30_000
MAX_ATTEMPTS = 3
DEAD_LETTER_SOURCE = "meter-stream"
RETRY_INITIAL_S = 0.2
RETRY_MAX_S = 5.0


class MeterStreamConsumer:
    """Consumer `name` of the meter stream's group on `client` (a redis.asyncio
    client), taking entries in through `intake`; `count_dead_letters(n)` hears of
    each n events put in the dead letters."""

    def __init__(self, client: redis.Redis, intake: Intake, name: str, *, stream: str = METER_STREAM,
                 group: str = METER_GROUP, claim_idle_ms: int = CLAIM_IDLE_MS, block_ms: int = BLOCK_MS,
                 count_dead_letters=None) -> None:
        self.client = client
        self.intake = intake
        self.name = name
        self.stream = stream
        self.group = group
        self.claim_idle_ms = claim_idle_ms
        self.block_ms = block_ms
        self.events_rejected = 0
        self._count_dead_letters = count_dead_letters     # e.g. a Prometheus counter's inc
        self._attempts: dict[bytes, int] = {}

    async def join_group(self) -> None:
        """Create the group (and the stream) unless it exists; a new group starts with
        every entry already in the stream."""
        try:
            await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def run(self) -> None:
        """Join the group, then take entries in until cancelled; a store or Redis
        failure is logged and retried with backoff (the entries stay pending, nothing
        is acknowledged)."""
        joined = False
        delay = RETRY_INITIAL_S
        while True:
            try:
                if not joined:
                    await self.join_group()
                    joined = True
                await self.step()
                delay = RETRY_INITIAL_S
            except (StoreError, RedisError, OSError) as error:
                # A Redis that lost its data has no group any more: join it again.
                joined = joined and "NOGROUP" not in str(error)
                log.warning("meter stream: %s; retrying in %.1f s", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def step(self, block_ms: int | None = None) -> int:
        """One round: this consumer's own pending entries (left by a failure), then
        entries of other consumers idle for claim_idle_ms (a worker that died), then
        new ones (waiting up to `block_ms`). Returns how many entries were done."""
        own = await self._read("0")
        if own:
            return await self._take(own)
        _, claimed, *_ = await self.client.xautoclaim(self.stream, self.group, self.name, self.claim_idle_ms,
                                                      start_id="0-0", count=ENTRIES_PER_READ)
        if claimed:
            return await self._take(claimed)
        return await self._take(await self._read(">", self.block_ms if block_ms is None else block_ms))

    async def _take_entry(self, entry_id: bytes, lines: list[bytes]) -> None:
        # Take the entry's events in; what cannot be goes to the dead letters. Raises
        # (the entry stays pending) while the store is away, or for a failure of
        # another kind until it has been tried MAX_ATTEMPTS times.
        try:
            report = await self.intake.take(USAGE, lines, PROXY_SOURCE)
        except StoreError as error:
            if not error.permanent:
                raise
            await self._dead_letters(entry_id, lines, [f"the store cannot keep it: {error}"] * len(lines))
            return
        except Exception as error:  # noqa: BLE001 - a poison entry must not wedge the stream
            attempts = self._attempts[entry_id] = self._attempts.get(entry_id, 0) + 1
            if attempts < MAX_ATTEMPTS:
                raise StoreError(f"entry {entry_id!r} could not be taken in ({error!r}); trying it again") from error
            del self._attempts[entry_id]
            log.exception("meter stream: entry %s failed %d times; its events go to the dead letters",
                          entry_id, attempts)
            await self._dead_letters(entry_id, lines, [f"taking it in failed: {error!r}"] * len(lines))
            return
        self._attempts.pop(entry_id, None)
        if report.rejected:
            refused = [(lines[result.index], result.reason) for result in report.results if result.status == REJECTED]
            self.events_rejected += len(refused)
            log.error("meter stream: %d of the events of entry %s were rejected (kept as dead letters); first: %s",
                      len(refused), entry_id, refused[0][1])
            await self._dead_letters(entry_id, [line for line, _ in refused], [reason for _, reason in refused])

    async def _dead_letters(self, entry_id: bytes, lines: list[bytes], reasons: list[str]) -> None:
        at = self.intake.clock()
        await self.intake.store.add_dead_letters([
            DeadLetter(DEAD_LETTER_SOURCE, entry_id.decode(), line, reason, at) for line, reason in zip(lines, reasons)])
        if self._count_dead_letters is not None:
            self._count_dead_letters(len(lines))

    async def _read(self, start: str, block_ms: int | None = None):
        answer = await self.client.xreadgroup(self.group, self.name, {self.stream: start}, count=ENTRIES_PER_READ,
                                              block=block_ms)
        return answer[0][1] if answer else []

    async def _take(self, entries) -> int:
        done = 0
        for entry_id, fields in entries:
            if fields:                  # (a claimed entry deleted meanwhile comes back empty)
                lines = [line for line in fields.get(EVENTS_FIELD.encode(), b"").splitlines() if line.strip()]
                await self._take_entry(entry_id, lines)
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xack(self.stream, self.group, entry_id)
                pipe.xdel(self.stream, entry_id)
                await pipe.execute()
            done += 1
        return done
