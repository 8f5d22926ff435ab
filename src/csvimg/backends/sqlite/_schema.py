"""The SQL of the SQLite backends: tables, indexes, migrations and statements.

``CREATE ... IF NOT EXISTS`` and ``DROP INDEX IF EXISTS`` run on every
open (`_Database.open`), so a file made by an earlier version is brought
up to date there. Statements built with f-strings interpolate only the
constant column lists below; every value is a bound parameter.
"""

from __future__ import annotations

import sqlite3

_STORAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    total INTEGER NOT NULL,
    done INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    header TEXT NOT NULL,
    url_column INTEGER NOT NULL,
    callback_url TEXT,
    options TEXT NOT NULL,
    owner TEXT,
    filename TEXT
);
CREATE INDEX IF NOT EXISTS requests_created ON requests (created_at);
CREATE INDEX IF NOT EXISTS requests_owner_created ON requests (owner, created_at);

CREATE TABLE IF NOT EXISTS rows (
    request_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    line INTEGER NOT NULL,
    cells TEXT NOT NULL,
    urls TEXT NOT NULL,
    PRIMARY KEY (request_id, idx)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    row INTEGER NOT NULL,
    position INTEGER NOT NULL,
    url TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    lease_until REAL,
    output_key TEXT,
    content_type TEXT,
    bytes_in INTEGER,
    bytes_out INTEGER,
    width INTEGER,
    height INTEGER,
    error_code TEXT,
    error_message TEXT,
    updated_at REAL NOT NULL
);
-- No index on (request_id, seq): a request's items are found by their ids,
-- item_id(request_id, seq), through the primary key (see _LIST_ITEMS);
-- one index fewer to fill for each of 300,000 new items.
DROP INDEX IF EXISTS items_request_seq;
-- Partial indexes: a new item is PENDING with no lease, so items_leased
-- gets no entry at insert time, and items_pending one short entry (an
-- append: every item of a request has the same updated_at). They replace
-- items_status_lease and items_status_updated, which indexed every item;
-- a file made by an earlier version loses those two here.
DROP INDEX IF EXISTS items_status_lease;
DROP INDEX IF EXISTS items_status_updated;
CREATE INDEX IF NOT EXISTS items_leased ON items (lease_until) WHERE status = 'PROCESSING';
CREATE INDEX IF NOT EXISTS items_pending ON items (updated_at) WHERE status = 'PENDING';

CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at REAL NOT NULL,
    owner TEXT,
    active INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS webhooks_owner ON webhooks (owner, created_at);

CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    request_id TEXT NOT NULL,
    owner TEXT,
    callback_url TEXT,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_at REAL,
    lease_until REAL
);
CREATE INDEX IF NOT EXISTS events_due ON events (next_attempt_at);

CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    url TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    at REAL NOT NULL,
    status_code INTEGER,
    error TEXT,
    webhook_id TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_request ON deliveries (request_id, seq);
"""

# The items of rows ?4 .. ?5 - 1 of request ?1, made by SQLite from the
# rows just stored (their urls column, a JSON array): item ?2 + k for the
# k-th URL in (idx, position) order, exactly what `item_rows` yields from
# rows whose indexes count up by one. No Python object per item: ~0.5 s
# less CPU for 300,000 items than binding them one by one.
_DERIVE_ITEMS = (
    "INSERT INTO items (id, request_id, seq, row, position, url, status, attempts, "
    "updated_at) SELECT ?1 || '.' || (?2 + row_number() OVER w - 1), ?1, "
    "?2 + row_number() OVER w - 1, r.idx, j.key, j.value, 'PENDING', 0, ?3 "
    "FROM rows AS r, json_each(r.urls) AS j "
    "WHERE r.request_id = ?1 AND r.idx >= ?4 AND r.idx < ?5 "
    "WINDOW w AS (ORDER BY r.idx, j.key)"
)


def _sql_items_available(conn: sqlite3.Connection) -> bool:
    """Whether this SQLite has what `_DERIVE_ITEMS` needs (3.25+, JSON functions)."""
    if sqlite3.sqlite_version_info < (3, 25, 0):
        return False
    try:
        conn.execute("SELECT key FROM json_each('[1]')").fetchall()
    except sqlite3.OperationalError:
        return False
    return True


_REQUEST_COLUMNS = (
    "id, status, created_at, updated_at, total, done, failed, header, url_column, "
    "callback_url, options, owner, filename"
)
_ITEM_COLUMNS = (
    "id, request_id, row, position, url, status, attempts, output_key, content_type, "
    "bytes_in, bytes_out, width, height, error_code, error_message, lease_until, updated_at"
)
_EVENT_COLUMNS = (
    "id, type, request_id, created_at, owner, callback_url, attempts, next_attempt_at, "
    "lease_until"
)
# Built from the constant column lists above only; every value is a bound parameter.
_SELECT_REQUESTS = f"SELECT {_REQUEST_COLUMNS} FROM requests"  # noqa: S608
_SELECT_ITEMS = f"SELECT {_ITEM_COLUMNS} FROM items"  # noqa: S608
_SELECT_EVENTS = f"SELECT {_EVENT_COLUMNS} FROM events"  # noqa: S608
_SELECT_EXPIRED = _SELECT_ITEMS + " WHERE status = 'PROCESSING' AND lease_until < ? LIMIT ?"
_SELECT_FORGOTTEN = "SELECT id FROM items WHERE status = 'PENDING' AND updated_at < ? LIMIT ?"
# Items ?2 .. ?2 + ?3 - 1 of request ?1 (capped by its total), in seq order:
# one primary-key lookup of item_id(?1, n) per n, n counted up in SQLite.
_LIST_ITEMS = (
    "WITH RECURSIVE stop(n) AS (SELECT min(?2 + ?3, total) FROM requests WHERE id = ?1), "  # noqa: S608 - constant columns
    "seq(n) AS (SELECT ?2 FROM stop WHERE ?2 < stop.n "
    "UNION ALL SELECT seq.n + 1 FROM seq, stop WHERE seq.n + 1 < stop.n) "
    f"SELECT {_ITEM_COLUMNS} FROM seq CROSS JOIN items "
    "ON items.id = ?1 || '.' || seq.n WHERE items.request_id = ?1 ORDER BY seq.n"
)
_INSERT_REQUEST = (
    f"INSERT INTO requests ({_REQUEST_COLUMNS}) "  # noqa: S608
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


# While leased, available_at = lease_until, so "ready" is one range scan of
# one index; lease_until is kept too so a row says plainly why it waits.
_QUEUE_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL,
    available_at REAL NOT NULL,
    lease_token TEXT,
    lease_until REAL,
    consumer TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS queue_ready ON queue (available_at, id);
"""

_READY = "available_at <= ?1 AND (lease_until IS NULL OR lease_until <= ?1)"
_ANY_READY = f"SELECT 1 FROM queue WHERE {_READY} LIMIT 1"  # noqa: S608
_SELECT_READY = (
    f"SELECT id, item_id, deliveries FROM queue WHERE {_READY} "  # noqa: S608
    "ORDER BY available_at, id LIMIT ?2"
)


# The ids item_id(?1, n) for n in 0 .. ?2 - 1, ready at ?3: "n" turns into
# text as str(n) does, so each id is exactly what `ItemIds` yields.
_ENQUEUE_RANGE = (
    "WITH RECURSIVE seq(n) AS (SELECT 0 WHERE ?2 > 0 UNION ALL "
    "SELECT n + 1 FROM seq WHERE n + 1 < ?2) "
    "INSERT INTO queue (item_id, available_at, deliveries) "
    "SELECT ?1 || '.' || n, ?3, 0 FROM seq"
)
