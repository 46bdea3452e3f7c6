# The Store over SQL, written once for both backends: the schema's versioned
# migrations and every query live here; SqliteStore and PostgresStore only say how to
# run a statement, open a transaction and insert a batch of new events (the one step
# whose concurrency rules differ). Queries use `?` placeholders.
from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence

import msgspec

from control_plane.store import (
    ACCEPTED,
    CHANGE_DELETED,
    CHANGE_REVOKED,
    AuditEntry,
    CATALOG_KINDS,
    CONFLICT,
    CREATED,
    DELIVERED,
    DUPLICATE,
    FAILED,
    MAX_PERIOD_TOTAL,
    PENDING,
    REFUSED,
    UNCHANGED,
    UPDATED,
    Action,
    ApiKey,
    DeadLetter,
    GuardLevel,
    PeriodTotals,
    StoredEvent,
    StoreError,
    Token,
    WebhookDelivery,
)

# Versioned schema changes, applied in order, each once, each in its own transaction.
# `{serial}` and `{blob}` are filled in per backend; a statement given as a mapping
# ({backend: sql}) applies to the backends it names only. Never edit a released
# migration: add the next one.
MIGRATIONS = (
    (1, "catalog, api keys and events", (
        """CREATE TABLE catalog (
            kind TEXT NOT NULL,
            key TEXT NOT NULL,
            document TEXT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (kind, key))""",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            customer_id TEXT NOT NULL,
            prefix TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            created_at DOUBLE PRECISION NOT NULL,
            revoked_at DOUBLE PRECISION)""",
        "CREATE INDEX api_keys_by_customer ON api_keys (customer_id, prefix)",
        """CREATE TABLE events (
            seq {serial},
            kind TEXT NOT NULL,
            customer_id TEXT NOT NULL,
            event_id TEXT NOT NULL,
            payload_hash TEXT NOT NULL,
            payload {blob} NOT NULL,
            occurred_at DOUBLE PRECISION NOT NULL,
            ingested_at DOUBLE PRECISION NOT NULL,
            late BOOLEAN NOT NULL,
            provenance {blob} NOT NULL,
            UNIQUE (kind, customer_id, event_id))""",
        "CREATE INDEX events_by_time ON events (kind, customer_id, occurred_at)",
        "CREATE INDEX events_late ON events (late, ingested_at)",
    )),
    (2, "admin tokens", (
        """CREATE TABLE admin_tokens (
            id TEXT PRIMARY KEY,
            token_hash TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            revoked_at DOUBLE PRECISION)""",
    )),
    (3, "running totals per customer, metric and billing period", (
        """CREATE TABLE period_totals (
            customer_id TEXT NOT NULL,
            metric TEXT NOT NULL,
            period_start DOUBLE PRECISION NOT NULL,
            period_end DOUBLE PRECISION NOT NULL,
            subscription TEXT NOT NULL,
            units BIGINT NOT NULL,
            revenue_nanos BIGINT NOT NULL,
            cogs_nanos BIGINT NOT NULL,
            PRIMARY KEY (customer_id, metric, period_start))""",
        "CREATE INDEX period_totals_by_end ON period_totals (period_end)",
    )),
    (4, "guard levels and the actions trail", (
        """CREATE TABLE guard_levels (
            customer_id TEXT NOT NULL,
            metric TEXT NOT NULL,
            guard_id TEXT NOT NULL,
            level INTEGER NOT NULL,
            margin_pct DOUBLE PRECISION,
            changed_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (customer_id, metric))""",
        """CREATE TABLE actions (
            seq {serial},
            customer_id TEXT NOT NULL,
            metric TEXT NOT NULL,
            guard_id TEXT NOT NULL,
            level_from INTEGER NOT NULL,
            level_to INTEGER NOT NULL,
            margin_pct DOUBLE PRECISION,
            min_margin_pct DOUBLE PRECISION NOT NULL,
            mode TEXT NOT NULL,
            at DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX actions_by_customer ON actions (customer_id, seq)",
    )),
    (5, "webhook outbox", (
        # Pending while next_attempt_at is set; then delivered_at or failed_at says how
        # it ended. One webhook per (transition, channel), whoever enqueues it.
        """CREATE TABLE webhook_outbox (
            seq {serial},
            id TEXT NOT NULL UNIQUE,
            channel TEXT NOT NULL,
            action_seq BIGINT NOT NULL REFERENCES actions (seq),
            body {blob} NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at DOUBLE PRECISION,
            delivered_at DOUBLE PRECISION,
            failed_at DOUBLE PRECISION,
            last_error TEXT,
            UNIQUE (action_seq, channel))""",
        "CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at) WHERE next_attempt_at IS NOT NULL",
    )),
    # Numbers need not be contiguous: each migration is applied once, by its number,
    # so one numbered below the store's version is still applied when it arrives.
    (6, "catalog version, moved by every catalog change; new events' row type", (
        "CREATE TABLE catalog_version (id INTEGER PRIMARY KEY, version BIGINT NOT NULL)",
        "INSERT INTO catalog_version (id, version) VALUES (1, 0)",
        # A batch of new events goes to PostgreSQL as one array of these rather than an
        # array per column: the driver checks each array element, so nine times fewer.
        {"postgres": """CREATE TYPE new_event AS (
            kind TEXT,
            customer_id TEXT,
            event_id TEXT,
            payload_hash TEXT,
            payload BYTEA,
            occurred_at DOUBLE PRECISION,
            ingested_at DOUBLE PRECISION,
            late BOOLEAN,
            provenance BYTEA)"""},
    )),
    (7, "hard quota leased to proxies, per customer, metric and billing period", (
        """CREATE TABLE quota_leases (
            customer_id TEXT NOT NULL,
            metric TEXT NOT NULL,
            period_start DOUBLE PRECISION NOT NULL,
            leased BIGINT NOT NULL,
            PRIMARY KEY (customer_id, metric, period_start))""",
    )),
    (8, "a standing per guard mode: a shadow guard is judged beside the enforcing one", (
        """CREATE TABLE guard_standings (
            customer_id TEXT NOT NULL,
            metric TEXT NOT NULL,
            mode TEXT NOT NULL,
            guard_id TEXT NOT NULL,
            level INTEGER NOT NULL,
            margin_pct DOUBLE PRECISION,
            changed_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (customer_id, metric, mode))""",
        # A level kept so far was reached under the mode of its last transition.
        """INSERT INTO guard_standings (customer_id, metric, mode, guard_id, level, margin_pct, changed_at)
            SELECT g.customer_id, g.metric,
                   COALESCE((SELECT a.mode FROM actions a WHERE a.customer_id = g.customer_id
                             AND a.metric = g.metric ORDER BY a.seq DESC LIMIT 1), 'enforce'),
                   g.guard_id, g.level, g.margin_pct, g.changed_at
            FROM guard_levels g""",
        "DROP TABLE guard_levels",
        "ALTER TABLE guard_standings RENAME TO guard_levels",
    )),
    (9, "level-2 throttle buckets shared by proxy workers, per customer, guard and metric", (
        """CREATE TABLE throttle_buckets (
            customer_id TEXT NOT NULL,
            guard_id TEXT NOT NULL,
            metric TEXT NOT NULL,
            spent_until_us BIGINT NOT NULL,
            PRIMARY KEY (customer_id, guard_id, metric))""",
    )),
    (10, "dead letters: what the meter stream could not take in, with why", (
        """CREATE TABLE dead_letters (
            seq {serial},
            source TEXT NOT NULL,
            entry_id TEXT NOT NULL,
            event {blob} NOT NULL,
            reason TEXT NOT NULL,
            at DOUBLE PRECISION NOT NULL)""",
    )),
    (11, "events kept but not rated (unknown metric, no subscription yet), with why", (
        """CREATE TABLE unrated_events (
            seq {serial},
            kind TEXT NOT NULL,
            customer_id TEXT NOT NULL,
            event_id TEXT NOT NULL,
            reason TEXT NOT NULL,
            ingested_at DOUBLE PRECISION NOT NULL,
            UNIQUE (kind, customer_id, event_id))""",
    )),
    (12, "token scopes: admin (everything) or proxy (edge state, leases, meter events)", (
        # Tokens made before scopes could do everything: they stay admin.
        "ALTER TABLE admin_tokens ADD COLUMN scope TEXT NOT NULL DEFAULT 'admin'",
    )),
    (13, "the audit trail: who changed which catalog entry, API key or token, before and after", (
        """CREATE TABLE audit_trail (
            seq {serial},
            at DOUBLE PRECISION NOT NULL,
            who TEXT NOT NULL,
            kind TEXT NOT NULL,
            key TEXT NOT NULL,
            change TEXT NOT NULL,
            before TEXT,
            after TEXT)""",
        "CREATE INDEX audit_trail_by_entry ON audit_trail (kind, key, seq)",
    )),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
# Events looked up or written per statement (well under both backends' parameter limits).
EVENT_CHUNK = 1000

# In the transaction of every catalog change: whoever rated with the catalog as it was
# (an ingest in any process) sees the version move and loads the catalog again.
_MOVE_CATALOG_VERSION = "UPDATE catalog_version SET version = version + 1 WHERE id = 1"

# As GuardLevel lists them.
_GUARD_LEVEL_COLUMNS = "customer_id, metric, guard_id, level, margin_pct, changed_at, mode"

_encode = msgspec.json.Encoder(order="sorted").encode
_decode = msgspec.json.decode


def _audited_key(key: ApiKey) -> str:
    # An API key as the audit trail shows it: never its digest.
    return _encode({"customer_id": key.customer_id, "prefix": key.prefix, "created_at": key.created_at,
                    "revoked_at": key.revoked_at}).decode()


def payload_hash(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


class SqlStore:
    """Everything but the driver. Subclasses call SqlStore.__init__, set BACKEND and
    DIALECT ({"serial": …, "blob": …}) and implement _fetch(sql, args) -> rows,
    _execute(sql, args), _executemany(sql, rows), _transaction() (an async context
    manager; the whole body is one transaction, holding the write lock on SQLite) and
    _insert_events(rows) -> the (kind, customer_id, event_id) keys it inserted; they
    may replace _known_hashes, _lock_totals or _write_chunk (one chunk of events in
    its transaction) with what their database runs better."""

    BACKEND = ""                     # names the backend in backend-specific migration statements
    DIALECT: dict[str, str] = {}
    MIGRATION_LOCK_SQL = ""          # taken at the start of each migration's transaction
    ROW_LOCK_SQL = ""                # appended to a SELECT to lock the rows it reads
    SKIP_LOCKED_SQL = ""             # ... and to pass over rows another transaction has locked

    def __init__(self) -> None:
        self._waiting: list[_Call] = []          # record_events calls waiting to be written
        self._writing = asyncio.Lock()           # held by the call writing them

    # -- schema --------------------------------------------------------------------
    async def migrate(self) -> int:
        """Apply the migrations not applied yet; returns the schema version. A store
        newer than this code (a later migration applied) raises StoreError."""
        async with self._transaction():
            if self.MIGRATION_LOCK_SQL:
                await self._fetch(self.MIGRATION_LOCK_SQL, ())
            await self._execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                "name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)", ())
        version = await self.schema_version()
        if version > SCHEMA_VERSION:
            raise StoreError(f"the store's schema is at version {version}, newer than this "
                             f"Aforo Edge knows ({SCHEMA_VERSION}); upgrade Aforo Edge")
        applied = {row[0] for row in await self._fetch("SELECT version FROM schema_migrations", ())}
        for number, name, statements in MIGRATIONS:
            if number in applied:
                continue
            async with self._transaction():
                # Checked again inside the transaction, under the migration lock: two
                # processes migrating at once apply each migration once.
                if self.MIGRATION_LOCK_SQL:
                    await self._fetch(self.MIGRATION_LOCK_SQL, ())
                if await self._fetch("SELECT 1 FROM schema_migrations WHERE version = ?", (number,)):
                    continue
                for statement in statements:
                    if isinstance(statement, dict):
                        statement = statement.get(self.BACKEND)
                        if statement is None:
                            continue
                    await self._execute(statement.format(**self.DIALECT), ())
                await self._execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                                    (number, name, time.time()))
        return await self.schema_version()

    async def schema_version(self) -> int:
        rows = await self._fetch("SELECT MAX(version) FROM schema_migrations", ())
        return rows[0][0] or 0

    # -- catalog -------------------------------------------------------------------
    async def put_catalog(self, kind, key, document, *, author):
        _check_kind(kind)
        text = _encode(document).decode()
        async with self._transaction():
            rows = await self._fetch("SELECT document FROM catalog WHERE kind = ? AND key = ?", (kind, key))
            if rows and rows[0][0] == text:
                return UNCHANGED
            await self._execute(_MOVE_CATALOG_VERSION, ())
            now = time.time()
            if rows:
                await self._execute("UPDATE catalog SET document = ?, updated_at = ? WHERE kind = ? AND key = ?",
                                    (text, now, kind, key))
                await self._audit(now, author, kind, key, UPDATED, rows[0][0], text)
                return UPDATED
            await self._execute("INSERT INTO catalog (kind, key, document, updated_at) VALUES (?, ?, ?, ?)",
                                (kind, key, text, now))
            await self._audit(now, author, kind, key, CREATED, None, text)
            return CREATED

    async def get_catalog(self, kind, key):
        _check_kind(kind)
        rows = await self._fetch("SELECT document FROM catalog WHERE kind = ? AND key = ?", (kind, key))
        return _decode(rows[0][0]) if rows else None

    async def list_catalog(self, kind):
        _check_kind(kind)
        rows = await self._fetch("SELECT key, document FROM catalog WHERE kind = ? ORDER BY key", (kind,))
        return [(key, _decode(document)) for key, document in rows]

    async def delete_catalog(self, kind, key, *, author):
        _check_kind(kind)
        async with self._transaction():
            rows = await self._fetch("SELECT document FROM catalog WHERE kind = ? AND key = ?", (kind, key))
            if rows:
                await self._execute(_MOVE_CATALOG_VERSION, ())
                await self._execute("DELETE FROM catalog WHERE kind = ? AND key = ?", (kind, key))
                await self._audit(time.time(), author, kind, key, CHANGE_DELETED, rows[0][0], None)
            return bool(rows)

    async def catalog_version(self):
        rows = await self._fetch("SELECT version FROM catalog_version WHERE id = 1", ())
        return rows[0][0]

    # -- API keys ------------------------------------------------------------------
    async def add_api_key(self, key: ApiKey, *, author) -> None:
        async with self._transaction():
            await self._execute(
                "INSERT INTO api_keys (id, customer_id, prefix, key_hash, created_at, revoked_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key.id, key.customer_id, key.prefix, key.key_hash, key.created_at, key.revoked_at))
            await self._audit(key.created_at, author, "api_key", key.id, CREATED, None, _audited_key(key))

    async def api_keys(self, customer_id, prefix=""):
        rows = await self._fetch(
            "SELECT id, customer_id, prefix, key_hash, created_at, revoked_at FROM api_keys "
            "WHERE customer_id = ? AND substr(prefix, 1, ?) = ? ORDER BY created_at, id",
            (customer_id, len(prefix), prefix))
        return [ApiKey(*row) for row in rows]

    async def live_api_keys(self):
        rows = await self._fetch(
            "SELECT id, customer_id, prefix, key_hash, created_at, revoked_at FROM api_keys "
            "WHERE revoked_at IS NULL ORDER BY customer_id, created_at, id", ())
        return [ApiKey(*row) for row in rows]

    async def revoke_api_key(self, key_id, at, *, author):
        async with self._transaction():
            rows = await self._fetch(
                "SELECT id, customer_id, prefix, key_hash, created_at, revoked_at FROM api_keys "
                "WHERE id = ? AND revoked_at IS NULL", (key_id,))
            if not rows:
                return None
            key = ApiKey(*rows[0])
            await self._execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (at, key_id))
            await self._audit(at, author, "api_key", key_id, CHANGE_REVOKED, _audited_key(key),
                              _audited_key(msgspec.structs.replace(key, revoked_at=at)))
            return key.customer_id

    async def api_key_by_hash(self, key_hash):
        rows = await self._fetch(
            "SELECT id, customer_id, prefix, key_hash, created_at, revoked_at FROM api_keys WHERE key_hash = ?",
            (key_hash,))
        return ApiKey(*rows[0]) if rows else None

    # -- tokens --------------------------------------------------------------------
    _TOKEN_COLUMNS = "id, name, scope, created_at, revoked_at"

    async def add_token(self, token, token_hash, *, author):
        async with self._transaction():
            await self._execute("INSERT INTO admin_tokens (id, token_hash, name, scope, created_at) "
                                "VALUES (?, ?, ?, ?, ?)",
                                (token.id, token_hash, token.name, token.scope, token.created_at))
            await self._audit(token.created_at, author, "token", token.id, CREATED, None, _encode(token).decode())

    async def live_token(self, token_hash):
        rows = await self._fetch(f"SELECT {self._TOKEN_COLUMNS} FROM admin_tokens "
                                 "WHERE token_hash = ? AND revoked_at IS NULL", (token_hash,))
        return Token(*rows[0]) if rows else None

    async def tokens(self):
        rows = await self._fetch(f"SELECT {self._TOKEN_COLUMNS} FROM admin_tokens ORDER BY created_at, id", ())
        return [Token(*row) for row in rows]

    async def revoke_token(self, token_id, at, *, author):
        revoked = await self._revoke_tokens("id", token_id, at, author)
        return revoked[0] if revoked else None

    async def revoke_tokens_named(self, name, at, *, author):
        return len(await self._revoke_tokens("name", name, at, author))

    async def _revoke_tokens(self, column, value, at, author) -> list[Token]:
        # Every live token whose `column` is `value`, revoked at `at`, each in the trail.
        async with self._transaction():
            rows = await self._fetch(f"SELECT {self._TOKEN_COLUMNS} FROM admin_tokens "
                                     f"WHERE {column} = ? AND revoked_at IS NULL", (value,))
            revoked = []
            for row in rows:
                token = Token(*row)
                await self._execute("UPDATE admin_tokens SET revoked_at = ? WHERE id = ?", (at, token.id))
                revoked.append(msgspec.structs.replace(token, revoked_at=at))
                await self._audit(at, author, "token", token.id, CHANGE_REVOKED, _encode(token).decode(),
                                  _encode(revoked[-1]).decode())
            return revoked

    # -- audit trail ---------------------------------------------------------------
    async def _audit(self, at, author, kind, key, change, before, after) -> None:
        # Inside the caller's transaction: the change and its record commit together.
        if not author:
            raise ValueError("a change to the catalog, an API key or a token needs an author")
        await self._execute("INSERT INTO audit_trail (at, who, kind, key, change, before, after) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)", (at, author, kind, key, change, before, after))

    async def audit(self, kind=None, key=None, after_seq=0, limit=100):
        where, args = "WHERE seq > ?", [after_seq]
        for column, value in (("kind", kind), ("key", key)):
            if value is not None:
                where += f" AND {column} = ?"
                args.append(value)
        rows = await self._fetch("SELECT seq, at, who, kind, key, change, before, after "
                                 f"FROM audit_trail {where} ORDER BY seq LIMIT ?", (*args, limit))
        return [AuditEntry(seq, at, who, entry_kind, entry_key, change,
                           None if before is None else _decode(before), None if after is None else _decode(after))
                for seq, at, who, entry_kind, entry_key, change, before, after in rows]

    async def admin_tokens_count(self):
        rows = await self._fetch("SELECT COUNT(*) FROM admin_tokens WHERE revoked_at IS NULL AND scope = 'admin'", ())
        return rows[0][0]

    # -- events --------------------------------------------------------------------
    # Concurrent record_events calls on one store are written together: calls that
    # arrive while another's transaction runs wait, and the next writer takes all
    # those waiting (in arrival order, up to EVENT_CHUNK events: one transaction), as
    # if written one after the other, with one transaction's round trips and commit.
    # When such a group fails, each call is tried alone, so a call fails only by its
    # own events or a store that is down.
    async def record_events(self, events: Sequence[StoredEvent], ratings=None) -> list[str]:
        if not events:
            return []
        call = _Call(events, ratings or [None] * len(events))
        self._waiting.append(call)
        try:
            async with self._writing:
                if not call.done:               # not written yet with an earlier writer's group
                    await self._write_waiting()
        except BaseException:
            if call in self._waiting:           # cancelled before anyone wrote it: nothing kept
                self._waiting.remove(call)
            raise
        if call.error is not None:
            raise call.error
        return call.outcomes

    async def _record_each(self, events, ratings):
        # Each event on its own: one the store refuses (permanently) is REFUSED with why.
        outcomes = []
        for event, rating in zip(events, ratings):
            try:
                outcomes += await self._record([event], [rating])
            except StoreError as error:
                if not error.permanent:
                    raise
                outcomes.append(f"{REFUSED}: the store cannot keep this event ({error})")
        return outcomes

    async def _write_waiting(self):
        group, size = [], 0
        while self._waiting and (not group or size + len(self._waiting[0].events) <= EVENT_CHUNK):
            group.append(self._waiting.pop(0))
            size += len(group[-1].events)
        try:
            if len(group) > 1:
                try:
                    outcomes = await self._record([event for call in group for event in call.events],
                                                  [rating for call in group for rating in call.ratings])
                except StoreError:
                    pass                        # whose events? each call is tried alone below
                else:
                    for call in group:
                        call.outcomes, outcomes = outcomes[:len(call.events)], outcomes[len(call.events):]
                    return
            for call in group:
                try:
                    call.outcomes = await self._record(call.events, call.ratings)
                except StoreError as error:
                    if not error.permanent or len(call.events) == 1:
                        call.error = error
                        continue
                    # A value the store cannot hold: find whose, keep the others.
                    try:
                        call.outcomes = await self._record_each(call.events, call.ratings)
                    except StoreError as again:
                        call.error = again
        except BaseException:
            # Interrupted (cancelled): what was not written waits for the next writer.
            self._waiting[:0] = [call for call in group if not call.done]
            raise

    async def _record(self, events, ratings):
        outcomes = [None] * len(events)
        first = {}                       # key -> (index of its first event, payload hash)
        for index, event in enumerate(events):
            key = (event.kind, event.customer_id, event.event_id)
            digest = payload_hash(event.payload)
            seen = first.get(key)
            if seen is None:
                first[key] = (index, digest)
            else:
                outcomes[index] = DUPLICATE if seen[1] == digest else CONFLICT
        keys = list(first)
        for start in range(0, len(keys), EVENT_CHUNK):
            await self._write_chunk(keys[start:start + EVENT_CHUNK], first, events, ratings, outcomes)
        return outcomes

    # -- quota leases ----------------------------------------------------------------
    async def lease_quota(self, customer_id, metric, period_start, grant, period_end, subscription):
        key = (customer_id, metric, period_start)
        async with self._transaction():
            # A ledger begun now starts at the usage the store knows for the period,
            # read under the totals row's lock (taken before the ledger's, as ingest
            # takes them), so usage kept meanwhile is counted once, here or there.
            await self._execute(
                "INSERT INTO period_totals (customer_id, metric, period_start, period_end, subscription, units, "
                "revenue_nanos, cogs_nanos) VALUES (?, ?, ?, ?, ?, 0, 0, 0) "
                "ON CONFLICT (customer_id, metric, period_start) DO NOTHING", (*key, period_end, subscription))
            [(recorded,)] = await self._fetch("SELECT units FROM period_totals WHERE customer_id = ? AND metric = ? "
                                              "AND period_start = ?" + self.ROW_LOCK_SQL, key)
            await self._execute(
                "INSERT INTO quota_leases (customer_id, metric, period_start, leased) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (customer_id, metric, period_start) DO NOTHING", (*key, recorded))
            rows = await self._fetch("SELECT leased FROM quota_leases WHERE customer_id = ? AND metric = ? "
                                     "AND period_start = ?" + self.ROW_LOCK_SQL, (customer_id, metric, period_start))
            granted = grant(rows[0][0])
            if granted:
                await self._execute("UPDATE quota_leases SET leased = leased + ? WHERE customer_id = ? AND metric = ? "
                                    "AND period_start = ?", (granted, customer_id, metric, period_start))
            return granted

    async def return_quota(self, customer_id, metric, period_start, units):
        await self._execute("UPDATE quota_leases SET leased = CASE WHEN leased > ? THEN leased - ? ELSE 0 END "
                            "WHERE customer_id = ? AND metric = ? AND period_start = ?",
                            (units, units, customer_id, metric, period_start))

    async def take_throttle(self, customer_id, guard_id, metric, take):
        key = (customer_id, guard_id, metric)
        async with self._transaction():
            await self._execute(
                "INSERT INTO throttle_buckets (customer_id, guard_id, metric, spent_until_us) VALUES (?, ?, ?, 0) "
                "ON CONFLICT (customer_id, guard_id, metric) DO NOTHING", key)
            rows = await self._fetch("SELECT spent_until_us FROM throttle_buckets WHERE customer_id = ? "
                                     "AND guard_id = ? AND metric = ?" + self.ROW_LOCK_SQL, key)
            state, result = take(rows[0][0])
            if state != rows[0][0]:
                await self._execute("UPDATE throttle_buckets SET spent_until_us = ? WHERE customer_id = ? "
                                    "AND guard_id = ? AND metric = ?", (state, *key))
            return result

    # Whether an event found new may since have been kept by another writer whose
    # totals rows we have just locked (not on a store that locks all writers out for
    # the whole transaction, as SQLite does).
    LOOK_AGAIN_AFTER_LOCKING = True

    async def _write_chunk(self, chunk, first, events, ratings, outcomes):
        async with self._transaction():
            await self._record_chunk(chunk, first, events, ratings, outcomes)

    async def _record_chunk(self, chunk, first, events, ratings, outcomes):
        # One chunk of a batch's distinct events, in one transaction: sets their outcomes,
        # keeps the new ones, priced in order from their periods' running totals, and
        # moves the totals.
        known = await self._known_hashes(chunk)
        candidates = [key for key in chunk if key not in known]
        totals = {}
        rated = [key for key in candidates if ratings[first[key][0]] is not None]
        if rated:
            # An event's totals row is a function of the event, so with the rows locked no
            # other writer can be keeping these events: look again.
            totals = await self._lock_totals([ratings[first[key][0]] for key in rated])
            if self.LOOK_AGAIN_AFTER_LOCKING:
                known.update(await self._known_hashes(rated))
        for key in chunk:
            if key in known:
                index, digest = first[key]
                outcomes[index] = DUPLICATE if known[key] == digest else CONFLICT
        refused = {}
        new = priced_rows([key for key in chunk if key not in known], first, events, ratings, totals, refused)
        for key, why in refused.items():
            outcomes[first[key][0]] = why
        inserted = await self._insert_events(new) if new else set()
        raced = [row[:3] for row in new if row[:3] not in inserted]
        # Kept by a concurrent writer between our look-up and our insert (only an
        # event with no totals can race: the others were checked under lock).
        known = await self._known_hashes(raced) if raced else {}
        for row in new:
            index, digest = first[row[:3]]
            if row[:3] in inserted:
                outcomes[index] = ACCEPTED
            else:
                outcomes[index] = DUPLICATE if known.get(row[:3]) == digest else CONFLICT
        if totals:
            await self._update_totals(totals)
            await self._count_in_ledgers([rating for key in rated if key in inserted
                                          and (rating := ratings[first[key][0]]).ledgered])

    async def _count_in_ledgers(self, ratings):
        # Usage of hard quotas kept from outside a proxy's lease moves their lease
        # ledgers too (where leasing has begun this period; one begun later starts
        # from the totals), in the transaction that moves the totals.
        sums = {}
        for rating in ratings:
            if rating is not None and rating.ledgered:      # (most events were leased: none)
                key = (rating.customer_id, rating.metric, rating.period_start)
                sums[key] = sums.get(key, 0) + rating.units
        if sums:
            await self._executemany(
                "UPDATE quota_leases SET leased = leased + ? WHERE customer_id = ? AND metric = ? AND period_start = ?",
                [(units, *key) for key, units in sorted(sums.items())])

    async def _update_totals(self, totals):
        await self._executemany(
            "UPDATE period_totals SET units = ?, revenue_nanos = ?, cogs_nanos = ? "
            "WHERE customer_id = ? AND metric = ? AND period_start = ?",
            [(*sums, *key) for key, sums in totals.items()])

    # -- guard levels ----------------------------------------------------------------
    async def guard_levels(self, customer_id=None):
        where, args = ("WHERE customer_id = ?", (customer_id,)) if customer_id is not None else ("", ())
        rows = await self._fetch(f"SELECT {_GUARD_LEVEL_COLUMNS} FROM guard_levels {where} "
                                 "ORDER BY customer_id, metric, mode", args)
        return [GuardLevel(*row) for row in rows]

    async def guard_levels_of(self, customer_ids):
        rows = []
        for part in _parts(sorted(set(customer_ids))):
            rows += await self._fetch(
                f"SELECT {_GUARD_LEVEL_COLUMNS} FROM guard_levels WHERE customer_id IN "
                f"({', '.join(['?'] * len(part))}) ORDER BY customer_id, metric, mode", tuple(part))
        return [GuardLevel(*row) for row in rows]

    async def transition_level(self, action: Action, webhooks=()) -> bool:
        async with self._transaction():
            key = (action.customer_id, action.metric, action.mode)
            await self._execute(
                "INSERT INTO guard_levels (customer_id, metric, mode, guard_id, level, margin_pct, changed_at) "
                "VALUES (?, ?, ?, ?, 0, NULL, ?) ON CONFLICT (customer_id, metric, mode) DO NOTHING",
                (*key, action.guard_id, action.at))
            rows = await self._fetch("SELECT level FROM guard_levels WHERE customer_id = ? AND metric = ? AND mode = ?"
                                     + self.ROW_LOCK_SQL, key)
            if rows[0][0] != action.level_from:
                return False                    # someone else moved it first
            await self._execute(
                "UPDATE guard_levels SET guard_id = ?, level = ?, margin_pct = ?, changed_at = ? "
                "WHERE customer_id = ? AND metric = ? AND mode = ?",
                (action.guard_id, action.level_to, action.margin_pct, action.at, *key))
            [(action_seq,)] = await self._fetch(
                "INSERT INTO actions (customer_id, metric, guard_id, level_from, level_to, margin_pct, "
                "min_margin_pct, mode, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
                (action.customer_id, action.metric, action.guard_id, action.level_from, action.level_to,
                 action.margin_pct, action.min_margin_pct, action.mode, action.at))
            if webhooks:
                await self._executemany(
                    "INSERT INTO webhook_outbox (id, channel, action_seq, body, created_at, next_attempt_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [(webhook.id, webhook.channel, action_seq, webhook.body, action.at, action.at)
                     for webhook in webhooks])
            return True

    async def actions(self, customer_id=None, after_seq=0, limit=100):
        where, args = "WHERE seq > ?", [after_seq]
        if customer_id is not None:
            where += " AND customer_id = ?"
            args.append(customer_id)
        rows = await self._fetch(
            "SELECT seq, customer_id, metric, guard_id, level_from, level_to, margin_pct, min_margin_pct, mode, at "
            f"FROM actions {where} ORDER BY seq LIMIT ?", (*args, limit))
        return [(seq, Action(*rest)) for seq, *rest in rows]

    # -- dead letters ----------------------------------------------------------------------
    async def add_dead_letters(self, letters):
        if letters:
            await self._executemany("INSERT INTO dead_letters (source, entry_id, event, reason, at) "
                                    "VALUES (?, ?, ?, ?, ?)", [tuple(letter) for letter in letters])

    async def dead_letters(self, after_seq=0, limit=100):
        rows = await self._fetch("SELECT seq, source, entry_id, event, reason, at FROM dead_letters WHERE seq > ? "
                                 "ORDER BY seq LIMIT ?", (after_seq, limit))
        return [(seq, DeadLetter(source, entry_id, bytes(event), reason, at))
                for seq, source, entry_id, event, reason, at in rows]

    # -- webhook outbox ------------------------------------------------------------------
    async def claim_webhooks(self, now, lease_s, limit=100):
        async with self._transaction():
            rows = await self._fetch(
                f"SELECT {_WEBHOOK_COLUMNS} FROM webhook_outbox WHERE next_attempt_at <= ? "
                "ORDER BY next_attempt_at, seq LIMIT ?" + self.SKIP_LOCKED_SQL, (now, limit))
            if rows:
                await self._executemany("UPDATE webhook_outbox SET next_attempt_at = ? WHERE seq = ?",
                                        [(now + lease_s, row[0]) for row in rows])
        return [_webhook_delivery((*row[:7], now + lease_s, *row[8:])) for row in rows]

    async def record_webhook_attempt(self, webhook_id, at, error=None, retry_at=None):
        if error is None:
            outcome, args = "delivered_at = ?, next_attempt_at = NULL", (at,)
        elif retry_at is not None:
            outcome, args = "next_attempt_at = ?, last_error = ?", (retry_at, error)
        else:
            outcome, args = "failed_at = ?, next_attempt_at = NULL, last_error = ?", (at, error)
        async with self._transaction():         # a write: on the writing connection
            rows = await self._fetch(
                f"UPDATE webhook_outbox SET attempts = attempts + 1, {outcome} "
                "WHERE id = ? AND next_attempt_at IS NOT NULL RETURNING seq", (*args, webhook_id))
        return bool(rows)

    async def next_webhook_at(self):
        rows = await self._fetch("SELECT MIN(next_attempt_at) FROM webhook_outbox WHERE next_attempt_at IS NOT NULL",
                                 ())
        return rows[0][0]

    async def webhook_counts(self):
        [(pending, delivered, failed)] = await self._fetch(
            "SELECT COUNT(next_attempt_at), COUNT(delivered_at), COUNT(failed_at) FROM webhook_outbox", ())
        return {PENDING: pending, DELIVERED: delivered, FAILED: failed}

    async def webhooks(self, status=None, after_seq=0, limit=100):
        where = "seq > ?"
        if status is not None:
            if status not in _WEBHOOK_STATUS_COLUMN:
                raise StoreError(f"unknown webhook status {status!r}; "
                                 f"expected one of {', '.join(_WEBHOOK_STATUS_COLUMN)}")
            where += f" AND {_WEBHOOK_STATUS_COLUMN[status]} IS NOT NULL"
        rows = await self._fetch(f"SELECT {_WEBHOOK_COLUMNS} FROM webhook_outbox WHERE {where} ORDER BY seq LIMIT ?",
                                 (after_seq, limit))
        return [_webhook_delivery(row) for row in rows]

    async def _lock_totals(self, ratings):
        # The totals rows of `ratings` (created at zero when missing), locked for this
        # transaction, in a fixed order so concurrent batches cannot deadlock:
        # {(customer, metric, period_start): [units, revenue_nanos, cogs_nanos]}.
        rows = {}
        for rating in ratings:
            rows[(rating.customer_id, rating.metric, rating.period_start)] = (rating.period_end, rating.subscription)
        ordered = sorted(rows)
        await self._executemany(
            "INSERT INTO period_totals (customer_id, metric, period_start, period_end, subscription, units, "
            "revenue_nanos, cogs_nanos) VALUES (?, ?, ?, ?, ?, 0, 0, 0) "
            "ON CONFLICT (customer_id, metric, period_start) DO NOTHING",
            [(*key, *rows[key]) for key in ordered])
        values = ", ".join(["(?, ?, CAST(? AS DOUBLE PRECISION))"] * len(ordered))
        found = await self._fetch(
            "SELECT customer_id, metric, period_start, units, revenue_nanos, cogs_nanos FROM period_totals "
            f"WHERE (customer_id, metric, period_start) IN (VALUES {values}) "
            "ORDER BY customer_id, metric, period_start" + self.ROW_LOCK_SQL,
            tuple(value for key in ordered for value in key))
        return {(customer, metric, period_start): [units, revenue, cogs]
                for customer, metric, period_start, units, revenue, cogs in found}

    async def period_totals_of(self, at, customer_ids):
        rows = []
        for part in _parts(sorted(set(customer_ids))):
            rows += await self._fetch(
                "SELECT customer_id, metric, period_start, period_end, subscription, units, revenue_nanos, cogs_nanos "
                f"FROM period_totals WHERE customer_id IN ({', '.join(['?'] * len(part))}) "
                "AND period_start <= ? AND ? < period_end ORDER BY customer_id, metric", (*part, at, at))
        return [PeriodTotals(*row) for row in rows]

    async def period_totals(self, at, customer_id=None):
        where, args = "period_start <= ? AND ? < period_end", [at, at]
        if customer_id is not None:
            where += " AND customer_id = ?"
            args.append(customer_id)
        rows = await self._fetch(
            "SELECT customer_id, metric, period_start, period_end, subscription, units, revenue_nanos, cogs_nanos "
            f"FROM period_totals WHERE {where} ORDER BY customer_id, metric", tuple(args))
        return [PeriodTotals(*row) for row in rows]

    async def _known_hashes(self, keys):
        # (kind, customer_id, event_id) -> payload hash, for those of `keys` already kept.
        # One query per (kind, customer) with the ids in a list: a walk of the unique
        # index, whatever the number of events kept.
        by_customer = {}
        for kind, customer, event_id in keys:
            by_customer.setdefault((kind, customer), []).append(event_id)
        known = {}
        for (kind, customer), event_ids in by_customer.items():
            marks = ", ".join(["?"] * len(event_ids))
            rows = await self._fetch(
                "SELECT event_id, payload_hash FROM events "
                f"WHERE kind = ? AND customer_id = ? AND event_id IN ({marks})", (kind, customer, *event_ids))
            for event_id, digest in rows:
                known[(kind, customer, event_id)] = digest
        return known

    async def events(self, kind, customer_id):
        return await self._stored_events("WHERE kind = ? AND customer_id = ? ORDER BY seq", (kind, customer_id))

    async def add_unrated(self, unrated):
        if unrated:
            await self._executemany(
                "INSERT INTO unrated_events (kind, customer_id, event_id, reason, ingested_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (kind, customer_id, event_id) DO NOTHING", [tuple(row) for row in unrated])

    async def unrated_events(self, after_seq=0, limit=100):
        rows = await self._fetch(
            "SELECT u.seq, u.reason, e.kind, e.customer_id, e.event_id, e.payload, e.occurred_at, e.ingested_at, "
            "e.late, e.provenance FROM unrated_events u JOIN events e ON e.kind = u.kind AND "
            "e.customer_id = u.customer_id AND e.event_id = u.event_id WHERE u.seq > ? ORDER BY u.seq LIMIT ?",
            (after_seq, limit))
        return [(seq, reason, StoredEvent(kind, customer, event_id, bytes(payload), occurred_at, ingested_at,
                                          bool(late), bytes(provenance)))
                for seq, reason, kind, customer, event_id, payload, occurred_at, ingested_at, late, provenance in rows]

    async def rate_unrated(self, rated):
        # (seq, Rating) of unrated events now rated, in order: their totals move as
        # a new event's would, and they are no longer unrated; all in one transaction.
        # One that would carry a running total past its maximum stays unrated.
        if not rated:
            return []
        async with self._transaction():
            ratings = [rating for _, rating in rated]
            totals = await self._lock_totals(ratings)
            done = []
            for seq, rating in rated:
                sums = totals[rating.customer_id, rating.metric, rating.period_start]
                revenue, cogs = rating.price(sums[0])
                if _past_maximum(sums, rating.units, revenue, cogs) is not None:
                    continue
                sums[0] += rating.units
                sums[1] += revenue
                sums[2] += cogs
                done.append((seq, rating))
            await self._update_totals(totals)
            await self._count_in_ledgers([rating for _, rating in done])
            await self._executemany("DELETE FROM unrated_events WHERE seq = ?", [(seq,) for seq, _ in done])
        return [seq for seq, _ in done]

    async def late_events(self, since=0.0, limit=1000):
        return await self._stored_events("WHERE late AND ingested_at >= ? ORDER BY ingested_at, seq LIMIT ?",
                                         (since, limit))

    async def _stored_events(self, where, args):
        rows = await self._fetch(
            "SELECT kind, customer_id, event_id, payload, occurred_at, ingested_at, late, provenance FROM events "
            + where, args)
        return [StoredEvent(kind, customer, event_id, bytes(payload), occurred_at, ingested_at, bool(late),
                            bytes(provenance))
                for kind, customer, event_id, payload, occurred_at, ingested_at, late, provenance in rows]


_WEBHOOK_COLUMNS = ("seq, id, channel, action_seq, body, created_at, attempts, next_attempt_at, delivered_at, "
                    "failed_at, last_error")
# The column that is set exactly while a webhook has a status.
_WEBHOOK_STATUS_COLUMN = {PENDING: "next_attempt_at", DELIVERED: "delivered_at", FAILED: "failed_at"}


def _webhook_delivery(row):
    seq, webhook_id, channel, action_seq, body, created_at, attempts, next_at, delivered_at, failed_at, error = row
    status = DELIVERED if delivered_at is not None else FAILED if failed_at is not None else PENDING
    return WebhookDelivery(seq, webhook_id, channel, action_seq, bytes(body), status, created_at, attempts, next_at,
                           delivered_at, failed_at, error)


def _past_maximum(sums, units, revenue, cogs):
    # Which running total (units, revenue or cost) an event would take past
    # MAX_PERIOD_TOTAL, or None.
    for name, total, added in (("units", sums[0], units), ("revenue (nanos)", sums[1], revenue),
                               ("cost (nanos)", sums[2], cogs)):
        if total + added > MAX_PERIOD_TOTAL:
            return name
    return None


class _Call:
    # One record_events call waiting to be written, and what came of it.
    __slots__ = ("events", "ratings", "outcomes", "error")

    def __init__(self, events, ratings):
        self.events = events
        self.ratings = ratings
        self.outcomes = None
        self.error = None

    @property
    def done(self):
        return self.outcomes is not None or self.error is not None


def priced_rows(keys, first, events, ratings, totals, refused):
    # The events rows for `keys` (new events, in batch order), each rated from its
    # period's running total, which moves on by the event (`totals`, as _lock_totals
    # returns them, is changed in place), with what it earned and cost, and from which
    # plan and period, added to its provenance. An event that would take a total past
    # MAX_PERIOD_TOTAL is left out, and `refused` says why (key -> REFUSED outcome).
    rows = []
    openings = {}       # (id(provenance), id(context)) -> (provenance, context, its priced provenance's opening)
    for key in keys:
        index, digest = first[key]
        event = events[index]
        provenance = event.provenance
        rating = ratings[index]
        if rating is not None:
            sums = totals[rating.customer_id, rating.metric, rating.period_start]
            revenue, cogs = rating.price(sums[0])
            if (sums[0] + rating.units > MAX_PERIOD_TOTAL or sums[1] + revenue > MAX_PERIOD_TOTAL
                    or sums[2] + cogs > MAX_PERIOD_TOTAL):
                refused[key] = (f"{REFUSED}: it would take this billing period's running total of "
                                f"{_past_maximum(sums, rating.units, revenue, cogs)} for {rating.metric} past the "
                                f"maximum of {MAX_PERIOD_TOTAL}")
                continue
            sums[0] += rating.units
            sums[1] += revenue
            sums[2] += cogs
            # A batch shares a few provenances and contexts: each pair is spliced once.
            opening = openings.get((id(provenance), id(rating.context)))
            if opening is None:
                opening = openings[id(provenance), id(rating.context)] = (
                    provenance, rating.context, _priced_opening(provenance, rating.context))
            if opening[2] is not None:
                provenance = b'%s"revenue_nanos":%d,"cogs_nanos":%d}}' % (opening[2], revenue, cogs)
            else:
                document = _decode(provenance)
                document["pricing"] = {**rating.context, "revenue_nanos": revenue, "cogs_nanos": cogs}
                provenance = _encode(document)
        rows.append((*key, digest, event.payload, event.occurred_at, event.ingested_at, event.late, provenance))
    return rows


def _priced_opening(provenance, context):
    # The provenance (a JSON object) with a "pricing" object holding `context` (plan,
    # period, ...) spliced in, up to where what the event earned and cost follows;
    # None when it cannot be spliced without decoding it (not an object as encoded
    # here, or a pricing already in it).
    body = provenance.strip()
    if body[:1] != b"{" or body[-1:] != b"}" or b'"pricing"' in body:
        return None
    inner = body[1:-1].strip()
    pricing = _encode({name: value for name, value in context.items() if name not in ("revenue_nanos", "cogs_nanos")})
    pricing = pricing[:-1] + b"," if len(pricing) > 2 else b"{"
    return b'{%s,"pricing":%s' % (inner, pricing) if inner else b'{"pricing":%s' % pricing


def _parts(values, size=500):
    # `values` (a list) in parts of at most `size`, for IN lists well within parameter limits.
    return [values[start:start + size] for start in range(0, len(values), size)]


def _check_kind(kind):
    if kind not in CATALOG_KINDS:
        raise StoreError(f"unknown catalog kind {kind!r}; expected one of {', '.join(CATALOG_KINDS)}")
