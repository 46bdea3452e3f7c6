# A configuration file served as the value built from it, and rebuilt when it changes:
# rebuild, validate, swap. A change is noticed by modification time, size or inode (a
# file changed within RACY_WINDOW_NS of its last read is read again) and confirmed by
# the content's hash, so a touch or a rewrite with the same bytes rebuilds nothing.
# On any error the last good value stays in force; each failure is logged with file,
# line and path, counted, and reported once until the file changes again. A value
# that runs out (`valid_until`: a rolling billing period that ended) is built again
# from the same file.
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from config.errors import ConfigError

T = TypeVar("T")
log = logging.getLogger("aforo.config")

# A file modified this close to when it was last read may have changed again within
# the file system's timestamp granularity without its size changing; until it is
# older than that, its content hash decides (as git treats "racily clean" files).
RACY_WINDOW_NS = 2_000_000_000

ReloadErrorCallback = Callable[[str, Exception], object]


class ReloadErrorCounter:
    """`aforo_config_reload_errors_total{file}` on a Prometheus `registry`: one per
    rejected reload (the old configuration stayed in force). Call it as a
    WatchedFile's `on_reload_error(file, error)`; safe from any thread."""

    def __init__(self, registry) -> None:
        from prometheus_client import Counter
        self.counter = Counter("aforo_config_reload_errors_total",
                               "Configuration reloads rejected (the old configuration stays in force).",
                               ("file",), registry=registry)

    def __call__(self, file: str, error: BaseException | None = None) -> None:
        self.counter.labels(file=file).inc()


class WatchedFile(Generic[T]):
    """The value `build(raw bytes)` makes of the file at `path`, kept current.

    `build` raises ConfigError for content it cannot serve. `what` names the file's
    kind in logs ("edge state", "guards"). `clock` gives epoch seconds (for age_s).
    `on_reload_error(path, error)` is called after each failed reload; it may be set
    after construction. The first load happens here and raises ConfigError when the
    file cannot be read or built. `value` is the value in force, replaced by one
    assignment (readers take it once per use); `reloads` and `reload_errors` count.
    """

    def __init__(self, path, build: Callable[[bytes], T], *, what: str,
                 clock: Callable[[], float] = time.time, on_reload_error: ReloadErrorCallback | None = None) -> None:
        self.path = str(path)
        self.what = what
        self.clock = clock
        self.on_reload_error = on_reload_error
        self.reload_errors = 0
        self.reloads = 0
        self._build = build
        # The file signature last read, and the last read failure: each is acted on
        # once, not on every check.
        self._seen: tuple[int, int, int] | None = None
        self._read_at_ns = 0
        self._read_failure: str | None = None
        try:
            self._seen = _file_signature(self.path)
            self._read_at_ns = time.time_ns()
            raw = _read(self.path)
        except OSError as err:
            raise self._unreadable(err) from err
        self._content = hashlib.sha256(raw).digest()
        self._serve(build(raw))
        self._served_content = self._content
        self._confirmed_at = clock()

    def _serve(self, value: T) -> None:
        """Put `value` in force (subclasses may keep it under their own name too)."""
        self.value = value

    @property
    def version(self) -> str:
        """The version of the value in force (its `version`, e.g. a hash of the file)."""
        return getattr(self.value, "version", "")

    def age_s(self) -> float:
        """Seconds (on `clock`) since the value served was last known to match the
        file: it grows while the file is broken or unreadable, not while the file is
        merely unchanged and still being checked."""
        return max(0.0, self.clock() - self._confirmed_at)

    def reload_if_changed(self) -> bool:
        """Rebuild and swap in the value if the file changed since it was last read,
        or if the value has run out: its `valid_until` (seconds on `clock`; a value
        without one holds until the file changes) has come, when it is built again
        from the file as it is, changed or not (bytes already refused stay refused).
        Returns True when a new value was swapped in, False when nothing changed or
        the reload failed (the old value stays)."""
        ran_out = self.clock() >= getattr(self.value, "valid_until", math.inf)
        raw = self._read_if_changed(ran_out)
        if raw is None:
            return False
        content = hashlib.sha256(raw).digest()
        if content == self._served_content and not ran_out:  # touched, or back to the served bytes
            self._content = content
            self._confirmed_at = self.clock()
            return False
        if content == self._content and content != self._served_content:  # the same broken bytes, reported
            return False
        self._content = content
        try:
            value = self._build(raw)
        except ConfigError as err:
            self._failed(err)
            return False
        self._serve(value)
        self._served_content = content
        self._confirmed_at = self.clock()
        self.reloads += 1
        log.info("%s %s: now serving version %s%s", self.what, self.path, self.version,
                 " (the last one ran out)" if ran_out else "")
        return True

    async def watch(self, interval_s: float,
                    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        """Every `interval_s` seconds, reload_if_changed(), forever (until cancelled).

        The rebuild runs in a worker thread so a large file does not stall the event
        loop; the swap is still one assignment, and `on_reload_error` is then called
        from that thread. An unexpected exception is logged and counted as a reload
        error, and watching goes on.
        """
        while True:
            await sleep(interval_s)
            try:
                await asyncio.to_thread(self.reload_if_changed)
            except Exception as err:  # noqa: BLE001 - the watcher must outlive any bug
                log.exception("%s %s: reload failed unexpectedly", self.what, self.path)
                self._count(err)

    def _read_if_changed(self, even_unchanged: bool = False) -> bytes | None:
        # The file's bytes, or None when its signature says it is unchanged (then the
        # served value is confirmed current; `even_unchanged` reads it all the same) or
        # it cannot be read (reported once).
        try:
            signature = _file_signature(self.path)
            if (not even_unchanged and signature == self._seen
                    and signature[0] < self._read_at_ns - RACY_WINDOW_NS):
                if self._content == self._served_content:
                    self._confirmed_at = self.clock()
                return None
            read_at_ns = time.time_ns()
            raw = _read(self.path)
        except OSError as err:
            failure = self._unreadable(err)
            self._seen = None
            if failure.message != self._read_failure:
                self._read_failure = failure.message
                self._failed(failure)
            return None
        self._seen, self._read_at_ns, self._read_failure = signature, read_at_ns, None
        return raw

    def _unreadable(self, err: OSError) -> ConfigError:
        return ConfigError(f"Cannot read the {self.what} file: {err.strerror or err}", self.path)

    def _failed(self, error: ConfigError) -> None:
        for problem in error.errors:
            log.error("%s reload failed, keeping version %s: %s", self.what, self.version, problem)
        self._count(error)

    def _count(self, error: Exception) -> None:
        self.reload_errors += 1
        if self.on_reload_error is not None:
            try:
                self.on_reload_error(self.path, error)
            except Exception:  # noqa: BLE001 - a failing callback must not stop reloads
                log.exception("%s %s: on_reload_error callback failed", self.what, self.path)


def _file_signature(path: str) -> tuple[int, int, int]:
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()
