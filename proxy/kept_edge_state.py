# The last followed edge state, kept on disk so a worker can start while its source (the
# control plane, the Redis bus) is away. Rules: the whole state is written at each pull
# (atomically: a temporary file renamed over the last), each change after it appended to
# a log, both in order on one writer thread; what is loaded is that state with the
# logged changes applied, torn last entries ignored. Nothing here decides anything.
from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from pathlib import Path

import msgspec

from config.documents import decode_value
from config.edge_state_file import EdgeStateFile
from proxy.followed_edge_state import WireChanges, WireState

log = logging.getLogger("aforo.proxy")
KEPT_STATE_DIR = "edge-state"        # in a worker's meter spool directory


class KeptState(msgspec.Struct):
    """A whole state as kept: the source's `version` and `state`, and `kept_at`
    (epoch seconds) when it was heard. JSON, as the control plane sends it."""

    version: str
    state: EdgeStateFile
    kept_at: float


_encode = msgspec.json.Encoder(enc_hook=str).encode
_decode_state = msgspec.json.Decoder(KeptState, dec_hook=decode_value)
_decode_changes = msgspec.json.Decoder(WireChanges, dec_hook=decode_value)


class EdgeStateKeeper:
    """Keeps the edge state a worker follows in `directory` (one worker's own): `state`
    (the last whole state) and `changes` (each change after it, one JSON line each). keep_whole() and
    keep_changes() return at once; the writes happen in order on a thread of their
    own, and a failed write is logged (the worker goes on serving; only a later start
    without the source would miss it). load() is blocking, for start-up."""

    def __init__(self, directory: str | os.PathLike, wall_clock=time.time):
        self.directory = Path(directory)
        self.wall_clock = wall_clock
        self.changes_bytes = 0
        self.state_bytes = 0
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="aforo-kept-state")

    def keep_whole(self, wire: WireState) -> None:
        """Keep `wire` as the whole state, and drop the changes kept before it."""
        data = _encode(KeptState(wire.version, wire.state, self.wall_clock()))
        self.state_bytes, self.changes_bytes = len(data), 0
        self._submit(self._write_whole, data)

    def keep_changes(self, changes: WireChanges) -> None:
        """Keep `changes`, applied after the whole state and the changes kept so far."""
        record = _encode(changes) + b"\n"
        self.changes_bytes += len(record)
        self._submit(self._append_changes, record)

    def load(self) -> tuple[WireState, list[WireChanges], float] | None:
        """(the whole state, the changes after it in order, when it was kept) as kept,
        or None when nothing usable is kept (no file, or one that cannot be read)."""
        try:
            kept = _decode_state.decode((self.directory / "state").read_bytes())
        except (OSError, msgspec.DecodeError) as error:
            if not isinstance(error, FileNotFoundError):
                log.warning("edge state kept in %s cannot be read (%s)", self.directory, error)
            return None
        changes = []
        try:
            lines = (self.directory / "changes").read_bytes().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                changes.append(_decode_changes.decode(line))
            except msgspec.DecodeError:
                break                    # torn by a crash mid-write: the changes before it stand
        return WireState(kept.version, kept.state), changes, kept.kept_at

    def close(self) -> None:
        """Wait for the writes queued, then stop the writer thread."""
        self._writer.shutdown(wait=True)

    def _submit(self, write, data: bytes) -> None:
        try:
            future = self._writer.submit(write, data)
        except RuntimeError:           # closed: the worker is stopping
            return
        future.add_done_callback(self._log_failure)

    def _log_failure(self, future) -> None:
        if future.exception() is not None:
            log.error("edge state cannot be kept in %s (%s); a start without the source would use an "
                      "older one", self.directory, future.exception())

    def _write_whole(self, data: bytes) -> None:
        # Runs on the writer thread. The old changes go first: a crash in between
        # leaves the old state alone (older, never mixed with another's changes).
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "changes", "wb"):
            pass
        tmp_path = self.directory / "state.tmp"
        with open(tmp_path, "wb") as state_file:
            state_file.write(data)
        os.replace(tmp_path, self.directory / "state")

    def _append_changes(self, record: bytes) -> None:
        # Runs on the writer thread.
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "changes", "ab") as changes_file:
            changes_file.write(record)
