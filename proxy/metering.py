# Meter events leave the request path through a MeterBuffer: record() is O(1) and never
# awaits; one task sends batches to a MeterSink, retries a failed batch, and overflow goes
# to a disk spool. Memory is written ahead to a journal every JOURNAL_INTERVAL_S, so a
# crash loses at most that window. Only an unwritable disk loses events, each one counted
# and logged.
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from proxy.meter_event import (
    EventIds,
    MeterEvent,
    decode_event,
    decode_ndjson,
    encode_ndjson,
    new_event_id,
)
from proxy.meter_journal import JOURNAL_INTERVAL_S, MeterJournal
from proxy.meter_spool import (
    MeterSpool,
    Segment,
    fsync_files,
    read_segment_file,
    write_segment_file,
)

__all__ = [
    "EventIds", "MeterBuffer", "MeterEvent", "MeterSink", "NdjsonFileSink",
    "decode_event", "decode_ndjson", "encode_ndjson", "new_event_id",
]

log = logging.getLogger("aforo.metering")

CAPACITY_EVENTS = 100_000
BATCH_EVENTS = 500
FLUSH_INTERVAL_S = 1.0
# Overflow is written to the spool from record() itself, a chunk at a time: a chunk is
# one buffered write to the OS page cache (no fsync), so record() stays O(1) amortised
# and memory stays bounded by capacity + one chunk even while the sink task is stuck.
SPILL_CHUNK_EVENTS = 256
SEGMENT_EVENTS = 10_000
RETRY_INITIAL_S = 0.1
RETRY_MAX_S = 5.0
# Meter events encoded between two turns of the event loop (about 0.1 ms of work).
ENCODE_SLICE_EVENTS = 128


@runtime_checkable
class MeterSink(Protocol):
    """Where meter events go: a file, the control plane's ingest, a stream.

    `write_batch(events)` returns once every event is stored and raises on any
    failure. The buffer then sends the very same batch again, so a sink must accept
    a batch twice (events carry `id` as idempotency key) and should leave nothing
    behind from a failed attempt where it can. `close()` releases its resources.
    """

    async def write_batch(self, events: Sequence[MeterEvent]) -> None: ...

    async def close(self) -> None: ...


class NdjsonFileSink:
    """Appends meter events to one NDJSON file, one JSON object per line.

    Each batch is written and fsynced once, in a dedicated writer thread, so the event
    loop never waits on the disk; batches land in call order. The parent directories
    are created on first write. A batch that fails mid-write is cut back off the file
    (truncated to where it began) before the error is raised, so the retry writes it
    exactly once. The file must have no other writer while the sink is open.
    A batch whose write_batch call was cancelled may still land, and land again on retry.
    """

    def __init__(self, path: str | os.PathLike, *, loop: asyncio.AbstractEventLoop | None = None):
        self.path = Path(path)
        self._loop = loop
        self._fd: int | None = None
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="aforo-meter-file")
        self._closed = False

    async def write_batch(self, events: Sequence[MeterEvent]) -> None:
        """Append `events` and fsync. No events: nothing happens. Raises OSError when
        the file cannot be written, RuntimeError after close()."""
        if self._closed:
            raise RuntimeError(f"meter file sink {self.path} is closed")
        if not events:
            return
        # Encoded a slice at a time, letting requests run in between: one big batch
        # encoded at once would hold the event loop for milliseconds.
        parts = []
        for start in range(0, len(events), ENCODE_SLICE_EVENTS):
            if start:
                await asyncio.sleep(0)
            parts.append(encode_ndjson(events[start:start + ENCODE_SLICE_EVENTS]))
        data = b"".join(parts)
        loop = self._loop or asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._append, data)

    def _append(self, data: bytes) -> None:
        # Runs in the writer thread.
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        fd = self._fd
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise

    def _close_file(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    async def close(self) -> None:
        """Wait for batches in flight, close the file and the writer thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop = self._loop or asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._writer, self._close_file)
        finally:
            self._writer.shutdown(wait=False)


class _Replay:
    # A spool segment read back into memory, delivered from `offset` on.
    __slots__ = ("segment", "events", "offset")

    def __init__(self, segment: Segment, events: list[MeterEvent]):
        self.segment = segment
        self.events = events
        self.offset = 0


class MeterBuffer:
    """Buffers meter events between the request path and a MeterSink.

    Order: events reach the sink in the order recorded. Once anything waits in the
    spool, new events queue behind it in the spool too, until the spool has been
    replayed; memory is therefore always older than the spool, and is sent first.
    Only when the spool cannot be written do events that still fit go to memory
    instead (order yields to keeping the event).

    Delivery: a batch is sent when `batch_events` are in memory, or `flush_interval_s`
    after the last flush, or at once while the spool has a backlog. A failed batch
    stays where it was and is retried after 0.1 s, doubling to at most 5 s (see
    `retry_initial_s`, `retry_max_s`). Within one process every event reaches the sink
    once per successful write_batch; after a crash (not a close) spooled events that
    had already been sent may be sent again, which the ids make harmless.

    Crashes: every event in memory is written to the journal (`spool_dir/journal`) at
    the next group commit, at most `journal_interval_s` after it was recorded (the run()
    task commits; commit() does it at once), and overflow waiting for its spool chunk is
    written to the spool then too. A process that dies without close() therefore loses
    at most the events of its last `journal_interval_s`; the next buffer on this
    spool_dir replays the journal first. (Written to the OS, not fsynced: a power loss
    may lose more; close() fsyncs the spool.)

    Counters: `depth` (events in memory, including overflow waiting for its spool
    chunk), `spooled_events` (on disk in the spool, not yet delivered),
    `recorded_total`, `flushed_total` (delivered), `spilled_total` (routed to the
    spool), `lost_total` (could be neither kept nor spooled), `sink_errors_total`.
    recorded_total == flushed_total + depth + spooled_events + lost_total, up to the
    rare events both spooled in a torn write and kept in memory.

    The spool directory belongs to this buffer alone; construction takes over the
    segments an earlier run left there (a blocking scan, once, at start-up; an unusable
    directory is logged and overflow then counts as lost). Everything runs on the event
    loop's thread; disk reads and rewrites of whole segments go to the default executor.
    `clock` is a monotonic clock in seconds (time.monotonic), used for flush
    intervals, retries and close()'s timeout.
    """

    def __init__(
        self,
        sink: MeterSink,
        *,
        capacity_events: int = CAPACITY_EVENTS,
        batch_events: int = BATCH_EVENTS,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        spool_dir: str | os.PathLike,
        loop: asyncio.AbstractEventLoop,
        clock: Callable[[], float],
        spill_chunk_events: int = SPILL_CHUNK_EVENTS,
        segment_events: int = SEGMENT_EVENTS,
        retry_initial_s: float = RETRY_INITIAL_S,
        retry_max_s: float = RETRY_MAX_S,
        journal_interval_s: float = JOURNAL_INTERVAL_S,
    ):
        if batch_events < 1:
            raise ValueError(f"batch_events must be at least 1, got {batch_events}")
        if capacity_events < batch_events:
            raise ValueError(f"capacity_events ({capacity_events}) must hold a batch ({batch_events})")
        if not flush_interval_s > 0:
            raise ValueError(f"flush_interval_s must be positive, got {flush_interval_s}")
        if spill_chunk_events < 1:
            raise ValueError(f"spill_chunk_events must be at least 1, got {spill_chunk_events}")
        if not 0 < retry_initial_s <= retry_max_s:
            raise ValueError(f"need 0 < retry_initial_s ({retry_initial_s}) <= retry_max_s ({retry_max_s})")
        self._sink = sink
        self._capacity = capacity_events
        self._batch_events = batch_events
        self._flush_interval_s = flush_interval_s
        self._spill_chunk_events = spill_chunk_events
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._journal_interval_s = journal_interval_s
        self._loop = loop
        self._clock = clock

        self.recorded_total = 0
        self.flushed_total = 0
        self.spilled_total = 0
        self.lost_total = 0
        self.sink_errors_total = 0

        self._memory: collections.deque[MeterEvent] = collections.deque()
        self._spill_pending: list[MeterEvent] = []
        self._spool = MeterSpool(spool_dir, segment_events=segment_events)
        self._journal = MeterJournal(Path(spool_dir) / "journal")
        self._unjournaled: list[MeterEvent] = []     # in memory, not yet in the journal
        self._memory_out = 0                         # events that ever left memory
        self._last_commit = clock()
        self._replay: _Replay | None = None
        self._spilling = False
        self._closing = False
        self._last_flush = clock()
        self._retry_at = -math.inf
        self._retry_s = retry_initial_s
        self._wakeup = asyncio.Event()
        self._pass_lock = asyncio.Lock()
        self._run_task: asyncio.Task | None = None
        try:
            self._spool.open()
            journaled = self._spool.take_in_front(self._journal.left_by_earlier_run())
            if journaled:
                log.warning("meter journal %s holds %d events of a run that ended without closing; "
                            "replaying them first", self._journal.directory, journaled)
        except OSError as error:
            log.error("meter spool %s is unusable (%s); overflow will be lost until it can be written",
                      self._spool.directory, error)
        if self._spool.events:
            # Events left by an earlier run are older than anything recorded now.
            self._spilling = True
            log.info("meter spool %s holds %d events from an earlier run; replaying them first",
                     self._spool.directory, self._spool.events)

    # -- counters -----------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Events held in memory, including a batch being sent and overflow waiting for
        its spool chunk."""
        return len(self._memory) + len(self._spill_pending)

    @property
    def spooled_events(self) -> int:
        """Events on disk in the spool, not yet delivered."""
        return self._spool.events

    @property
    def spool_dir(self) -> Path:
        """The directory of this buffer's disk spool."""
        return self._spool.directory

    # -- request path ---------------------------------------------------------------
    def record(self, event: MeterEvent) -> None:
        """Take one meter event. Synchronous and O(1) (a spill chunk write every
        `spill_chunk_events` overflowing events); never awaits, never raises for
        overload. Memory full (or a spool backlog to queue behind) -> the spool;
        spool unwritable -> memory if it has room, else counted in lost_total and
        logged. Still accepted after close(): written straight to the spool."""
        self.recorded_total += 1
        memory = self._memory
        if not self._spilling and len(memory) < self._capacity:
            memory.append(event)
            self._unjournaled.append(event)
            depth = len(memory)
            if depth == 1 or depth == self._batch_events:
                self._wakeup.set()
            return
        self._spilling = True
        self.spilled_total += 1
        pending = self._spill_pending
        pending.append(event)
        if len(pending) >= self._spill_chunk_events:
            self._write_spill()

    def _write_spill(self) -> None:
        events = self._spill_pending
        if not events:
            return
        self._spill_pending = []
        try:
            self._spool.append(events)
        except Exception as error:     # never out of record(): keep or count every event
            room = max(0, self._capacity - len(self._memory))
            kept = events[:room]
            self._take_into_memory(kept)
            lost = len(events) - len(kept)
            self.lost_total += lost
            if lost:
                log.error("meter spool %s cannot be written (%s): %d meter events lost (%d kept in memory)",
                          self._spool.directory, error, lost, len(kept))
            else:
                log.error("meter spool %s cannot be written (%s): %d meter events kept in memory instead",
                          self._spool.directory, error, len(kept))
            if kept:
                self._wakeup.set()

    def _take_into_memory(self, events: Sequence[MeterEvent]) -> None:
        self._memory.extend(events)
        self._unjournaled.extend(events)

    def commit(self) -> None:
        """Group commit: write the events that entered memory since the last commit to
        the journal and the overflow waiting for its chunk to the spool, then drop the
        journal files whose events have all left memory. A journal that cannot be
        written is logged; its events stay in memory (only a crash would lose them)."""
        self._last_commit = self._clock()
        self._write_spill()
        events, self._unjournaled = self._unjournaled, []
        try:
            self._journal.write(events, self._memory_out + len(self._memory))
            self._journal.forget(self._memory_out)
        except OSError as error:
            log.error("meter journal %s cannot be written (%s); %d meter events are only in memory "
                      "until delivered", self._journal.directory, error, len(events))

    def _seconds_until_commit(self, now: float) -> float:
        # While anything is in memory, commit every journal interval (delivered events
        # are forgotten then too).
        if not (self._memory or self._spill_pending):
            return math.inf
        return self._last_commit + self._journal_interval_s - now

    # -- delivery -------------------------------------------------------------------
    async def run(self) -> None:
        """Deliver until close(): wake when a batch is full, the flush interval is
        up, a retry is due or the spool has a backlog, then flush_due(). Meant to run
        as one task for the buffer's lifetime; returns once close() begins."""
        self._run_task = asyncio.current_task()
        while not self._closing:
            self._wakeup.clear()
            now = self._clock()
            if self._seconds_until_commit(now) <= 0:
                self.commit()
            wait_s = min(self._seconds_until_due(now), self._seconds_until_commit(now))
            if wait_s > 0:
                try:
                    await asyncio.wait_for(self._wakeup.wait(), None if wait_s == math.inf else wait_s)
                except TimeoutError:
                    pass
                continue
            try:
                await self.flush_due()
            except Exception:          # the buffer outlives any one bad pass
                log.exception("meter delivery pass failed; retrying")
                self._back_off()

    def _seconds_until_due(self, now: float) -> float:
        # 0 exactly when flush_due() has something to do at `now`.
        if now < self._retry_at:
            return self._retry_at - now
        depth = len(self._memory)
        if depth:
            if depth >= self._batch_events or self._spilling or self._closing:
                return 0.0
            return max(0.0, self._last_flush + self._flush_interval_s - now)
        if self._spill_pending or self._spool.events or self._replay is not None:
            return 0.0
        return math.inf

    async def flush_due(self) -> int:
        """One delivery pass at clock(): send every batch that is due — full batches
        from memory, all of memory once the flush interval is up (or while closing
        or spooling), then, with memory empty, the spool oldest first. Stops at the
        first failure: the batch stays, sink_errors_total counts it and the retry is
        scheduled (a pass before then does nothing). Returns the events delivered."""
        async with self._pass_lock:
            delivered = 0
            while self._clock() >= self._retry_at:
                now = self._clock()
                batch = self._memory_batch_due(now)
                from_memory = batch is not None
                if batch is None:
                    if self._memory:
                        break
                    try:
                        batch = await self._spool_batch()
                    except OSError as error:
                        log.error("meter spool %s cannot be read (%s); retrying", self._spool.directory, error)
                        self._back_off()
                        break
                    if batch is None:
                        break
                try:
                    await self._sink.write_batch(batch)
                except Exception as error:
                    self.sink_errors_total += 1
                    delay_s = self._back_off()
                    log.warning("meter sink failed (%r); %d events kept, retry in %.1f s", error, len(batch), delay_s)
                    break
                self._retry_s = self._retry_initial_s
                if from_memory:
                    popleft = self._memory.popleft
                    for _ in range(len(batch)):
                        popleft()
                    self._memory_out += len(batch)
                    self._last_flush = self._clock()
                else:
                    self._spool_delivered(len(batch))
                self.flushed_total += len(batch)
                delivered += len(batch)
            return delivered

    def _memory_batch_due(self, now: float) -> list[MeterEvent] | None:
        memory = self._memory
        depth = len(memory)
        if not depth:
            return None
        if (depth >= self._batch_events or self._spilling or self._closing
                or now - self._last_flush >= self._flush_interval_s):
            return list(itertools.islice(memory, min(depth, self._batch_events)))
        return None

    async def _spool_batch(self) -> list[MeterEvent] | None:
        # The next batch to replay from the spool, reading the oldest segment when
        # none is loaded. None when the spool is empty (then new events may use
        # memory again). Raises OSError when a segment cannot be read.
        while self._replay is None:
            pending = self._spill_pending
            if self._spool.is_empty() and len(pending) <= self._capacity - len(self._memory):
                # Nothing older on disk: the overflow not yet written is next in line and
                # memory is empty, so it moves there and the spool is done.
                self._take_into_memory(pending)
                self._spill_pending = []
                if not self._closing:
                    self._spilling = False
                return None
            self._write_spill()
            segment = self._spool.oldest()
            if segment is None:        # the spool could not take the overflow: it went to memory
                return None
            events, bad_lines = await self._loop.run_in_executor(None, read_segment_file, segment.path)
            self._spool.loaded(segment, len(events))
            if bad_lines:
                self.lost_total += bad_lines
                log.error("meter spool segment %s: %d lines are not meter events (torn write?); those events are lost",
                          segment.path, bad_lines)
            if events:
                self._replay = _Replay(segment, events)
            else:
                self._remove_segment(segment)
        replay = self._replay
        return replay.events[replay.offset:replay.offset + self._batch_events]

    def _spool_delivered(self, count: int) -> None:
        replay = self._replay
        replay.offset += count
        self._spool.delivered(replay.segment, count)
        if replay.offset >= len(replay.events):
            self._replay = None
            self._remove_segment(replay.segment)

    def _remove_segment(self, segment: Segment) -> None:
        try:
            self._spool.remove_oldest(segment)
        except OSError as error:
            log.error("meter spool segment %s was delivered but cannot be deleted (%s); "
                      "a restart would deliver its events again", segment.path, error)

    def _back_off(self) -> float:
        delay_s = self._retry_s
        self._retry_at = self._clock() + delay_s
        self._retry_s = min(delay_s * 2, self._retry_max_s)
        return delay_s

    # -- shutdown -------------------------------------------------------------------
    async def close(self, timeout_s: float) -> None:
        """Deliver everything in memory and in the spool within `timeout_s` (by
        clock()), retrying a failing sink with the usual back-off while time is left;
        then write what is still undelivered to the spool (memory in front, a
        partly replayed segment cut to its rest) and fsync it, so the next buffer on
        this spool_dir replays exactly those events. Events recorded during and after
        close() go to the spool. Waits for run() to finish its pass, cancelling it at
        the deadline. Does not close the sink. Idempotent."""
        if self._closing:
            return
        self._closing = True
        self._spilling = True
        deadline = self._clock() + timeout_s
        # Bounded by the loop's time as well, so close() ends even if clock() stalls.
        loop_deadline = self._loop.time() + timeout_s

        def time_left_s() -> float:
            return min(deadline - self._clock(), loop_deadline - self._loop.time())

        self._wakeup.set()
        task = self._run_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            await asyncio.wait({task}, timeout=max(0.0, time_left_s()))
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        self._retry_at = -math.inf         # one more attempt now, whatever the back-off said
        while self._has_backlog() and time_left_s() > 0:
            now = self._clock()
            if now < self._retry_at:
                if self._retry_at >= deadline:
                    break
                await asyncio.sleep(min(self._retry_at - now, time_left_s()))
                continue
            try:
                await asyncio.wait_for(self.flush_due(), time_left_s())
            except TimeoutError:
                break
        await self._spool_leftovers()
        self._spill_chunk_events = 1       # late events go straight to the file,
        self._spool.write_through = True   # which is closed after each one

    def _has_backlog(self) -> bool:
        return bool(self._memory or self._spill_pending or self._spool.events or self._replay is not None)

    async def _spool_leftovers(self) -> None:
        async with self._pass_lock:
            self._write_spill()
            loop = self._loop
            replay, self._replay = self._replay, None
            if replay is not None:
                rest = replay.events[replay.offset:]
                try:
                    await loop.run_in_executor(None, write_segment_file, replay.segment.path, rest)
                    self._spool.rewritten(replay.segment, len(rest))
                except OSError as error:
                    log.error("meter spool segment %s cannot be cut to its %d undelivered events (%s); "
                              "the next start delivers its first %d events again",
                              replay.segment.path, len(rest), error, replay.offset)
            if self._memory:
                events = list(self._memory)
                self._memory.clear()
                self._unjournaled = []
                segment = self._spool.new_front_segment()
                try:
                    await loop.run_in_executor(None, write_segment_file, segment.path, events)
                    self._spool.add_front(segment, len(events))
                    self._memory_out += len(events)
                except OSError as error:
                    self.lost_total += len(events)
                    log.error("meter spool %s cannot be written at shutdown (%s): %d meter events lost",
                              self._spool.directory, error, len(events))
            paths = self._spool.unsynced_paths()
            try:
                await loop.run_in_executor(None, fsync_files, paths)
            except OSError as error:
                log.error("meter spool %s cannot be synced to disk (%s); a power loss may lose spooled events",
                          self._spool.directory, error)
            try:
                self._journal.close(self._memory_out)
            except OSError as error:
                log.error("meter journal %s cannot be removed (%s); the next start delivers its events again",
                          self._journal.directory, error)
