# Meter events waiting on disk: NDJSON segment files `segment-<20-digit sequence>.ndjson`
# in a directory owned by one MeterBuffer, replayed in sequence order. A segment is
# deleted only after all its events were delivered, so a crash can repeat events, never lose them.
from __future__ import annotations

import collections
import os
import re
from collections.abc import Sequence
from pathlib import Path

from proxy.meter_event import MeterEvent, decode_ndjson, encode_ndjson

SEGMENT_NAME = re.compile(r"segment-(\d{20})\.ndjson")
# New spools start here, leaving room below for segments put in front at shutdown
# (one per graceful stop), so sequence numbers never go negative in practice.
FIRST_SEQUENCE = 10**12
_TMP_SUFFIX = ".tmp"


def segment_name(sequence: int) -> str:
    """The file name of segment number `sequence` (sorts like the number)."""
    return f"segment-{sequence:020d}.ndjson"


class Segment:
    """One segment file: its `sequence`, `path` and the number of `events` it holds
    and has not yet delivered (a line count until the file is read back)."""

    __slots__ = ("sequence", "path", "events", "synced")

    def __init__(self, sequence: int, path: Path, events: int, synced: bool):
        self.sequence = sequence
        self.path = path
        self.events = events
        self.synced = synced

    def __repr__(self):
        return f"Segment({self.path.name}, events={self.events})"


def read_segment_file(path: Path) -> tuple[list[MeterEvent], int]:
    """The events of a segment file in order, and how many lines could not be decoded
    (a line torn by a crash mid-write). Blocking: call it from a worker thread.
    Raises OSError when the file cannot be read."""
    with open(path, "rb") as segment_file:
        return decode_ndjson(segment_file.read())


def write_segment_file(path: Path, events: Sequence[MeterEvent]) -> None:
    """Write `events` as the whole content of `path`, atomically: a temporary file is
    written and fsynced, then renamed over `path`, and the directory fsynced. Either
    the old content or the new survives a crash. Blocking: call it from a worker
    thread. Raises OSError; the temporary file is then removed."""
    tmp_path = path.with_name(path.name + _TMP_SUFFIX)
    try:
        with open(tmp_path, "wb") as segment_file:
            segment_file.write(encode_ndjson(events))
            segment_file.flush()
            os.fsync(segment_file.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except OSError:
            pass
        raise
    fsync_directory(path.parent)


def fsync_files(paths: Sequence[Path]) -> None:
    """fsync each file and then their directory. Blocking: call it from a worker
    thread. Raises OSError on the first failure."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if paths:
        fsync_directory(paths[0].parent)


def fsync_directory(directory: Path) -> None:
    """fsync a directory so created, renamed and deleted entries survive a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _count_lines(path: Path) -> int:
    count = 0
    last = b"\n"
    with open(path, "rb") as segment_file:
        while chunk := segment_file.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


class MeterSpool:
    """The segment files of one spool directory, oldest first, and the one being
    appended to ("active"). Not thread-safe: used from the event loop's thread; the
    blocking reads and rewrites it hands out (read_segment_file, write_segment_file,
    fsync_files) touch only files the spool no longer appends to.

    `events` counts the events on disk not yet delivered.
    """

    def __init__(self, directory: str | os.PathLike, *, segment_events: int):
        if segment_events < 1:
            raise ValueError(f"segment_events must be at least 1, got {segment_events}")
        self.directory = Path(directory)
        self.segment_events = segment_events
        self.events = 0
        self._segments: collections.deque[Segment] = collections.deque()   # closed, oldest first
        self._active: Segment | None = None
        self._active_file = None
        self._next_sequence = FIRST_SEQUENCE
        self._front_sequence = FIRST_SEQUENCE - 1
        # True after shutdown: the file is closed after every append (nobody is left
        # to close it), the segment stays the one appended to.
        self.write_through = False

    def open(self) -> None:
        """Create the directory if needed and take over the segments an earlier run
        left (replayed first, in order), counting their events. Removes temporary
        files of an interrupted rewrite (the segment they were copied from is intact).
        Blocking, meant for start-up. Raises OSError when the directory is unusable."""
        self.directory.mkdir(parents=True, exist_ok=True)
        found = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(_TMP_SUFFIX):
                os.unlink(entry.path)
                continue
            match = SEGMENT_NAME.fullmatch(entry.name)
            if match and entry.is_file():
                found.append(int(match.group(1)))
        for sequence in sorted(found):
            path = self.directory / segment_name(sequence)
            segment = Segment(sequence, path, _count_lines(path), synced=True)
            self._segments.append(segment)
            self.events += segment.events
        if found:
            self._next_sequence = max(found) + 1
            self._front_sequence = min(found) - 1

    def append(self, events: Sequence[MeterEvent]) -> None:
        """Append `events` to the active segment (opened on first use, the directory
        created again if it went missing) and hand them to the OS (no fsync; see
        sync_paths). Starts a new segment once this one holds `segment_events`.
        Raises OSError; the active segment is then closed as it is, and whatever
        whole lines reached it are replayed like any other."""
        data = encode_ndjson(events)
        if self._active_file is None:
            self._open_active()
        try:
            self._active_file.write(data)
            self._active_file.flush()
        except BaseException:
            self.rotate()
            raise
        self._active.events += len(events)
        self.events += len(events)
        if self._active.events >= self.segment_events:
            self.rotate()
        elif self.write_through:
            active_file, self._active_file = self._active_file, None
            active_file.close()

    def _open_active(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._active is None:
            sequence = self._next_sequence
            self._active = Segment(sequence, self.directory / segment_name(sequence), 0, synced=False)
            self._next_sequence = sequence + 1
        self._active_file = open(self._active.path, "ab")

    def rotate(self) -> None:
        """Close the active segment; it joins the segments to replay. No-op when
        there is none."""
        if self._active is None:
            return
        active, active_file = self._active, self._active_file
        self._active = self._active_file = None
        if active_file is not None:
            try:
                active_file.close()
            except OSError:
                pass      # the bytes that did reach the file are replayed; torn lines are counted then
        self._segments.append(active)

    def oldest(self) -> Segment | None:
        """The segment to replay next, or None when the spool holds nothing. Closes
        the active segment first when it is the only one left."""
        if not self._segments:
            self.rotate()
        return self._segments[0] if self._segments else None

    def is_empty(self) -> bool:
        """True when no segment file is left to replay (not even an empty one)."""
        return not self._segments and (self._active is None or self._active.events == 0)

    def loaded(self, segment: Segment, events: int) -> None:
        """`segment` was read back and holds `events` decodable events (its line
        count may have said otherwise)."""
        self.events += events - segment.events
        segment.events = events

    def delivered(self, segment: Segment, events: int) -> None:
        """`events` of the oldest segment reached the sink."""
        segment.events -= events
        self.events -= events

    def remove_oldest(self, segment: Segment) -> None:
        """Forget the oldest segment, all of whose events were delivered, and delete
        its file. Raises OSError when the file cannot be deleted (the spool has
        forgotten it anyway; a later start would replay it again)."""
        if not self._segments or self._segments[0] is not segment:
            raise ValueError(f"{segment} is not the oldest segment")
        self._segments.popleft()
        self.events -= segment.events
        segment.events = 0
        os.unlink(segment.path)

    def rewritten(self, segment: Segment, events: int) -> None:
        """`segment`'s file was rewritten to hold just its `events` undelivered events."""
        self.loaded(segment, events)
        segment.synced = True

    def new_front_segment(self) -> Segment:
        """A segment that sorts before every other, for events older than all of them
        (the memory buffer at shutdown). Add it with add_front once its file is written."""
        sequence = self._front_sequence
        self._front_sequence -= 1
        return Segment(sequence, self.directory / segment_name(sequence), 0, synced=True)

    def take_in_front(self, paths: Sequence[Path]) -> int:
        """Move the NDJSON files `paths` (oldest first, e.g. a journal an earlier run
        left) in front of every segment, to be replayed first, in their order. Returns
        the events they hold. Blocking, meant for start-up. Raises OSError."""
        taken = 0
        for path in reversed(paths):
            segment = self.new_front_segment()
            os.replace(path, segment.path)
            self.add_front(segment, _count_lines(segment.path))
            taken += segment.events
        if paths:
            fsync_directory(self.directory)
        return taken

    def add_front(self, segment: Segment, events: int) -> None:
        """`segment` (from new_front_segment) now holds `events` on disk."""
        segment.events = events
        self.events += events
        self._segments.appendleft(segment)

    def unsynced_paths(self) -> list[Path]:
        """Close the active segment and return the segment files not yet fsynced,
        marking them synced (the caller fsyncs them, e.g. with fsync_files)."""
        self.rotate()
        paths = []
        for segment in self._segments:
            if not segment.synced:
                segment.synced = True
                paths.append(segment.path)
        return paths
