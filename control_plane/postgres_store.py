# The production store: PostgreSQL through an asyncpg pool. Statements outside a
# transaction take any pooled connection; a transaction keeps one for its whole body.
# A chunk of new events goes in with one plain INSERT, all or nothing: an event kept
# before (a retry, a racing writer) fails it on the unique key, and the chunk is then
# taken with INSERT … ON CONFLICT DO NOTHING, so of two writers racing with the same
# event exactly one is told it was accepted.
from __future__ import annotations

import contextlib
import contextvars

import asyncpg

from control_plane.sql_store import SqlStore, priced_rows
from control_plane.store import ACCEPTED, StoreError

POOL_MAX_SIZE = 10
CONNECT_TIMEOUT_S = 10.0
# Any fixed number: the key of the advisory lock that serialises migrations.
_MIGRATION_LOCK_KEY = 0x61666F72
_connection = contextvars.ContextVar("postgres_store_connection", default=None)
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)
# The server refused the data itself (class 22: a value it cannot hold; 54: too large).
_PERMANENT = (asyncpg.DataError, asyncpg.ProgramLimitExceededError)


class PostgresStore(SqlStore):
    BACKEND = "postgres"
    DIALECT = {"serial": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "blob": "BYTEA"}
    MIGRATION_LOCK_SQL = f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})"
    ROW_LOCK_SQL = " FOR UPDATE"
    SKIP_LOCKED_SQL = " FOR UPDATE SKIP LOCKED"

    def __init__(self, pool: asyncpg.Pool):
        super().__init__()
        self._pool = pool
        self._statements: dict[str, str] = {}

    @classmethod
    async def connect(cls, url: str, *, server_settings: dict | None = None) -> PostgresStore:
        """The store in the PostgreSQL database at `url`. Not yet migrated.
        `server_settings` (e.g. {"search_path": "…"}) apply to every connection."""
        try:
            pool = await asyncpg.create_pool(url, min_size=1, max_size=POOL_MAX_SIZE, timeout=CONNECT_TIMEOUT_S,
                                             server_settings=server_settings, reset=_session_kept_clean)
        except _DRIVER_ERRORS as error:
            raise StoreError(f"cannot connect to PostgreSQL: {error}") from error
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    def _sql(self, sql):
        # `?` placeholders -> `$1`, `$2`, … (no query here has a `?` inside a literal).
        converted = self._statements.get(sql)
        if converted is None:
            parts = sql.split("?")
            converted = parts[0] + "".join(f"${number}{part}" for number, part in enumerate(parts[1:], 1))
            self._statements[sql] = converted
        return converted

    @contextlib.asynccontextmanager
    async def _transaction(self):
        if _connection.get() is not None:
            yield
            return
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                token = _connection.set(connection)
                try:
                    yield
                finally:
                    _connection.reset(token)
        except _DRIVER_ERRORS as error:
            raise StoreError(f"PostgreSQL: {error}", isinstance(error, _PERMANENT)) from error

    @contextlib.asynccontextmanager
    async def _connected(self):
        connection = _connection.get()
        try:
            if connection is not None:
                yield connection
            else:
                async with self._pool.acquire() as connection:
                    yield connection
        except _DRIVER_ERRORS as error:
            raise StoreError(f"PostgreSQL: {error}", isinstance(error, _PERMANENT)) from error

    async def _fetch(self, sql, args):
        async with self._connected() as connection:
            return [tuple(row) for row in await connection.fetch(self._sql(sql), *args)]

    async def _execute(self, sql, args):
        async with self._connected() as connection:
            await connection.execute(self._sql(sql), *args)

    async def _executemany(self, sql, rows):
        async with self._connected() as connection:
            await connection.executemany(self._sql(sql), rows)

    async def _known_hashes(self, keys):
        # Row values against a VALUES list: planned here as one index probe per key
        # (a join with unnest() or one IN list per customer planned far worse).
        if not keys:
            return {}
        values = ", ".join(["(?, ?, ?)"] * len(keys))
        rows = await self._fetch(
            "SELECT kind, customer_id, event_id, payload_hash FROM events "
            f"WHERE (kind, customer_id, event_id) IN (VALUES {values})",
            tuple(value for key in keys for value in key))
        return {(kind, customer, event_id): digest for kind, customer, event_id, digest in rows}

    async def _insert_events(self, rows):
        async with self._connected() as connection:
            inserted = await connection.fetch(_INSERT_EVENTS + " RETURNING kind, customer_id, event_id", rows)
        return {tuple(row) for row in inserted}

    async def _write_chunk(self, chunk, first, events, ratings, outcomes):
        # Most events arrive once: price the whole chunk as new from the locked totals,
        # keep it and move the totals in one statement, a plain INSERT (a fifth cheaper
        # for the server than ON CONFLICT). Only when some event was kept before (a
        # retry, a concurrent writer), which the unique key refuses, is that rolled back
        # and the chunk taken the careful way: look up what is kept, then price and
        # insert the rest. (The server logs each such refusal as an error.)
        try:
            async with self._transaction():
                rated = [rating for key in chunk if (rating := ratings[first[key][0]]) is not None]
                totals = await self._lock_totals(rated) if rated else {}
                refused = {}
                rows = priced_rows(chunk, first, events, ratings, totals, refused)
                moved = [(*key, *sums) for key, sums in totals.items()]
                async with self._connected() as connection:
                    try:
                        await connection.execute(_KEEP_NEW_EVENTS, rows, *(zip(*moved) if moved else [()] * 6))
                    except asyncpg.UniqueViolationError:
                        raise _KeptBefore from None
                ledgered = [rating for rating in rated if rating.ledgered]
                if ledgered and refused:
                    ledgered = [rating for key in chunk if key not in refused
                                and (rating := ratings[first[key][0]]) is not None and rating.ledgered]
                await self._count_in_ledgers(ledgered)
        except _KeptBefore:
            await super()._write_chunk(chunk, first, events, ratings, outcomes)
            return
        for key in chunk:
            outcomes[first[key][0]] = refused.get(key, ACCEPTED)

    async def _lock_totals(self, ratings):
        # The totals rows of `ratings`, created at zero when missing, locked and read in
        # one statement (a no-op update locks a row that is there and returns it as the
        # last writer left it), in one fixed order so concurrent writers cannot deadlock.
        rows = {}
        for rating in ratings:
            rows[(rating.customer_id, rating.metric, rating.period_start)] = (rating.period_end, rating.subscription)
        ordered = sorted(rows)
        async with self._connected() as connection:
            found = await connection.fetch(
                "INSERT INTO period_totals (customer_id, metric, period_start, period_end, subscription, units, "
                "revenue_nanos, cogs_nanos) "
                "SELECT customer_id, metric, period_start, period_end, subscription, 0, 0, 0 FROM unnest("
                "$1::text[], $2::text[], $3::float8[], $4::float8[], $5::text[]) WITH ORDINALITY "
                "AS wanted (customer_id, metric, period_start, period_end, subscription, position) ORDER BY position "
                "ON CONFLICT (customer_id, metric, period_start) DO UPDATE SET units = period_totals.units "
                "RETURNING customer_id, metric, period_start, units, revenue_nanos, cogs_nanos",
                *zip(*((*key, *rows[key]) for key in ordered)))
        return {(customer, metric, period_start): [units, revenue, cogs]
                for customer, metric, period_start, units, revenue, cogs in found}


class _KeptBefore(Exception):
    """Some event of a chunk priced as new had been kept before."""


async def _session_kept_clean(connection):
    # A connection back in the pool: asyncpg itself ends a transaction left open, and
    # the store changes no other session state (no SET, LISTEN, cursors or session
    # advisory locks), so the default reset (RESET ALL, UNLISTEN *, ...), one more
    # round trip after every statement or transaction, has nothing to do.
    return


_NEW_EVENTS = (
    "INSERT INTO events (kind, customer_id, event_id, payload_hash, payload, occurred_at, ingested_at, late, "
    "provenance) "
    "SELECT * FROM unnest($1::new_event[])")
_INSERT_EVENTS = _NEW_EVENTS + " ON CONFLICT (kind, customer_id, event_id) DO NOTHING"
# New events kept and their totals moved in one statement; an event kept before fails it.
_KEEP_NEW_EVENTS = (
    f"WITH kept AS ({_NEW_EVENTS}) "
    "UPDATE period_totals AS totals SET units = moved.units, revenue_nanos = moved.revenue_nanos, "
    "cogs_nanos = moved.cogs_nanos FROM unnest($2::text[], $3::text[], $4::float8[], $5::bigint[], "
    "$6::bigint[], $7::bigint[]) AS moved (customer_id, metric, period_start, units, revenue_nanos, cogs_nanos) "
    "WHERE totals.customer_id = moved.customer_id AND totals.metric = moved.metric "
    "AND totals.period_start = moved.period_start")
