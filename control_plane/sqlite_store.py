# The embedded store: one SQLite file through aiosqlite (its own thread, so the event
# loop never waits on the disk). One connection writes: a lock makes each transaction,
# and each statement outside one, run alone, and BEGIN IMMEDIATE takes SQLite's write
# lock up front, so a read-then-write step (idempotent events, upserts) cannot
# interleave, even with another process on the same file. Reads outside a transaction
# go to a second, read-only connection: in WAL mode they see every committed
# transaction and never wait for the one being written (an ingest request's token
# and catalog checks would otherwise queue behind every batch being kept).
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sqlite3
from pathlib import Path

import aiosqlite

from control_plane.sql_store import SqlStore
from control_plane.store import StoreError

BUSY_TIMEOUT_S = 30.0
_in_transaction = contextvars.ContextVar("sqlite_store_in_transaction", default=None)


class SqliteStore(SqlStore):
    BACKEND = "sqlite"
    DIALECT = {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB"}
    LOOK_AGAIN_AFTER_LOCKING = False     # BEGIN IMMEDIATE: no other writer until we commit

    def __init__(self, connection: aiosqlite.Connection, path: str, reader: aiosqlite.Connection | None = None):
        super().__init__()
        self._connection = connection
        self._reader = reader
        self.path = path
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str) -> SqliteStore:
        """The store in the SQLite file at `path` (created, with its folder, when missing;
        ":memory:" for a private in-memory one). Not yet migrated."""
        try:
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            connection = await aiosqlite.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            await connection.execute("PRAGMA journal_mode=WAL")
            await connection.execute("PRAGMA synchronous=NORMAL")
            reader = None
            if path != ":memory:":          # (a second connection to :memory: is another database)
                reader = await aiosqlite.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
                await reader.execute("PRAGMA query_only=ON")
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"cannot open the SQLite store {path}: {error}") from error
        return cls(connection, path, reader)

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.close()
        await self._connection.close()

    @contextlib.asynccontextmanager
    async def _transaction(self):
        if _in_transaction.get() is self:
            yield                       # already inside this store's transaction
            return
        async with self._lock:
            token = _in_transaction.set(self)
            try:
                await self._run(self._connection.execute, "BEGIN IMMEDIATE", ())
                try:
                    yield
                except BaseException:
                    await self._run(self._connection.execute, "ROLLBACK", ())
                    raise
                await self._run(self._connection.execute, "COMMIT", ())
            finally:
                _in_transaction.reset(token)

    async def _fetch(self, sql, args):
        if self._reader is not None and _in_transaction.get() is not self:
            return await self._run(self._reader.execute_fetchall, sql, args)
        async with self._statement():
            return await self._run(self._connection.execute_fetchall, sql, args)

    async def _execute(self, sql, args):
        async with self._statement():
            await self._run(self._connection.execute, sql, args)

    async def _executemany(self, sql, rows):
        async with self._statement():
            await self._run(self._connection.executemany, sql, rows)

    async def _insert_events(self, rows):
        # Inside a transaction that holds the write lock: nobody else can have kept
        # one of these since the look-up, so every row goes in.
        async with self._statement():
            await self._run(self._connection.executemany,
                            "INSERT INTO events (kind, customer_id, event_id, payload_hash, payload, occurred_at, "
                            "ingested_at, late, provenance) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return {row[:3] for row in rows}

    @contextlib.asynccontextmanager
    async def _statement(self):
        if _in_transaction.get() is self:
            yield
        else:
            async with self._lock:
                yield

    @staticmethod
    async def _run(method, sql, args):
        try:
            return await method(sql, args)
        except OverflowError as error:                     # a number SQLite cannot hold
            raise StoreError(f"SQLite: {error}", permanent=True) from error
        except (sqlite3.Error, ValueError) as error:      # ValueError: aiosqlite's "no active connection"
            raise StoreError(f"SQLite: {error}", isinstance(error, sqlite3.DataError)) from error
