"""Redis backends (``redis://``, ``rediss://``, ``redis+unix://``): storage and queue.

One Redis server (or a Sentinel-managed primary; Redis Cluster is not
supported because the scripts reach keys they compute) holds the state of
any number of API and worker processes on any number of hosts. Every key
starts with a prefix, ``csvimg`` unless the URL says otherwise
(``redis://host:6379/0?prefix=shop1``), so several deployments or test runs
share one server without seeing each other. Other query parameters go to
redis-py (``socket_timeout``, ``health_check_interval``...).

Key layout (``P`` is the prefix)::

    P:req:<request_id>          hash    one request: id, status, created_at,
                                        updated_at, total, done, failed,
                                        url_column, header (JSON), options
                                        (JSON), owner?, callback_url?, filename?,
                                        finished_by? (see the item's)
    P:rows:<request_id>         list    the request's rows in pages of 1000: one
                                        JSON array of [index, line, cells, urls]
                                        per element
    P:itemids:<request_id>      list    the request's item ids in (row, position)
                                        order, for paging with LRANGE
    P:item:<item_id>            hash    one item: request_id, row, position, url,
                                        status, attempts, updated_at, and when
                                        set output_key, content_type, bytes_in,
                                        bytes_out, width, height, error_code,
                                        error_message, lease_until; leased_by and
                                        finished_by (tokens of the calls that
                                        last did so, to recognise a replay)
    P:requests                  zset    every request id, scored by created_at
    P:requests:o:<owner>        zset    the request ids of one owner
    P:pending                   zset    ids of PENDING items, scored by updated_at
    P:leases                    zset    ids of PROCESSING items, scored by
                                        lease_until
    P:webhook:<webhook_id>      hash    id, url, secret, created_at, active
                                        ("1"/"0"), owner?
    P:webhooks:o:<owner>        zset    webhook ids of an owner by created_at;
    P:webhooks:-                zset    ... and of the ownerless registrations
    P:event:<event_id>          hash    id, type, request_id, created_at,
                                        attempts, next_attempt_at?, owner?,
                                        callback_url?
    P:due                       zset    undelivered event ids, scored by the time
                                        they may next be claimed (the next
                                        attempt, or the end of a claim's lease)
    P:deliveries:<request_id>   list    delivery attempts, one JSON object each
    P:queue                     stream  the queue: entries {i: item id,
                                        d: deliveries before this entry}, read
                                        by the consumer group ``csvimg``
    P:queue:leases              zset    handed-out entry ids, scored by the end
                                        of their lease
    P:queue:delayed             zset    released ids waiting for their delay,
                                        members ``<d>:<uuid>:<item id>``, scored
                                        by the time they are due
    P:staging:<request_id>      string  a request being written (expires when
                                        its writer stops making progress)

A field marked ``?`` is absent when the value is None. Times are seconds
since the epoch, written with ``repr(float)`` so they survive the trip
exactly; the Lua scripts only compare them and copy them through as
strings (Lua numbers would print with 14 digits and lose microseconds).

Atomicity: every state change of an item or event is one Lua script, so
counters, status, the ``pending`` / ``leases`` indexes and the outbox move
together; `RedisStorage.finish_item` returns the request to exactly one
caller, the one whose script saw the last counter move. A request is
written in three steps, each atomic: a script reserves the id (the
``staging`` marker), chunk scripts write rows and items, and a last script
commits the request hash and its index entries. Until the commit every read
path treats the items as absent (they name a request that does not exist),
so no one sees a request half-written, and Redis is never blocked for long:
one chunk of 2,000 items costs it ~15 ms, where one MULTI/EXEC of 300,000
items held it for ~2.5 s. Leftovers of a writer that died are removed by
`RedisStorage.stale_items` once the marker has expired.

The queue is a stream read by one consumer group; each hand-out's lease is
kept in a zset written by the same script that reads the entry, and a
later claim takes over entries whose lease ended (see `RedisQueue`).

Failures: connection errors, time-outs and a server still loading its data
become `csvimg.StorageError`. The client retries a few times with
exponential back-off and reconnects by itself once the server is back.
A retried command may already have run; the write scripts recognise such
a replay (a token per call, or how far a list has grown) and answer as the
first run did, so a retry never writes twice or loses "you finished it".

Layout of this package: `storage` (`RedisStorage`, on `_base`: connection,
webhooks, outbox), `queue` (`RedisQueue`), `_connection` (URL parsing,
client, error mapping, encoding helpers) and ``lua/``, one file per Lua
script, read by `_lua`.

Tested on Redis 7.0; needs Redis 6.2 or newer.
"""

from __future__ import annotations

# The ``X as X`` imports re-export private names from where they lived
# before this module became a package. Patching one here does not reach the
# submodule that uses it.
from csvimg.backends.redis._connection import DEFAULT_PREFIX
from csvimg.backends.redis._connection import _aclose as _aclose
from csvimg.backends.redis._connection import _Connection as _Connection
from csvimg.backends.redis._connection import _json as _json
from csvimg.backends.redis._connection import _opt_float as _opt_float
from csvimg.backends.redis._connection import _opt_int as _opt_int
from csvimg.backends.redis._connection import _pairs as _pairs
from csvimg.backends.redis._connection import _t as _t
from csvimg.backends.redis.queue import GROUP, RedisQueue
from csvimg.backends.redis.storage import _ITEM_FIELDS as _ITEM_FIELDS
from csvimg.backends.redis.storage import _ITEMS_PER_SCRIPT as _ITEMS_PER_SCRIPT
from csvimg.backends.redis.storage import _NEW_ITEM_FIELDS as _NEW_ITEM_FIELDS
from csvimg.backends.redis.storage import _ROWS_PAGE as _ROWS_PAGE
from csvimg.backends.redis.storage import _STAGING_TTL as _STAGING_TTL
from csvimg.backends.redis.storage import RedisStorage
from csvimg.hooks import BackendRegistry, hookimpl

__all__ = ["DEFAULT_PREFIX", "GROUP", "RedisQueue", "RedisStorage"]


@hookimpl
def csvimg_register_backends(registry: BackendRegistry) -> None:
    """Serve ``redis://``, ``rediss://`` and ``redis+unix://`` for storage and queue."""
    for scheme in ("redis", "rediss", "redis+unix"):
        registry.add_storage(scheme, RedisStorage.from_url)
        registry.add_queue(scheme, RedisQueue.from_url)
