# The meter buffer's memory, written ahead to disk: every event held in memory reaches a
# journal file at the next group commit (at most JOURNAL_INTERVAL_S later), so a worker
# that dies without closing (kill -9, a crash) loses at most that last interval. Files
# are `journal-<20-digit sequence>.ndjson` in a directory of their own; a file is dropped
# once every event in it has left memory. A new buffer puts the files an earlier run left
# in front of its spool (they are older than anything spooled), so they are replayed.
from __future__ import annotations

import os
import re
from pathlib import Path

from proxy.meter_event import MeterEvent, encode_ndjson

JOURNAL_INTERVAL_S = 0.1
JOURNAL_FILE_EVENTS = 10_000
_FILE_NAME = re.compile(r"journal-(\d{20})\.ndjson")


class _JournalFile:
    # One file: its path, the open descriptor while it is written to, how many events it
    # holds and `through`: the buffer's count of events ever taken into memory, up to
    # and including this file's last one.
    __slots__ = ("path", "fd", "events", "through")

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None
        self.events = 0
        self.through = 0


class MeterJournal:
    """The journal of one MeterBuffer's memory, in `directory` (created on first write).

    The buffer numbers the events it takes into memory 1, 2, 3...; `write(events,
    through)` appends the events numbered up to `through` not yet written, and
    `forget(out)` drops every file whose events are all numbered `out` or less (they
    were delivered, or spooled at shutdown). Writes go to the OS (no fsync): a process
    crash keeps them, a power loss may not. Used from the event loop's thread only;
    each write is one `write(2)` of a few kilobytes. Raises OSError; the buffer logs it
    and goes on (the events stay in memory).
    """

    def __init__(self, directory: str | os.PathLike, *, file_events: int = JOURNAL_FILE_EVENTS):
        self.directory = Path(directory)
        self.file_events = file_events
        self._files: list[_JournalFile] = []        # oldest first; the last one is written to
        self._next_sequence = 0

    def left_by_earlier_run(self) -> list[Path]:
        """The journal files an earlier run left (it died before closing its buffer),
        oldest first; new files are numbered after them. Blocking, meant for start-up.
        Raises OSError when the directory exists but cannot be read."""
        if not self.directory.is_dir():
            return []
        found = sorted(int(match.group(1)) for entry in os.scandir(self.directory)
                       if (match := _FILE_NAME.fullmatch(entry.name)) and entry.is_file())
        if found:
            self._next_sequence = found[-1] + 1
        return [self.directory / _file_name(sequence) for sequence in found]

    def write(self, events: list[MeterEvent], through: int) -> None:
        """Append `events`, the last of which is the buffer's event number `through`."""
        if not events:
            return
        journal = self._files[-1] if self._files else None
        if journal is None or journal.events >= self.file_events:
            if journal is not None:
                self._close(journal)
            journal = self._new_file()
        data = memoryview(encode_ndjson(events))
        while data:
            data = data[os.write(journal.fd, data):]
        journal.events += len(events)
        journal.through = through

    def forget(self, out: int) -> None:
        """Drop the files whose events are all numbered `out` or less: closed ones are
        deleted, the one written to is emptied and kept."""
        while self._files and self._files[0].through <= out:
            journal = self._files[0]
            if journal is self._files[-1]:
                if journal.events:
                    os.ftruncate(journal.fd, 0)
                    journal.events = 0
                return
            self._files.pop(0)
            os.unlink(journal.path)

    def close(self, out: int) -> None:
        """Close the journal, deleting every file whose events are all numbered `out`
        or less (the others stay, for the next buffer on the spool to replay)."""
        for journal in self._files:
            self._close(journal)
            if journal.through <= out or not journal.events:
                os.unlink(journal.path)
        self._files = []

    def _new_file(self) -> _JournalFile:
        self.directory.mkdir(parents=True, exist_ok=True)
        journal = _JournalFile(self.directory / _file_name(self._next_sequence))
        self._next_sequence += 1
        journal.fd = os.open(journal.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o644)
        self._files.append(journal)
        return journal

    @staticmethod
    def _close(journal: _JournalFile) -> None:
        if journal.fd is not None:
            fd, journal.fd = journal.fd, None
            os.close(fd)


def _file_name(sequence: int) -> str:
    return f"journal-{sequence:020d}.ndjson"
