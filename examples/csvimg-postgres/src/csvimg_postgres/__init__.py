"""PostgreSQL storage and queue for csvimg (``postgresql://`` URLs).

The example backend plugin of csvimg: a complete, real backend in one
module, installed as its own package and found by csvimg through the
entry point group ``csvimg`` (see ``pyproject.toml``). It proves itself
with the contract suite that ships in `csvimg.testing`.

URLs are libpq connection URIs, plus two parameters of our own::

    postgresql://user:password@db.internal:5432/csvimg
    postgres://127.0.0.1/test?schema=shop1          tables in schema "shop1"
    postgresql:///csvimg?host=/run/postgresql       over the Unix socket
    postgresql://db/csvimg?pool_size=20&sslmode=require

``schema`` (default ``csvimg``) names the schema holding the tables, made
on `open` if missing, so several deployments or test runs share one
database; ``pool_size`` (default 10) caps the connections one backend
object holds. Every other parameter goes to libpq untouched.

The same URL serves as storage *and* queue (csvimg's queue URL defaults
to the storage URL), so ``csvimg serve --storage postgresql://...`` needs
nothing else but a blob store.

How it stays correct with many workers on many hosts:

* `PostgresStorage.create_request` writes the request, its rows and items
  in one transaction (rows and items with ``COPY``).
* Every change of state after that is a `csvimg.ledger` operation:
  `PostgresStorage.apply` reads and locks the rows it asks for (items
  before their requests, each in id order, so transactions never wait on
  each other in a circle), hands them to the ledger, which holds every
  rule, and writes its answer in the same transaction. Two finishers of
  one request queue on the request row lock, so exactly one sees the last
  item finish.
* The sweep, the outbox and the queue (`PostgresQueue.claim`) pick rows
  with ``FOR UPDATE SKIP LOCKED``: any number of processes take disjoint
  rows without waiting on each other.
* Times are the workers' clocks (epoch seconds, as in every csvimg
  backend): keep the hosts' clocks in sync (NTP), as leases compare them.

Needs PostgreSQL 13 or later (``gen_random_uuid``) and psycopg 3 (async);
runs on asyncio, which is what csvimg's server and workers use. Any
`psycopg.Error` surfaces as `csvimg.StorageError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import psycopg
from csvimg import (
    BackendRegistry,
    ConfigError,
    Delivery,
    Event,
    Item,
    ItemStatus,
    ProcessOptions,
    Request,
    RequestStatus,
    Row,
    Settings,
    StorageError,
    Webhook,
    hookimpl,
    ledger,
)
from csvimg.backends import Claim
from csvimg.jobs import item_rows, now
from psycopg import errors, pq, sql
from psycopg.types.json import Jsonb

__all__ = [
    "DEFAULT_POOL_SIZE",
    "DEFAULT_SCHEMA",
    "SCHEMES",
    "PostgresQueue",
    "PostgresStorage",
    "PostgresURL",
    "csvimg_register_backends",
    "parse_postgres_url",
]

SCHEMES: Final = ("postgresql", "postgres")
"""The URL schemes this plugin serves (libpq accepts both)."""

DEFAULT_SCHEMA: Final = "csvimg"
"""The schema holding the tables when the URL names none."""

DEFAULT_POOL_SIZE: Final = 10
"""Connections one backend object keeps at most."""

_OWN_PARAMS: Final = frozenset({"schema", "pool_size"})
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")


class PostgresURL:
    """A parsed ``postgresql://`` URL: libpq's part and ours."""

    def __init__(self, conninfo: str, schema: str, pool_size: int) -> None:
        self.conninfo = conninfo
        """The URL for libpq, without ``schema`` and ``pool_size``."""
        self.schema = schema
        """The schema holding the tables."""
        self.pool_size = pool_size
        """Most connections kept at once."""

    def redacted(self) -> str:
        """The libpq URL with any password replaced by ``***`` (for logs and reprs)."""
        parts = urlsplit(self.conninfo)
        if parts.password is None:
            return self.conninfo
        netloc = parts.netloc.rpartition("@")
        user = netloc[0].split(":", 1)[0]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def parse_postgres_url(url: str) -> PostgresURL:
    """Split a ``postgresql://`` / ``postgres://`` URL into libpq's part and ours.

    Raises `csvimg.ConfigError` for another scheme, a schema name that is
    not a plain identifier, or a ``pool_size`` that is not a whole number
    of at least 1.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES:
        raise ConfigError(f"not a PostgreSQL URL: {url!r} (use postgresql://...)")
    schema = DEFAULT_SCHEMA
    pool_size = DEFAULT_POOL_SIZE
    passed: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "schema":
            if _IDENTIFIER.match(value) is None:
                raise ConfigError(
                    f"schema={value!r}: use letters, digits and _ (at most 63, not first a digit)"
                )
            schema = value
        elif name == "pool_size":
            try:
                pool_size = int(value)
            except ValueError:
                raise ConfigError(f"pool_size must be a whole number, not {value!r}") from None
            if pool_size < 1:
                raise ConfigError(f"pool_size must be at least 1, not {pool_size}")
        else:
            passed.append((name, value))
    conninfo = urlunsplit(parts._replace(query=urlencode(passed)))
    return PostgresURL(conninfo, schema, pool_size)


def _lock_id(schema: str) -> int:
    """A stable signed 64-bit advisory-lock id for creating *schema*'s tables."""
    digest = hashlib.blake2b(f"csvimg:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _describe(exc: psycopg.Error, where: str) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"PostgreSQL {where}: {text}"


class _Pool:
    """A few async connections to one database, search_path set to our schema.

    Connections are made lazily (at most ``size`` at once), are in
    autocommit mode (a read is one statement; writes use `transaction`),
    and one that comes back broken or in the middle of something (a
    cancelled query) is closed rather than reused.
    """

    def __init__(self, url: PostgresURL, schema_ddl: str) -> None:
        self.url = url
        self._ddl = schema_ddl
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._limiter: anyio.CapacityLimiter | None = None
        self._open = False

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(self.url.conninfo, autocommit=True)
        try:
            await conn.execute(
                sql.SQL("SET search_path TO {}").format(sql.Identifier(self.url.schema))
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise
        return conn

    async def _release(self, conn: psycopg.AsyncConnection[Any]) -> None:
        reusable = (
            self._open
            and not conn.closed
            and not conn.broken
            and conn.info.transaction_status == pq.TransactionStatus.IDLE
            and len(self._idle) < self.url.pool_size
        )
        if reusable:
            self._idle.append(conn)
            return
        with anyio.CancelScope(shield=True):
            await conn.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """Borrow a connection; `psycopg.Error` inside becomes `StorageError`."""
        if not self._open or self._limiter is None:
            raise StorageError(f"PostgreSQL backend {self.url.redacted()} is not open")
        async with self._limiter:
            try:
                conn = self._idle.pop() if self._idle else await self._connect()
            except psycopg.Error as exc:
                raise StorageError(_describe(exc, f"at {self.url.redacted()}")) from exc
            try:
                yield conn
            except psycopg.Error as exc:
                raise StorageError(_describe(exc, "query failed")) from exc
            finally:
                await self._release(conn)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """Borrow a connection inside one transaction (committed unless an error escapes)."""
        async with self.connection() as conn, conn.transaction():
            yield conn

    async def open(self) -> None:
        """Create the schema and tables if needed."""
        # A limiter belongs to one event loop; a reopened backend may be on another.
        self._limiter = anyio.CapacityLimiter(self.url.pool_size)
        self._open = True
        schema = sql.Identifier(self.url.schema)
        try:
            async with self.transaction() as conn:
                # Two processes opening a fresh database at once would race
                # on CREATE ... IF NOT EXISTS (a unique violation in the
                # catalog): one waits for the other here instead.
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_id(self.url.schema),))
                await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
                for statement in self._ddl.split(";"):
                    if statement.strip():
                        await conn.execute(statement.encode())  # DDL text is ours
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the idle connections; borrowed ones close when handed back."""
        self._open = False
        idle, self._idle = self._idle, []
        with anyio.CancelScope(shield=True):
            for conn in idle:
                await conn.close()

    async def ping(self) -> None:
        """Raise `StorageError` unless a query answers."""
        async with self.connection() as conn:
            await conn.execute("SELECT 1")


# --------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------

_STORAGE_DDL: Final = """
CREATE TABLE IF NOT EXISTS requests (
    id text PRIMARY KEY,
    seqno bigint GENERATED ALWAYS AS IDENTITY,
    status text NOT NULL,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL,
    total integer NOT NULL,
    done integer NOT NULL,
    failed integer NOT NULL,
    header text[] NOT NULL,
    url_column integer NOT NULL,
    callback_url text,
    options jsonb NOT NULL,
    owner text,
    filename text
);
CREATE INDEX IF NOT EXISTS requests_created ON requests (created_at DESC, seqno DESC);
CREATE INDEX IF NOT EXISTS requests_owner ON requests (owner, created_at DESC, seqno DESC);

CREATE TABLE IF NOT EXISTS rows (
    request_id text NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    idx integer NOT NULL,
    line integer NOT NULL,
    cells text[] NOT NULL,
    urls text[] NOT NULL,
    PRIMARY KEY (request_id, idx)
);

CREATE TABLE IF NOT EXISTS items (
    id text PRIMARY KEY,
    request_id text NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    seq integer NOT NULL,
    row_index integer NOT NULL,
    url_position integer NOT NULL,
    url text NOT NULL,
    status text NOT NULL,
    attempts integer NOT NULL,
    lease_until double precision,
    output_key text,
    content_type text,
    bytes_in bigint,
    bytes_out bigint,
    width integer,
    height integer,
    error_code text,
    error_message text,
    updated_at double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS items_request_seq ON items (request_id, seq);
CREATE INDEX IF NOT EXISTS items_leased ON items (lease_until) WHERE status = 'PROCESSING';
CREATE INDEX IF NOT EXISTS items_pending ON items (updated_at) WHERE status = 'PENDING';

CREATE TABLE IF NOT EXISTS webhooks (
    id text PRIMARY KEY,
    seqno bigint GENERATED ALWAYS AS IDENTITY,
    url text NOT NULL,
    secret text NOT NULL,
    created_at double precision NOT NULL,
    owner text,
    active boolean NOT NULL
);
CREATE INDEX IF NOT EXISTS webhooks_owner ON webhooks (owner, created_at, seqno);

CREATE TABLE IF NOT EXISTS events (
    id text PRIMARY KEY,
    seqno bigint GENERATED ALWAYS AS IDENTITY,
    type text NOT NULL,
    request_id text NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    owner text,
    callback_url text,
    created_at double precision NOT NULL,
    attempts integer NOT NULL,
    next_attempt_at double precision,
    lease_until double precision
);
CREATE INDEX IF NOT EXISTS events_due ON events (next_attempt_at)
    WHERE next_attempt_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS deliveries (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id text NOT NULL,
    event_id text NOT NULL,
    url text NOT NULL,
    attempt integer NOT NULL,
    at double precision NOT NULL,
    status_code integer,
    error text,
    webhook_id text
);
CREATE INDEX IF NOT EXISTS deliveries_request ON deliveries (request_id, seq)
"""

_REQUEST_COLUMNS: Final = (
    "id, status, created_at, updated_at, total, done, failed, header, url_column, "
    "callback_url, options, owner, filename"
)
_ITEM_COLUMNS: Final = (
    "id, request_id, row_index, url_position, url, status, attempts, output_key, "
    "content_type, bytes_in, bytes_out, width, height, error_code, error_message, "
    "lease_until, updated_at"
)
_EVENT_COLUMNS: Final = (
    "id, type, request_id, created_at, owner, callback_url, attempts, next_attempt_at, "
    "lease_until"
)
# Built from the constant column lists above only; every value is a bound parameter.
_SELECT_REQUESTS: Final = f"SELECT {_REQUEST_COLUMNS} FROM requests"  # noqa: S608
_SELECT_ITEMS: Final = f"SELECT {_ITEM_COLUMNS} FROM items"  # noqa: S608
_SELECT_EVENTS: Final = f"SELECT {_EVENT_COLUMNS} FROM events"  # noqa: S608
# The statuses are literals so that the partial indexes items_leased and
# items_pending serve these.
_SELECT_EXPIRED: Final = (
    _SELECT_ITEMS + " WHERE status = 'PROCESSING' AND lease_until < %s"
    " ORDER BY lease_until LIMIT %s FOR UPDATE SKIP LOCKED"
)
_SELECT_FORGOTTEN: Final = (
    _SELECT_ITEMS + " WHERE status = 'PENDING' AND updated_at < %s"
    " ORDER BY updated_at LIMIT %s FOR UPDATE SKIP LOCKED"
)


def _request_from(r: Sequence[Any]) -> Request:
    return Request(
        id=r[0],
        status=RequestStatus(r[1]),
        created_at=r[2],
        updated_at=r[3],
        total=r[4],
        done=r[5],
        failed=r[6],
        header=tuple(r[7]),
        url_column=r[8],
        callback_url=r[9],
        options=ProcessOptions.from_dict(r[10]),
        owner=r[11],
        filename=r[12],
    )


def _item_from(r: Sequence[Any]) -> Item:
    return Item(
        id=r[0],
        request_id=r[1],
        row=r[2],
        position=r[3],
        url=r[4],
        status=ItemStatus(r[5]),
        attempts=r[6],
        output_key=r[7],
        content_type=r[8],
        bytes_in=r[9],
        bytes_out=r[10],
        width=r[11],
        height=r[12],
        error_code=r[13],
        error_message=r[14],
        lease_until=r[15],
        updated_at=r[16],
    )


def _event_from(r: Sequence[Any]) -> Event:
    return Event(
        id=r[0],
        type=r[1],
        request_id=r[2],
        created_at=r[3],
        owner=r[4],
        callback_url=r[5],
        attempts=r[6],
        next_attempt_at=r[7],
        lease_until=r[8],
    )


def _webhook_from(r: Sequence[Any]) -> Webhook:
    return Webhook(id=r[0], url=r[1], secret=r[2], created_at=r[3], owner=r[4], active=r[5])


async def _get_item(conn: psycopg.AsyncConnection[Any], item_id: str) -> Item | None:
    cur = await conn.execute(_SELECT_ITEMS + " WHERE id = %s", (item_id,))
    row = await cur.fetchone()
    return None if row is None else _item_from(row)


async def _read(conn: psycopg.AsyncConnection[Any], reads: ledger.Reads) -> ledger.State:
    """Read and lock what a ledger operation asks for.

    Items are locked before their requests, each in id order, so two
    transactions never wait on each other in a circle; the sweep and the
    outbox skip rows another transaction holds (``SKIP LOCKED``), so any
    number of sweepers take disjoint rows.
    """
    items: dict[str, Item] = {}
    if reads.item_ids:
        cur = await conn.execute(
            _SELECT_ITEMS + " WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
            (sorted(reads.item_ids),),
        )
        items.update((i.id, i) for i in map(_item_from, await cur.fetchall()))
    if reads.stale is not None:
        q = reads.stale
        for query, bound in ((_SELECT_EXPIRED, q.now), (_SELECT_FORGOTTEN, q.pending_before)):
            cur = await conn.execute(query, (bound, q.limit))
            items.update((i.id, i) for i in map(_item_from, await cur.fetchall()))
    events: dict[str, Event] = {}
    if reads.event_ids:
        cur = await conn.execute(
            _SELECT_EVENTS + " WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (list(reads.event_ids),)
        )
        events.update((e.id, e) for e in map(_event_from, await cur.fetchall()))
    if reads.due is not None:
        cur = await conn.execute(
            _SELECT_EVENTS + " WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= %(now)s"
            " AND (lease_until IS NULL OR lease_until <= %(now)s)"
            " ORDER BY created_at, seqno LIMIT %(limit)s FOR UPDATE SKIP LOCKED",
            {"now": reads.due.now, "limit": reads.due.limit},
        )
        events.update((e.id, e) for e in map(_event_from, await cur.fetchall()))
    lock = " FOR UPDATE" if reads.item_ids else ""
    cur = await conn.execute(
        _SELECT_REQUESTS + " WHERE id = ANY(%s) ORDER BY id" + lock,
        (sorted({i.request_id for i in items.values()}),),
    )
    requests = {r.id: r for r in map(_request_from, await cur.fetchall())}
    return ledger.State(items=items, requests=requests, events=events)


async def _write(conn: psycopg.AsyncConnection[Any], changes: ledger.Changes) -> None:
    """Write what a ledger operation decided (items and requests exist; events upsert)."""
    async with conn.cursor() as cur:
        if changes.items:
            await cur.executemany(
                "UPDATE items SET status = %s, attempts = %s, lease_until = %s, "
                "output_key = %s, content_type = %s, bytes_in = %s, bytes_out = %s, "
                "width = %s, height = %s, error_code = %s, error_message = %s, "
                "updated_at = %s WHERE id = %s",
                [
                    (
                        i.status.value, i.attempts, i.lease_until, i.output_key,
                        i.content_type, i.bytes_in, i.bytes_out, i.width, i.height,
                        i.error_code, i.error_message, i.updated_at, i.id,
                    )
                    for i in changes.items
                ],
            )
        if changes.requests:
            await cur.executemany(
                "UPDATE requests SET status = %s, done = %s, failed = %s, updated_at = %s "
                "WHERE id = %s",
                [(r.status.value, r.done, r.failed, r.updated_at, r.id) for r in changes.requests],
            )
        if changes.events:
            await cur.executemany(
                "INSERT INTO events (id, type, request_id, owner, callback_url, created_at, "
                "attempts, next_attempt_at, lease_until) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
                "attempts = EXCLUDED.attempts, next_attempt_at = EXCLUDED.next_attempt_at, "
                "lease_until = EXCLUDED.lease_until",
                [
                    (
                        e.id, e.type, e.request_id, e.owner, e.callback_url, e.created_at,
                        e.attempts, e.next_attempt_at, e.lease_until,
                    )
                    for e in changes.events
                ],
            )


class PostgresStorage:
    """Storage in PostgreSQL tables; see `csvimg.backends.Storage`.

    One object serves any number of tasks of one event loop through a small
    connection pool; any number of objects (processes, hosts) may share the
    database.
    """

    def __init__(self, url: str | PostgresURL) -> None:
        self.url = parse_postgres_url(url) if isinstance(url, str) else url
        self._pool = _Pool(self.url, _STORAGE_DDL)

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> PostgresStorage:
        """Build from ``postgresql://...`` (see `parse_postgres_url`)."""
        return cls(url)

    def __repr__(self) -> str:
        return f"PostgresStorage({self.url.redacted()!r}, schema={self.url.schema!r})"

    async def open(self) -> None:
        """Create the schema and tables if needed."""
        await self._pool.open()

    async def close(self) -> None:
        """Close the connections (the database keeps everything)."""
        await self._pool.close()

    async def ping(self) -> None:
        """Raise `StorageError` unless the database answers."""
        await self._pool.ping()

    # -- requests, rows, items ------------------------------------------------

    async def create_request(self, request: Request, rows: Sequence[Row]) -> None:
        """Insert the request, its rows and their items in one transaction.

        The items are made from the rows (`csvimg.jobs.item_rows`) as they
        are copied: only the columns a new item sets, no `Item` objects.
        """
        rid = request.id
        async with self._pool.transaction() as conn:
            try:
                await conn.execute(
                    f"INSERT INTO requests ({_REQUEST_COLUMNS}) "  # noqa: S608 - constant columns
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s::text[], %s, %s, %s, %s, %s)",
                    (
                        rid,
                        request.status.value,
                        request.created_at,
                        request.updated_at,
                        request.total,
                        request.done,
                        request.failed,
                        list(request.header),
                        request.url_column,
                        request.callback_url,
                        Jsonb(request.options.to_dict()),
                        request.owner,
                        request.filename,
                    ),
                )
            except errors.UniqueViolation:
                raise StorageError(f"request {rid} exists already") from None
            cur = conn.cursor()
            # COPY: 300,000 items go in one round trip instead of 300,000.
            async with cur.copy(
                "COPY rows (request_id, idx, line, cells, urls) FROM STDIN"
            ) as copy:
                copy.set_types(["text", "int4", "int4", "text[]", "text[]"])
                for r in rows:
                    await copy.write_row((rid, r.index, r.line, list(r.cells), list(r.urls)))
            prefix = f"{rid}."
            at = request.created_at
            pending = ItemStatus.PENDING.value
            try:
                async with cur.copy(
                    "COPY items (id, request_id, seq, row_index, url_position, url, status, "
                    "attempts, updated_at) FROM STDIN"
                ) as copy:
                    for seq, row, position, url in item_rows(rows):
                        await copy.write_row(
                            (prefix + str(seq), rid, seq, row, position, url, pending, 0, at)
                        )
            except errors.UniqueViolation as exc:
                raise StorageError(f"request {rid}: duplicate item id ({exc})") from None

    async def get_request(self, request_id: str) -> Request | None:
        """Return the request or None."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(_SELECT_REQUESTS + " WHERE id = %s", (request_id,))
            row = await cur.fetchone()
        return None if row is None else _request_from(row)

    async def list_requests(self, *, owner: str | None = None, limit: int = 50) -> list[Request]:
        """Newest first (of *owner* when given)."""
        async with self._pool.connection() as conn:
            if owner is None:
                cur = await conn.execute(
                    _SELECT_REQUESTS + " ORDER BY created_at DESC, seqno DESC LIMIT %s",
                    (limit,),
                )
            else:
                cur = await conn.execute(
                    _SELECT_REQUESTS
                    + " WHERE owner = %s ORDER BY created_at DESC, seqno DESC LIMIT %s",
                    (owner, limit),
                )
            return [_request_from(r) for r in await cur.fetchall()]

    async def list_rows(self, request_id: str, *, offset: int = 0, limit: int = 1000) -> list[Row]:
        """Rows in upload order."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT idx, line, cells, urls FROM rows WHERE request_id = %s "
                "ORDER BY idx LIMIT %s OFFSET %s",
                (request_id, limit, offset),
            )
            return [
                Row(index=r[0], line=r[1], cells=tuple(r[2]), urls=tuple(r[3]))
                for r in await cur.fetchall()
            ]

    async def list_items(
        self, request_id: str, *, offset: int = 0, limit: int = 1000
    ) -> list[Item]:
        """Items in (row, position) order, as they were created."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                _SELECT_ITEMS + " WHERE request_id = %s ORDER BY seq LIMIT %s OFFSET %s",
                (request_id, limit, offset),
            )
            return [_item_from(r) for r in await cur.fetchall()]

    async def get_item(self, item_id: str) -> Item | None:
        """Return the item or None."""
        async with self._pool.connection() as conn:
            return await _get_item(conn, item_id)

    # -- the job's state changes ---------------------------------------------------

    # --8<-- [start:apply]
    async def apply(self, op: ledger.Operation) -> ledger.Changes:
        """Apply a ledger operation in one transaction (see `csvimg.backends.Storage`)."""
        async with self._pool.transaction() as conn:
            changes = op.decide(await _read(conn, op.reads))
            if not changes.empty:
                await _write(conn, changes)
            return changes

    # --8<-- [end:apply]

    # -- webhooks, outbox, deliveries ---------------------------------------------

    async def add_webhook(self, webhook: Webhook) -> None:
        """Register a receiver (replacing one with the same id)."""
        async with self._pool.connection() as conn:
            await conn.execute(
                "INSERT INTO webhooks (id, url, secret, created_at, owner, active) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
                "url = EXCLUDED.url, secret = EXCLUDED.secret, created_at = EXCLUDED.created_at, "
                "owner = EXCLUDED.owner, active = EXCLUDED.active",
                (
                    webhook.id,
                    webhook.url,
                    webhook.secret,
                    webhook.created_at,
                    webhook.owner,
                    webhook.active,
                ),
            )

    async def list_webhooks(self, *, owner: str | None = None) -> list[Webhook]:
        """Registrations of *owner* (None: the ownerless ones), oldest first."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id, url, secret, created_at, owner, active FROM webhooks "
                "WHERE owner IS NOT DISTINCT FROM %s ORDER BY created_at, seqno",
                (owner,),
            )
            return [_webhook_from(r) for r in await cur.fetchall()]

    async def set_webhook_active(self, webhook_id: str, active: bool) -> None:
        """Enable or disable a registration (unknown ids are ignored)."""
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE webhooks SET active = %s WHERE id = %s", (active, webhook_id)
            )

    async def delete_webhook(self, webhook_id: str, *, owner: str | None = None) -> bool:
        """Delete a registration of *owner*."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM webhooks WHERE id = %s AND owner IS NOT DISTINCT FROM %s",
                (webhook_id, owner),
            )
            return cur.rowcount > 0

    async def add_delivery(self, request_id: str, delivery: Delivery) -> None:
        """Append one attempt to the request's log."""
        async with self._pool.connection() as conn:
            await conn.execute(
                "INSERT INTO deliveries (request_id, event_id, url, attempt, at, status_code, "
                "error, webhook_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    request_id,
                    delivery.event_id,
                    delivery.url,
                    delivery.attempt,
                    delivery.at,
                    delivery.status_code,
                    delivery.error,
                    delivery.webhook_id,
                ),
            )

    async def list_deliveries(self, request_id: str) -> list[Delivery]:
        """Return the request's attempts, oldest first."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT event_id, url, attempt, at, status_code, error, webhook_id "
                "FROM deliveries WHERE request_id = %s ORDER BY seq",
                (request_id,),
            )
            return [
                Delivery(
                    event_id=r[0],
                    url=r[1],
                    attempt=r[2],
                    at=r[3],
                    status_code=r[4],
                    error=r[5],
                    webhook_id=r[6],
                )
                for r in await cur.fetchall()
            ]


# --------------------------------------------------------------------------
# Queue
# --------------------------------------------------------------------------

# While leased, available_at = lease_until, so "ready" is one range scan of
# one index; lease_until is kept too so a row says plainly why it waits.
_QUEUE_DDL: Final = """
CREATE TABLE IF NOT EXISTS queue_entries (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    item_id text NOT NULL,
    available_at double precision NOT NULL,
    lease_token text,
    lease_until double precision,
    consumer text,
    deliveries integer NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS queue_entries_ready ON queue_entries (available_at, id)
"""

_CLAIM: Final = (
    "WITH ready AS ("
    "  SELECT id FROM queue_entries WHERE available_at <= %(now)s"
    "  ORDER BY available_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
    ") UPDATE queue_entries q SET"
    "  lease_token = q.id::text || '-' || replace(gen_random_uuid()::text, '-', ''),"
    "  lease_until = %(until)s, available_at = %(until)s, consumer = %(consumer)s,"
    "  deliveries = q.deliveries + 1 "
    "FROM ready WHERE q.id = ready.id "
    "RETURNING q.id, q.item_id, q.lease_token, q.deliveries"
)


def _token_row(token: str) -> int | None:
    head, sep, _ = token.partition("-")
    if not sep or not head.isdigit():
        return None
    return int(head)


class PostgresQueue:
    """An at-least-once queue of item ids in a PostgreSQL table; see `csvimg.backends.Queue`.

    A claim leases ready rows with ``FOR UPDATE SKIP LOCKED`` and a fresh
    token that embeds the row id, so ``ack`` / ``release`` / ``extend``
    touch exactly that row and only while the lease is still this claim's.
    Waiting consumers poll (50 ms growing to 250 ms) and wake at once when
    this same object enqueues.
    """

    poll_min = 0.05
    """First pause between polls of an empty queue (seconds)."""
    poll_max = 0.25
    """Longest pause between polls (seconds)."""

    def __init__(self, url: str | PostgresURL) -> None:
        self.url = parse_postgres_url(url) if isinstance(url, str) else url
        self._pool = _Pool(self.url, _QUEUE_DDL)
        self._wakeup: anyio.Event | None = None

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> PostgresQueue:
        """Build from ``postgresql://...`` (see `parse_postgres_url`)."""
        return cls(url)

    def __repr__(self) -> str:
        return f"PostgresQueue({self.url.redacted()!r}, schema={self.url.schema!r})"

    async def open(self) -> None:
        """Create the queue table if needed."""
        self._wakeup = None
        await self._pool.open()

    async def close(self) -> None:
        """Close the connections (queued ids stay in the table)."""
        await self._pool.close()

    async def ping(self) -> None:
        """Raise `StorageError` unless the database answers."""
        await self._pool.ping()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    async def enqueue(self, item_ids: Sequence[str]) -> None:
        """Add ids, ready now."""
        if not item_ids:
            return
        at = now()
        async with self._pool.connection() as conn:
            cur = conn.cursor()
            async with cur.copy("COPY queue_entries (item_id, available_at) FROM STDIN") as copy:
                for item_id in item_ids:
                    await copy.write_row((item_id, at))
        self._wake()

    async def _take(
        self, consumer: str, max_items: int, lease_seconds: float
    ) -> tuple[list[Claim], float | None]:
        at = now()
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                _CLAIM,
                {"now": at, "limit": max_items, "until": at + lease_seconds, "consumer": consumer},
            )
            rows = await cur.fetchall()
            if rows:
                rows.sort(key=lambda r: r[0])
                claims = [Claim(item_id=r[1], token=r[2], deliveries=r[3]) for r in rows]
                return claims, None
            cur = await conn.execute("SELECT min(available_at) FROM queue_entries")
            due = await cur.fetchone()
        return [], None if due is None else due[0]

    async def claim(
        self, *, consumer: str, max_items: int, lease_seconds: float, wait: float
    ) -> list[Claim]:
        """Lease up to *max_items* ids, polling for up to *wait* seconds."""
        deadline = anyio.current_time() + wait
        pause = self.poll_min
        while True:
            claims, due = await self._take(consumer, max_items, lease_seconds)
            remaining = deadline - anyio.current_time()
            if claims or remaining <= 0:
                return claims
            sleep = min(pause, remaining)
            if due is not None:
                # Something is leased or delayed: wake when it comes due.
                sleep = max(0.001, min(sleep, due - now()))
            pause = min(pause * 1.5, self.poll_max)
            if self._wakeup is None:
                self._wakeup = anyio.Event()
            with anyio.move_on_after(sleep):
                await self._wakeup.wait()

    @staticmethod
    def _rows(claims: Sequence[Claim]) -> tuple[list[int], list[str]]:
        held = [(rid, c.token) for c in claims if (rid := _token_row(c.token)) is not None]
        return [r for r, _ in held], [t for _, t in held]

    async def ack_many(self, claims: Sequence[Claim]) -> None:
        """Delete the ids these claims still hold: one statement."""
        ids, tokens = self._rows(claims)
        if not ids:
            return
        async with self._pool.connection() as conn:
            await conn.execute(
                "DELETE FROM queue_entries q "
                "USING unnest(%s::bigint[], %s::text[]) AS t(id, token) "
                "WHERE q.id = t.id AND q.lease_token = t.token",
                (ids, tokens),
            )

    async def release_many(self, claims: Sequence[Claim], *, delay: float = 0.0) -> None:
        """Hand the ids these claims still hold back, ready after *delay* seconds."""
        ids, tokens = self._rows(claims)
        if not ids:
            return
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE queue_entries q SET lease_token = NULL, lease_until = NULL, "
                "consumer = NULL, available_at = %s "
                "FROM unnest(%s::bigint[], %s::text[]) AS t(id, token) "
                "WHERE q.id = t.id AND q.lease_token = t.token",
                (now() + delay, ids, tokens),
            )
        self._wake()

    async def extend_many(self, claims: Sequence[Claim], *, lease_seconds: float) -> None:
        """Hold the ids these claims still hold *lease_seconds* more: one statement."""
        ids, tokens = self._rows(claims)
        if not ids:
            return
        until = now() + lease_seconds
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE queue_entries q SET lease_until = %s, available_at = %s "
                "FROM unnest(%s::bigint[], %s::text[]) AS t(id, token) "
                "WHERE q.id = t.id AND q.lease_token = t.token",
                (until, until, ids, tokens),
            )

    async def depth(self) -> int:
        """Count waiting plus leased ids."""
        async with self._pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM queue_entries")
            row = await cur.fetchone()
        return 0 if row is None else int(row[0])


# --------------------------------------------------------------------------
# The plugin
# --------------------------------------------------------------------------


# --8<-- [start:hook]
@hookimpl
def csvimg_register_backends(registry: BackendRegistry) -> None:
    """Serve ``postgresql://`` and ``postgres://`` for storage and queue."""
    for scheme in SCHEMES:
        registry.add_storage(scheme, PostgresStorage.from_url)
        registry.add_queue(scheme, PostgresQueue.from_url)


# --8<-- [end:hook]
