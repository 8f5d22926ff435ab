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

Tested on Redis 7.0; needs Redis 6.2 or newer.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import attrs
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    BusyLoadingError,
    ConnectionError,
    RedisError,
    ResponseError,
    TimeoutError,
)

from csvimg import ledger
from csvimg._errors import ConfigError, NotFoundError, StorageError
from csvimg.backends import Claim
from csvimg.hooks import BackendRegistry, hookimpl
from csvimg.jobs import (
    Delivery,
    Event,
    Item,
    ItemIds,
    ItemResult,
    ItemStatus,
    ProcessOptions,
    Request,
    RequestStatus,
    Row,
    Webhook,
    item_rows,
    now,
)

if TYPE_CHECKING:
    from csvimg.settings import Settings

__all__ = ["DEFAULT_PREFIX", "GROUP", "RedisQueue", "RedisStorage"]

_T = TypeVar("_T")

DEFAULT_PREFIX: Final = "csvimg"
"""Key prefix used when the URL has no ``prefix`` query parameter."""

GROUP: Final = "csvimg"
"""The consumer group every `RedisQueue` reads the stream with."""

# Commands per pipeline round trip when enqueuing: large enough to amortise
# the round trip, small enough to keep buffers low.
_CHUNK: Final = 5000

# Items per write script of create_request: each call holds Redis for
# ~15 ms (more on a busy machine), short enough for other clients not to
# notice, and 150 round trips for 300,000 items cost little.
_ITEMS_PER_SCRIPT: Final = 2000

# Longest single XREAD BLOCK of a waiting claim: a safety net (the wait is
# cut short for due delays and leases anyway); well under the socket timeout.
_POLL_SECONDS: Final = 1.0


# -- Lua scripts --------------------------------------------------------------
# Each runs atomically on the server. Times arrive as strings (ARGV) and are
# only compared (tonumber) or stored as they came.

# Lua helper shared by the item scripts: an item is visible only once its
# request is committed (create_request writes the request hash last).
_COMMITTED = """
local function committed_request(prefix, ikey)
  local rid = redis.call('HGET', ikey, 'request_id')
  if not rid then return false end
  local rkey = prefix .. ':req:' .. rid
  if redis.call('EXISTS', rkey) == 0 then return false end
  return rkey, rid
end
"""

# redis-py sends a command again when the connection breaks, even if the
# first one ran: the write scripts below recognise their own replay (by a
# token, or by how far the list has grown) and answer as the first run did.

_RESERVE = """
-- KEYS: request, staging marker;  ARGV: marker time-to-live (seconds), token
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'EX', ARGV[1]) then return 1 end
if redis.call('GET', KEYS[2]) == ARGV[2] then return 1 end
return 0
"""

_WRITE_ROWS = """
-- KEYS: rows list, staging marker;  ARGV: pages written before, pages...
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local have, start = redis.call('LLEN', KEYS[1]), tonumber(ARGV[1])
if have == start + #ARGV - 1 then return 1 end
if have ~= start then return redis.error_reply('row pages out of step') end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 2))
return 1
"""

_WRITE_ITEMS = """
-- KEYS: the request's item id list, pending index, lease index, staging marker
-- ARGV: item key prefix, JSON field names, JSON list of [id, value, ...],
--       marker time-to-live, items written before
-- Times arrive as strings (exact); JSON null means the field is absent.
-- Refreshing the marker keeps the sweeper from taking these for leftovers.
if redis.call('EXPIRE', KEYS[4], ARGV[4]) == 0 then return 0 end
local items = cjson.decode(ARGV[3])
local have, start = redis.call('LLEN', KEYS[1]), tonumber(ARGV[5])
if have == start + #items then return 1 end
if have ~= start then return redis.error_reply('item ids out of step') end
local names = cjson.decode(ARGV[2])
local at = {}
for i, name in ipairs(names) do at[name] = i + 1 end
local ids, pending, leased = {}, {}, {}
-- unpack() is bounded by Lua's C stack: push ids and scores in batches.
local function flush(force)
  if #ids > 0 and (force or #ids >= 1000) then
    redis.call('RPUSH', KEYS[1], unpack(ids)); ids = {}
  end
  if #pending > 0 and (force or #pending >= 2000) then
    redis.call('ZADD', KEYS[2], unpack(pending)); pending = {}
  end
  if #leased > 0 and (force or #leased >= 2000) then
    redis.call('ZADD', KEYS[3], unpack(leased)); leased = {}
  end
end
for _, item in ipairs(items) do
  local fields = {}
  for i, name in ipairs(names) do
    local value = item[i + 1]
    if value ~= cjson.null then
      fields[#fields + 1] = name
      fields[#fields + 1] = value
    end
  end
  redis.call('HSET', ARGV[1] .. item[1], unpack(fields))
  local status = item[at['status']]
  if status == 'PENDING' then
    pending[#pending + 1] = item[at['updated_at']]
    pending[#pending + 1] = item[1]
  elseif status == 'PROCESSING' and item[at['lease_until']] ~= cjson.null then
    leased[#leased + 1] = item[at['lease_until']]
    leased[#leased + 1] = item[1]
  end
  ids[#ids + 1] = item[1]
  flush(false)
end
flush(true)
return 1
"""

_COMMIT = """
-- KEYS: request, all-requests index, staging marker[, owner's index]
-- ARGV: created_at, request id, field/value pairs of the request hash...
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end  -- a replay
if redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
if KEYS[4] then redis.call('ZADD', KEYS[4], ARGV[1], ARGV[2]) end
redis.call('DEL', KEYS[3])
return 1
"""

_DISCARD = """
-- KEYS: request, staging marker, rows, item ids, pending index, lease index
-- ARGV: item key prefix, '1' on the last call, item ids...
-- Never touches a committed request: its commit may have run even though
-- the client saw an error.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if #ARGV >= 3 then
  for i = 3, #ARGV do redis.call('UNLINK', ARGV[1] .. ARGV[i]) end
  redis.call('ZREM', KEYS[5], unpack(ARGV, 3))
  redis.call('ZREM', KEYS[6], unpack(ARGV, 3))
end
if ARGV[2] == '1' then redis.call('UNLINK', KEYS[2], KEYS[3], KEYS[4]) end
return 1
"""

_GET_ITEM = _COMMITTED + """
-- KEYS: item;  ARGV: prefix
if not committed_request(ARGV[1], KEYS[1]) then return false end
return redis.call('HGETALL', KEYS[1])
"""

_START_ITEM = _COMMITTED + """
-- KEYS: item, pending index, lease index
-- ARGV: now, lease_until, item id, prefix, token of this call
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'DONE' or status == 'FAILED' then return false end
local rkey = committed_request(ARGV[4], KEYS[1])
if not rkey then return false end
if status == 'PROCESSING' and redis.call('HGET', KEYS[1], 'leased_by') == ARGV[5] then
  return redis.call('HGETALL', KEYS[1])  -- a replay of this very call
end
if status == 'PROCESSING' then
  local lease = redis.call('HGET', KEYS[1], 'lease_until')
  if lease and tonumber(lease) > tonumber(ARGV[1]) then return false end
end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'PROCESSING', 'lease_until', ARGV[2],
           'updated_at', ARGV[1], 'leased_by', ARGV[5])
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
if redis.call('HGET', rkey, 'status') == 'PENDING' then
  redis.call('HSET', rkey, 'status', 'PROCESSING', 'updated_at', ARGV[1])
end
return redis.call('HGETALL', KEYS[1])
"""

_EXTEND_LEASE = _COMMITTED + """
-- KEYS: item, lease index;  ARGV: lease_until, item id, prefix
if redis.call('HGET', KEYS[1], 'status') ~= 'PROCESSING' then return 0 end
if not committed_request(ARGV[3], KEYS[1]) then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

_FINISH_ITEM = _COMMITTED + """
-- KEYS: item, pending index, lease index, due events
-- ARGV: now, item id, prefix, ok ('1'/'0'), event id to use if this call
--       finishes the request, n, then n field/value pairs of the result to
--       set, then the names of the result fields to remove (None values)
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
local rkey, rid = committed_request(ARGV[3], KEYS[1])
if not rkey then return false end
if status == 'DONE' or status == 'FAILED' then
  -- Finished already. A replay of the call that finished the request
  -- answers like the first run; anyone else gets nothing.
  if redis.call('HGET', KEYS[1], 'finished_by') == ARGV[5]
     and redis.call('HGET', rkey, 'finished_by') == ARGV[5] then
    return redis.call('HGETALL', rkey)
  end
  return false
end
local ok = ARGV[4] == '1'
local n = tonumber(ARGV[6])
local fields = {'status', ok and 'DONE' or 'FAILED', 'updated_at', ARGV[1],
                'finished_by', ARGV[5]}
for i = 7, 6 + 2 * n do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('HDEL', KEYS[1], 'lease_until')
for i = 7 + 2 * n, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('HINCRBY', rkey, ok and 'done' or 'failed', 1)
redis.call('HSET', rkey, 'updated_at', ARGV[1])
local r = redis.call('HMGET', rkey, 'total', 'done', 'failed', 'status', 'owner', 'callback_url')
local done, failed = tonumber(r[2]), tonumber(r[3])
if done + failed < tonumber(r[1]) then return false end
-- A request that is already terminal never fires a second event.
if r[4] == 'COMPLETED' or r[4] == 'FAILED' then return false end
-- The rule of csvimg.backends.memory.finish_outcome: any DONE item makes
-- the request COMPLETED; all items FAILED make it FAILED.
local final = done > 0 and 'COMPLETED' or 'FAILED'
redis.call('HSET', rkey, 'status', final, 'finished_by', ARGV[5])
local event = {'id', ARGV[5],
               'type', final == 'COMPLETED' and 'request.completed' or 'request.failed',
               'request_id', rid, 'created_at', ARGV[1], 'attempts', '0',
               'next_attempt_at', ARGV[1]}
if r[5] then event[#event + 1] = 'owner'; event[#event + 1] = r[5] end
if r[6] then event[#event + 1] = 'callback_url'; event[#event + 1] = r[6] end
redis.call('HSET', ARGV[3] .. ':event:' .. ARGV[5], unpack(event))
redis.call('ZADD', KEYS[4], ARGV[1], ARGV[5])
return redis.call('HGETALL', rkey)
"""

_STALE_ITEMS = """
-- KEYS: pending index, lease index;  ARGV: now, pending_before, limit, prefix
local now, prefix, limit = ARGV[1], ARGV[4], tonumber(ARGV[3])
local found = {}
-- 'ok': an item of a committed request; 'wait': its request is being
-- written; 'gone': a leftover of a create_request whose writer died
-- (no request, no live staging marker), removed here.
local function state(id)
  local ikey = prefix .. ':item:' .. id
  local rid = redis.call('HGET', ikey, 'request_id')
  if not rid then return 'gone', ikey, nil end
  if redis.call('EXISTS', prefix .. ':req:' .. rid) == 1 then return 'ok', ikey, rid end
  if redis.call('EXISTS', prefix .. ':staging:' .. rid) == 1 then return 'wait', ikey, rid end
  return 'gone', ikey, rid
end
local function sweep(index, max_score, touch)
  if #found >= limit then return end
  -- One snapshot, a few times wider than needed so that items of requests
  -- still being written cannot hide the ones behind them.
  local ids = redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. max_score,
                         'LIMIT', 0, 4 * (limit - #found))
  for _, id in ipairs(ids) do
    if #found >= limit then return end
    local st, ikey, rid = state(id)
    if st == 'ok' then
      touch(id, ikey)
      found[#found + 1] = id
    elseif st == 'gone' then
      redis.call('UNLINK', ikey)
      redis.call('ZREM', KEYS[1], id)
      redis.call('ZREM', KEYS[2], id)
      if rid then
        redis.call('UNLINK', prefix .. ':rows:' .. rid, prefix .. ':itemids:' .. rid)
      end
    end
  end
end
-- Waiting items first: an item moved back from PROCESSING below gets
-- updated_at = now and must not be picked up again by this same call.
sweep(KEYS[1], ARGV[2], function(id, ikey)
  redis.call('HSET', ikey, 'updated_at', now)
  redis.call('ZADD', KEYS[1], now, id)
end)
sweep(KEYS[2], now, function(id, ikey)
  redis.call('HSET', ikey, 'status', 'PENDING', 'updated_at', now)
  redis.call('HDEL', ikey, 'lease_until')
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[1], now, id)
end)
return found
"""

_CLAIM_EVENTS = """
-- KEYS: due events;  ARGV: now, limit, lease_until, prefix
-- The lease is the due score pushed forward: a claimed event becomes due
-- again when the lease ends unless reschedule_event moves it first.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[3], id)
  out[#out + 1] = redis.call('HGETALL', ARGV[4] .. ':event:' .. id)
end
return out
"""

_RESCHEDULE_EVENT = """
-- KEYS: event, due events;  ARGV: next_attempt_at ('' = delivered), event id
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if ARGV[1] == '' then
  redis.call('HDEL', KEYS[1], 'next_attempt_at')
  redis.call('ZREM', KEYS[2], ARGV[2])
else
  redis.call('HSET', KEYS[1], 'next_attempt_at', ARGV[1])
  redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
end
return 1
"""

_OWNER_INDEX = """
local function owner_index(prefix, owner)
  if owner then return prefix .. ':webhooks:o:' .. owner end
  return prefix .. ':webhooks:-'
end
"""

_ADD_WEBHOOK = _OWNER_INDEX + """
-- KEYS: webhook, its owner's index;  ARGV: prefix, id, created_at, field/value pairs...
-- Re-registering an id replaces it, possibly under another owner.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('ZREM', owner_index(ARGV[1], redis.call('HGET', KEYS[1], 'owner')), ARGV[2])
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
return 1
"""

_DELETE_WEBHOOK = """
-- KEYS: webhook, the owner's index;  ARGV: id, has owner ('1'/'0'), owner
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local owner = redis.call('HGET', KEYS[1], 'owner')
if ARGV[2] == '1' then
  if owner ~= ARGV[3] then return 0 end
elseif owner then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

_SET_WEBHOOK_ACTIVE = """
-- KEYS: webhook;  ARGV: '1' or '0'
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'active', ARGV[1])
return 1
"""

# A claim's token is "<entry id>/<delivery count>/<consumer>": the entry and
# its delivery counter name one hand-out, so a consumer whose lease ran out
# cannot ack, release or extend the entry after another took it over (or
# after it took the entry over itself).
_QUEUE_HOLDS = """
local function holds(stream, group, entry, count, consumer)
  local p = redis.call('XPENDING', stream, group, entry, entry, 1)
  return #p == 1 and p[1][2] == consumer and p[1][4] == tonumber(count)
end
"""

_QUEUE_CLAIM = """
-- KEYS: stream, delayed, leases
-- ARGV: group, consumer, now, lease_until, max items
local group, consumer, now, lease_until = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local max = tonumber(ARGV[5])
local claimed = {}
local function fields_of(flat)
  local f = {}
  for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
  return f
end
-- 1. Released ids whose delay is over go back into the stream.
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
for _, member in ipairs(due) do
  local d, item = string.match(member, '^(%d+):[^:]*:(.*)$')
  if item then redis.call('XADD', KEYS[1], '*', 'i', item, 'd', d) end
  redis.call('ZREM', KEYS[2], member)
end
-- 2. Take over entries whose lease ended without an ack (consumer died).
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. now, 'LIMIT', 0, max)
for _, id in ipairs(expired) do
  local got = redis.call('XCLAIM', KEYS[1], group, consumer, 0, id)
  local entry = got[1]
  if entry and entry[2] then
    local f = fields_of(entry[2])
    local count = redis.call('XPENDING', KEYS[1], group, id, id, 1)[1][4]
    claimed[#claimed + 1] = {id, f['i'] or '', tonumber(f['d'] or '0') + count, count}
    redis.call('ZADD', KEYS[3], lease_until, id)
  else
    -- acked or deleted meanwhile: forget it
    redis.call('XACK', KEYS[1], group, id)
    redis.call('ZREM', KEYS[3], id)
  end
end
-- 3. New entries; their lease is recorded in this same step, so a consumer
-- dying right after this script still has its entries taken over.
if #claimed < max then
  local res = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', max - #claimed,
                         'STREAMS', KEYS[1], '>')
  if res then
    for _, entry in ipairs(res[1][2]) do
      local f = fields_of(entry[2])
      claimed[#claimed + 1] = {entry[1], f['i'] or '', tonumber(f['d'] or '0') + 1, 1}
      redis.call('ZADD', KEYS[3], lease_until, entry[1])
    end
  end
end
-- 4. For a caller that got nothing: the stream's last id to block on, and
-- when the next delayed id or lease is due.
local last = '0-0'
if #claimed == 0 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
end
local next_delayed = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')[2] or ''
local next_lease = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')[2] or ''
return {claimed, last, next_delayed, next_lease}
"""

_QUEUE_ACK = _QUEUE_HOLDS + """
-- KEYS: stream, leases;  ARGV: group, entry id, delivery count, consumer
if not holds(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""

_QUEUE_RELEASE = _QUEUE_HOLDS + """
-- KEYS: stream, delayed, leases
-- ARGV: group, entry id, delivery count, consumer, item id, deliveries,
--       due ('' = now), delayed member
if not holds(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
if ARGV[7] == '' then
  redis.call('XADD', KEYS[1], '*', 'i', ARGV[5], 'd', ARGV[6])
else
  redis.call('ZADD', KEYS[2], ARGV[7], ARGV[8])
end
return 1
"""

_QUEUE_EXTEND = _QUEUE_HOLDS + """
-- KEYS: stream, leases;  ARGV: group, entry id, delivery count, consumer, lease_until
if not holds(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[2])
return 1
"""


# -- helpers ------------------------------------------------------------------

_ITEM_FIELDS: Final = (
    "request_id", "row", "position", "url", "status", "attempts", "updated_at",
    "output_key", "content_type", "bytes_in", "bytes_out", "width", "height",
    "error_code", "error_message", "lease_until",
)
"""Every field an item hash may hold, in the order the write script reads them."""

_NEW_ITEM_FIELDS: Final = _ITEM_FIELDS[:7]
"""The fields of a new item (request_id ... updated_at), as `_stage` writes them."""

# How long a request being written stays reserved without progress; after
# that its leftovers count as abandoned (see create_request).
_STAGING_TTL: Final = 600

# Rows never change once stored, so they are kept in pages of this many
# (one JSON array per list element): a 300,000-row upload is 300 list
# elements, and any page of rows is one LRANGE of at most two of them.
_ROWS_PAGE: Final = 1000


def _t(value: float) -> str:
    """Format a time for Redis: exact (repr) and understood as a zset score."""
    if math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return repr(float(value))


def _opt_int(raw: str | None) -> int | None:
    return None if raw is None else int(raw)


def _opt_float(raw: str | None) -> float | None:
    return None if raw is None else float(raw)


def _pairs(raw: Sequence[str]) -> dict[str, str]:
    """Turn a flat HGETALL reply of a script into a dict."""
    return dict(zip(raw[0::2], raw[1::2], strict=True))


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@attrs.frozen
class _Connection:
    """What a Redis backend URL says: where to connect and the key prefix."""

    client_url: str
    prefix: str
    where: str

    @classmethod
    def parse(cls, url: str) -> _Connection:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss", "redis+unix", "unix"):
            raise ConfigError(f"not a Redis URL: {url!r}")
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefixes = [v for k, v in query if k == "prefix"]
        prefix = prefixes[-1] if prefixes else DEFAULT_PREFIX
        if not prefix or any(c.isspace() or c in "*?[]" for c in prefix):
            raise ConfigError(f"invalid Redis key prefix {prefix!r} in {url!r}")
        rest = urlencode([(k, v) for k, v in query if k != "prefix"])
        # redis-py spells the socket scheme unix://; redis+unix:// names the
        # engine in our URL space, where "unix" alone would say nothing.
        client_scheme = "unix" if scheme == "redis+unix" else scheme
        client_url = urlunsplit((client_scheme, parts.netloc, parts.path, rest, ""))
        if client_scheme == "unix" and not parts.netloc:
            # urlunsplit drops the empty authority: unix:/path; keep unix:///path.
            client_url = f"unix://{client_url.removeprefix('unix:')}"
        host = parts.hostname or parts.path or "localhost"
        where = f"{scheme}://{host}" + (f":{parts.port}" if parts.port else "")
        return cls(client_url=client_url, prefix=prefix, where=where)

    def client(self) -> aioredis.Redis:
        # Retry connection trouble a few times with back-off: a restarted or
        # failed-over server is picked up without the caller noticing, and
        # a longer outage surfaces as StorageError after well under a second.
        return aioredis.Redis.from_url(
            self.client_url,
            decode_responses=True,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.01), 3),
            retry_on_error=[ConnectionError, TimeoutError],
            health_check_interval=10,
            socket_connect_timeout=5,
            socket_keepalive=True,
        )

    @contextlib.contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """Turn redis-py's exceptions into `StorageError`."""
        try:
            yield
        except BusyLoadingError as exc:
            raise StorageError(
                f"Redis at {self.where} is still loading its data while {doing}; try again"
            ) from exc
        except (ConnectionError, TimeoutError) as exc:
            raise StorageError(
                f"Redis at {self.where} is unreachable while {doing}: {exc} "
                "(is redis-server running, and is the URL right?)"
            ) from exc
        except RedisError as exc:
            raise StorageError(f"Redis at {self.where} failed while {doing}: {exc}") from exc


# -- storage ------------------------------------------------------------------


class RedisStorage:
    """Storage in Redis; see `csvimg.backends.Storage` and the module docstring.

    Safe to share between tasks of one event loop; each process (or event
    loop) builds its own.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0") -> None:
        self._conn = _Connection.parse(url)
        self.prefix = self._conn.prefix
        """The key prefix of this deployment."""
        self._client: aioredis.Redis | None = None
        p = self.prefix
        self._k_requests = f"{p}:requests"
        self._k_pending = f"{p}:pending"
        self._k_leases = f"{p}:leases"
        self._k_due = f"{p}:due"

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> RedisStorage:
        """Build from ``redis://host:port/db?prefix=name`` (unopened)."""
        return cls(url)

    # Keys ---------------------------------------------------------------

    def _k_req(self, request_id: str) -> str:
        return f"{self.prefix}:req:{request_id}"

    def _k_item(self, item_id: str) -> str:
        return f"{self.prefix}:item:{item_id}"

    def _k_owner(self, owner: str) -> str:
        return f"{self.prefix}:requests:o:{owner}"

    def _k_hooks(self, owner: str | None) -> str:
        return f"{self.prefix}:webhooks:-" if owner is None else f"{self.prefix}:webhooks:o:{owner}"

    # Life cycle ---------------------------------------------------------

    @property
    def _r(self) -> aioredis.Redis:
        if self._client is None:
            raise StorageError(f"Redis storage at {self._conn.where} is not open")
        return self._client

    async def open(self) -> None:
        """Connect and check the server answers (Redis needs no schema)."""
        if self._client is None:
            client = self._conn.client()
            self._scripts = {
                name: client.register_script(source)
                for name, source in (
                    ("reserve", _RESERVE),
                    ("write_rows", _WRITE_ROWS),
                    ("write_items", _WRITE_ITEMS),
                    ("commit", _COMMIT),
                    ("discard", _DISCARD),
                    ("get_item", _GET_ITEM),
                    ("start", _START_ITEM),
                    ("extend", _EXTEND_LEASE),
                    ("finish", _FINISH_ITEM),
                    ("stale", _STALE_ITEMS),
                    ("claim_events", _CLAIM_EVENTS),
                    ("reschedule", _RESCHEDULE_EVENT),
                    ("add_webhook", _ADD_WEBHOOK),
                    ("delete_webhook", _DELETE_WEBHOOK),
                    ("webhook_active", _SET_WEBHOOK_ACTIVE),
                )
            }
            self._client = client
        await self.ping()

    async def close(self) -> None:
        """Close the connection pool; a later `open` connects again."""
        client, self._client = self._client, None
        if client is not None:
            await _aclose(client)

    async def ping(self) -> None:
        """Raise `StorageError` unless Redis answers."""
        with self._conn.errors("pinging"):
            await self._r.ping()

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        self._r  # noqa: B018 - raises StorageError when closed
        return await self._scripts[name](keys=keys, args=args)

    # Requests -----------------------------------------------------------

    def _request_fields(self, request: Request) -> dict[str, str]:
        fields = {
            "id": request.id,
            "status": request.status.value,
            "created_at": _t(request.created_at),
            "updated_at": _t(request.updated_at),
            "total": str(request.total),
            "done": str(request.done),
            "failed": str(request.failed),
            "header": _json(list(request.header)),
            "url_column": str(request.url_column),
            "options": _json(request.options.to_dict()),
        }
        for name in ("callback_url", "owner", "filename"):
            value = getattr(request, name)
            if value is not None:
                fields[name] = value
        return fields

    @staticmethod
    def _request(h: Mapping[str, str]) -> Request:
        return Request(
            id=h["id"],
            status=RequestStatus(h["status"]),
            created_at=float(h["created_at"]),
            updated_at=float(h["updated_at"]),
            total=int(h["total"]),
            done=int(h["done"]),
            failed=int(h["failed"]),
            header=tuple(json.loads(h["header"])),
            url_column=int(h["url_column"]),
            callback_url=h.get("callback_url"),
            options=ProcessOptions.from_dict(json.loads(h["options"])),
            owner=h.get("owner"),
            filename=h.get("filename"),
        )

    @staticmethod
    def _item(item_id: str, h: Mapping[str, str]) -> Item:
        return Item(
            id=item_id,
            request_id=h["request_id"],
            row=int(h["row"]),
            position=int(h["position"]),
            url=h["url"],
            status=ItemStatus(h["status"]),
            attempts=int(h.get("attempts", "0")),
            output_key=h.get("output_key"),
            content_type=h.get("content_type"),
            bytes_in=_opt_int(h.get("bytes_in")),
            bytes_out=_opt_int(h.get("bytes_out")),
            width=_opt_int(h.get("width")),
            height=_opt_int(h.get("height")),
            error_code=h.get("error_code"),
            error_message=h.get("error_message"),
            lease_until=_opt_float(h.get("lease_until")),
            updated_at=float(h["updated_at"]),
        )

    async def create_request(self, request: Request, rows: Sequence[Row]) -> None:
        """Store the request, its rows and their items; nothing is visible until all are.

        Rows and items are written in chunks (each chunk one short script,
        so Redis keeps serving other clients while a 300,000-item upload is
        stored), then one script commits the request hash. Until that commit
        no read path shows the request or its items. An id that exists, or
        is being created, is refused with `StorageError`. When writing
        fails, what was written is removed; if the writer dies instead, the
        leftovers are removed by a later `stale_items` sweep once the
        staging marker has expired.
        """
        rid = request.id
        rkey = self._k_req(rid)
        marker = f"{self.prefix}:staging:{rid}"
        token = uuid.uuid4().hex
        with self._conn.errors("creating a request"):
            if not await self._script("reserve", [rkey, marker], [_STAGING_TTL, token]):
                raise StorageError(f"request {rid} exists already")
        written = [0]
        try:
            with self._conn.errors("creating a request"):
                await self._stage(request, rows, marker, written)
                keys = [rkey, self._k_requests, marker]
                if request.owner is not None:
                    keys.append(self._k_owner(request.owner))
                fields = [v for pair in self._request_fields(request).items() for v in pair]
                committed = await self._script(
                    "commit", keys, [_t(request.created_at), rid, *fields]
                )
            if not committed:
                raise StorageError(
                    f"request {rid} was abandoned while being written "
                    f"(its staging marker expired after {_STAGING_TTL} s)"
                )
        except BaseException:
            # Shielded and bounded: runs even when the caller was cancelled,
            # and never hides the original error.
            with anyio.move_on_after(10, shield=True):
                await self._discard(rid, max(written[0], request.total), marker)
            raise

    async def _stage(
        self, request: Request, rows: Sequence[Row], marker: str, written: list[int] | None = None
    ) -> None:
        """Write rows and items of a reserved, not yet committed request.

        Items are made from the rows as they are sent (`item_rows`), a
        chunk at a time; ``written[0]`` counts the items sent so far.
        """
        rid = request.id
        # Encode and send a few pages at a time: the event loop (an API
        # server's, say) gets to run between them.
        rows_keys = [f"{self.prefix}:rows:{rid}", marker]
        for first in range(0, len(rows), 10 * _ROWS_PAGE):
            pages = [
                _json([[r.index, r.line, r.cells, r.urls] for r in rows[i : i + _ROWS_PAGE]])
                for i in range(first, min(len(rows), first + 10 * _ROWS_PAGE), _ROWS_PAGE)
            ]
            if not await self._script("write_rows", rows_keys, [first // _ROWS_PAGE, *pages]):
                raise StorageError(f"request {rid} was abandoned while being written")
        keys = [f"{self.prefix}:itemids:{rid}", self._k_pending, self._k_leases, marker]
        item_prefix = f"{self.prefix}:item:"
        # A new item sets these fields only (the script skips absent ones).
        names = _json(_NEW_ITEM_FIELDS)
        at = _t(request.created_at)
        id_prefix = f"{rid}."
        pending = ItemStatus.PENDING.value
        made = (
            [id_prefix + str(seq), rid, row, position, url, pending, 0, at]
            for seq, row, position, url in item_rows(rows)
        )
        start = 0
        while chunk := list(itertools.islice(made, _ITEMS_PER_SCRIPT)):
            # One script call per chunk writes its item hashes server-side:
            # queued one HSET at a time they cost the client ~40 us each.
            ok = await self._script(
                "write_items", keys, [item_prefix, names, _json(chunk), _STAGING_TTL, start]
            )
            if not ok:
                raise StorageError(f"request {rid} was abandoned while being written")
            start += len(chunk)
            if written is not None:
                written[0] = start

    async def _discard(self, rid: str, total: int, marker: str) -> None:
        """Remove what a failed `create_request` wrote (best effort).

        *total*: how many items may have been written (ids beyond those
        written are harmless to remove).
        """
        keys = [
            self._k_req(rid), marker, f"{self.prefix}:rows:{rid}",
            f"{self.prefix}:itemids:{rid}", self._k_pending, self._k_leases,
        ]
        item_prefix = f"{self.prefix}:item:"
        ids = ItemIds(rid, total)
        try:
            for start in range(0, len(ids), 1000):
                await self._script(
                    "discard", keys, [item_prefix, "0", *ids[start : start + 1000]]
                )
            await self._script("discard", keys, [item_prefix, "1"])
        except (RedisError, StorageError, OSError):
            pass  # Redis is away: the sweeper removes the leftovers later

    async def get_request(self, request_id: str) -> Request | None:
        """Return the request or None."""
        with self._conn.errors("reading a request"):
            h = cast("dict[str, str]", await self._r.hgetall(self._k_req(request_id)))
        return self._request(h) if h else None

    async def list_requests(self, *, owner: str | None = None, limit: int = 50) -> list[Request]:
        """Newest first (of *owner* when given)."""
        if limit <= 0:
            return []
        index = self._k_requests if owner is None else self._k_owner(owner)
        with self._conn.errors("listing requests"):
            ids = cast("list[str]", await self._r.zrevrange(index, 0, limit - 1))
            async with self._r.pipeline(transaction=False) as pipe:
                for rid in ids:
                    pipe.hgetall(self._k_req(rid))
                found: list[dict[str, str]] = await pipe.execute()
        return [self._request(h) for h in found if h]

    async def _committed_range(self, request_id: str, key: str, first: int, last: int) -> list[str]:
        """LRANGE *key*, or nothing while the request is not committed."""
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.exists(self._k_req(request_id))
            pipe.lrange(key, first, last)
            exists, found = await pipe.execute()
        return list(found) if exists else []

    async def list_rows(self, request_id: str, *, offset: int = 0, limit: int = 1000) -> list[Row]:
        """Rows in upload order (read from the pages that hold them)."""
        if limit <= 0 or offset < 0:
            return []
        first, last = offset // _ROWS_PAGE, (offset + limit - 1) // _ROWS_PAGE
        with self._conn.errors("reading rows"):
            pages = await self._committed_range(
                request_id, f"{self.prefix}:rows:{request_id}", first, last
            )
        skip = offset - first * _ROWS_PAGE
        found = [row for page in pages for row in json.loads(page)][skip : skip + limit]
        return [
            Row(index=index, line=line, cells=tuple(cells), urls=tuple(urls))
            for index, line, cells, urls in found
        ]

    async def list_items(
        self, request_id: str, *, offset: int = 0, limit: int = 1000
    ) -> list[Item]:
        """Items in (row, position) order."""
        if limit <= 0 or offset < 0:
            return []
        with self._conn.errors("reading items"):
            ids = await self._committed_range(
                request_id, f"{self.prefix}:itemids:{request_id}", offset, offset + limit - 1
            )
            async with self._r.pipeline(transaction=False) as pipe:
                for item_id in ids:
                    pipe.hgetall(self._k_item(item_id))
                found: list[dict[str, str]] = await pipe.execute()
        return [self._item(i, h) for i, h in zip(ids, found, strict=True) if h]

    async def get_item(self, item_id: str) -> Item | None:
        """Return the item, or None when unknown (or its request is not committed)."""
        with self._conn.errors("reading an item"):
            raw = await self._script("get_item", [self._k_item(item_id)], [self.prefix])
        return None if raw is None else self._item(item_id, _pairs(raw))

    # Item state changes (Lua) -------------------------------------------

    async def apply(self, op: ledger.Operation) -> ledger.Changes:
        """Apply a ledger operation by the Lua form of its rules (see the protocol).

        Each operation maps to its script, one per item in one MULTI/EXEC
        where it takes many; the contract suite's state machine checks the
        scripts against `csvimg.ledger`, their model.
        """
        match op:
            case ledger.StartItems():
                return await self._start_items(op)
            case ledger.FinishItems():
                return await self._finish_items(op)
            case ledger.ExtendLeases():
                return await self._extend_leases(op)
            case ledger.Sweep():
                return await self._sweep(op)
            case ledger.LeaseEvents():
                return await self._lease_events(op)
            case ledger.RescheduleEvent():
                return await self._reschedule_event(op)
        raise TypeError(f"RedisStorage cannot apply {type(op).__name__}")

    async def _pipelined(
        self, doing: str, calls: Sequence[tuple[str, list[str], list[str | int]]]
    ) -> list[Any]:
        """Run scripts in one MULTI/EXEC round trip; return their answers in order.

        Each script is replay-safe on its own (a token per call), so the
        client may send the whole transaction again after a broken
        connection.
        """
        with self._conn.errors(doing):
            async with self._r.pipeline(transaction=True) as pipe:
                for name, keys, args in calls:
                    await self._scripts[name](keys=keys, args=args, client=pipe)
                return list(await pipe.execute())

    async def _start_items(self, op: ledger.StartItems) -> ledger.Changes:
        """Lease: one start script per id, all in one MULTI/EXEC.

        An item started past ``max_attempts`` is then finished as
        ``too-many-attempts`` (it is this call's to finish: it holds the
        lease), in a second round trip that happens only then.
        """
        if not op.item_ids:
            return ledger.Changes()
        calls = [
            ("start", *self._start_call(i, op.at, op.lease_seconds, uuid.uuid4().hex))
            for i in op.item_ids
        ]
        answers = await self._pipelined("starting items", calls)
        leased = [
            self._item(i, _pairs(raw))
            for i, raw in zip(op.item_ids, answers, strict=True)
            if raw is not None
        ]
        limit = op.max_attempts
        over = [item for item in leased if limit is not None and item.attempts > limit]
        if not over:
            return ledger.Changes(items=tuple(leased), started=tuple(leased))
        results = [(i, ledger.too_many_attempts(i.attempts)) for i in over]
        given_up = await self._finish_items(
            ledger.FinishItems([(i.id, result) for i, result in results], op.at)
        )
        started = tuple(item for item in leased if item not in over)
        settled = tuple(ledger.settle_item(i, result, at=op.at) for i, result in results)
        return attrs.evolve(given_up, items=started + settled, started=started)

    def _start_call(
        self, item_id: str, at: float, lease_seconds: float, token: str
    ) -> tuple[list[str], list[str | int]]:
        return (
            [self._k_item(item_id), self._k_pending, self._k_leases],
            [_t(at), _t(at + lease_seconds), item_id, self.prefix, token],
        )

    async def _start(self, item_id: str, lease_seconds: float, token: str) -> Item | None:
        """Start one item as the call named *token* (a replay answers the same)."""
        with self._conn.errors("starting an item"):
            call = self._start_call(item_id, now(), lease_seconds, token)
            raw = await self._script("start", *call)
        return None if raw is None else self._item(item_id, _pairs(raw))

    async def _finish(self, item_id: str, result: ItemResult, event_id: str) -> Request | None:
        """Finish one item as the call named *event_id* (a replay answers the same)."""
        with self._conn.errors("finishing an item"):
            raw = await self._script("finish", *self._finish_call(item_id, result, event_id, now()))
        return None if raw is None else self._request(_pairs(raw))

    async def _finish_items(self, op: ledger.FinishItems) -> ledger.Changes:
        """Settle: one finish script per result, all in one MULTI/EXEC."""
        if not op.results:
            return ledger.Changes()
        calls = [
            ("finish", *self._finish_call(i, result, f"msg_{uuid.uuid4().hex}", op.at))
            for i, result in op.results
        ]
        answers = await self._pipelined("finishing items", calls)
        finished = tuple(self._request(_pairs(raw)) for raw in answers if raw is not None)
        return ledger.Changes(requests=finished, finished=finished)

    async def _extend_leases(self, op: ledger.ExtendLeases) -> ledger.Changes:
        """Push the leases of the PROCESSING items among the ids: one round trip."""
        if not op.item_ids:
            return ledger.Changes()
        until = _t(op.at + op.lease_seconds)
        calls: list[tuple[str, list[str], list[str | int]]] = [
            ("extend", [self._k_item(i), self._k_leases], [until, i, self.prefix])
            for i in op.item_ids
        ]
        answers = await self._pipelined("extending leases", calls)
        extended = tuple(i for i, ok in zip(op.item_ids, answers, strict=True) if ok)
        return ledger.Changes(ids=extended)

    def _finish_call(
        self, item_id: str, result: ItemResult, event_id: str, at: float
    ) -> tuple[list[str], list[str | int]]:
        values = {
            "output_key": result.output_key,
            "content_type": result.content_type,
            "bytes_in": result.bytes_in,
            "bytes_out": result.bytes_out,
            "width": result.width,
            "height": result.height,
            "error_code": result.error_code,
            "error_message": result.error_message,
        }
        present = [(k, str(v)) for k, v in values.items() if v is not None]
        absent = [k for k, v in values.items() if v is None]
        args: list[str | int] = [
            _t(at), item_id, self.prefix, "1" if result.ok else "0", event_id, len(present),
        ]
        for name, value in present:
            args += [name, value]
        args += absent
        return [self._k_item(item_id), self._k_pending, self._k_leases, self._k_due], args

    async def _sweep(self, op: ledger.Sweep) -> ledger.Changes:
        """Ids of expired leases (moved back to PENDING) and forgotten PENDING items."""
        if op.limit <= 0:
            return ledger.Changes()
        with self._conn.errors("looking for stale items"):
            found = await self._script(
                "stale",
                [self._k_pending, self._k_leases],
                [_t(op.now), _t(op.pending_before), op.limit, self.prefix],
            )
        return ledger.Changes(ids=tuple(found))

    # Webhooks -----------------------------------------------------------

    async def add_webhook(self, webhook: Webhook) -> None:
        """Register (or replace) a receiver."""
        fields = [
            "id", webhook.id, "url", webhook.url, "secret", webhook.secret,
            "created_at", _t(webhook.created_at), "active", "1" if webhook.active else "0",
        ]
        if webhook.owner is not None:
            fields += ["owner", webhook.owner]
        with self._conn.errors("adding a webhook"):
            await self._script(
                "add_webhook",
                [f"{self.prefix}:webhook:{webhook.id}", self._k_hooks(webhook.owner)],
                [self.prefix, webhook.id, _t(webhook.created_at), *fields],
            )

    async def list_webhooks(self, *, owner: str | None = None) -> list[Webhook]:
        """Registrations of *owner*, oldest first."""
        with self._conn.errors("listing webhooks"):
            ids = cast("list[str]", await self._r.zrange(self._k_hooks(owner), 0, -1))
            async with self._r.pipeline(transaction=False) as pipe:
                for hook_id in ids:
                    pipe.hgetall(f"{self.prefix}:webhook:{hook_id}")
                found: list[dict[str, str]] = await pipe.execute()
        return [
            Webhook(
                id=h["id"],
                url=h["url"],
                secret=h["secret"],
                created_at=float(h["created_at"]),
                owner=h.get("owner"),
                active=h.get("active", "1") == "1",
            )
            for h in found
            if h
        ]

    async def set_webhook_active(self, webhook_id: str, active: bool) -> None:
        """Enable or disable a registration (unknown ids are ignored)."""
        with self._conn.errors("updating a webhook"):
            await self._script(
                "webhook_active",
                [f"{self.prefix}:webhook:{webhook_id}"],
                ["1" if active else "0"],
            )

    async def delete_webhook(self, webhook_id: str, *, owner: str | None = None) -> bool:
        """Delete a registration of *owner*; False when there was none."""
        with self._conn.errors("deleting a webhook"):
            ok = await self._script(
                "delete_webhook",
                [f"{self.prefix}:webhook:{webhook_id}", self._k_hooks(owner)],
                [webhook_id, "0" if owner is None else "1", owner or ""],
            )
        return bool(ok)

    # Outbox -------------------------------------------------------------

    @staticmethod
    def _event(h: Mapping[str, str]) -> Event:
        return Event(
            id=h["id"],
            type=h["type"],
            request_id=h["request_id"],
            created_at=float(h["created_at"]),
            owner=h.get("owner"),
            callback_url=h.get("callback_url"),
            attempts=int(h.get("attempts", "0")),
            next_attempt_at=_opt_float(h.get("next_attempt_at")),
        )

    async def _lease_events(self, op: ledger.LeaseEvents) -> ledger.Changes:
        """Lease up to *limit* due events (oldest first among those taken)."""
        if op.limit <= 0:
            return ledger.Changes()
        until = op.now + op.lease_seconds
        with self._conn.errors("claiming events"):
            raw = await self._script(
                "claim_events", [self._k_due], [_t(op.now), op.limit, _t(until), self.prefix]
            )
        events = [attrs.evolve(self._event(_pairs(r)), lease_until=until) for r in raw if r]
        return ledger.Changes(events=tuple(sorted(events, key=lambda e: e.created_at)))

    async def _reschedule_event(self, op: ledger.RescheduleEvent) -> ledger.Changes:
        """Schedule the next round (None: delivered); `NotFoundError` if unknown."""
        at = op.next_attempt_at
        with self._conn.errors("rescheduling an event"):
            ok = await self._script(
                "reschedule",
                [f"{self.prefix}:event:{op.event_id}", self._k_due],
                ["" if at is None else _t(at), op.event_id],
            )
        if not ok:
            raise NotFoundError(f"no event {op.event_id}")
        return ledger.Changes()

    async def add_delivery(self, request_id: str, delivery: Delivery) -> None:
        """Append one attempt to the request's log."""
        with self._conn.errors("logging a delivery"):
            await self._r.rpush(
                f"{self.prefix}:deliveries:{request_id}", _json(attrs.asdict(delivery))
            )

    async def list_deliveries(self, request_id: str) -> list[Delivery]:
        """Return the request's delivery attempts, oldest first."""
        with self._conn.errors("reading deliveries"):
            raw = await self._r.lrange(f"{self.prefix}:deliveries:{request_id}", 0, -1)
        return [Delivery(**json.loads(d)) for d in raw]


# -- queue --------------------------------------------------------------------


class RedisQueue:
    """A Redis Streams queue with one consumer group; see `csvimg.backends.Queue`.

    Entries are read with XREADGROUP by the group ``csvimg``. Each hand-out
    records its lease end in the ``P:queue:leases`` zset in the same
    script, and a later `claim` takes over (XCLAIM) entries whose lease
    ended without an ack: their consumer died. So a lease is exactly
    *lease_seconds* of the claim (or of the last `extend`), whatever lease
    other consumers ask for. Between claims that find nothing, a consumer
    blocks on XREAD until a new entry arrives, a delay or a lease ends, or
    one second passes.

    A claim's token is ``<entry id>/<delivery count>/<consumer>``: it names
    one hand-out, so `ack`, `release` and `extend` do nothing once the
    entry was taken over. Released ids are added again as new entries
    (after their delay, from the ``P:queue:delayed`` zset), carrying their
    delivery count along.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0") -> None:
        self._conn = _Connection.parse(url)
        self.prefix = self._conn.prefix
        """The key prefix of this deployment."""
        self.stream = f"{self.prefix}:queue"
        """The stream key."""
        self.delayed = f"{self.prefix}:queue:delayed"
        """The zset of released ids waiting for their delay."""
        self.leases = f"{self.prefix}:queue:leases"
        """The zset of handed-out entry ids, scored by the end of their lease."""
        self._client: aioredis.Redis | None = None

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> RedisQueue:
        """Build from ``redis://host:port/db?prefix=name`` (unopened)."""
        return cls(url)

    @property
    def _r(self) -> aioredis.Redis:
        if self._client is None:
            raise StorageError(f"Redis queue at {self._conn.where} is not open")
        return self._client

    async def open(self) -> None:
        """Connect and create the stream and its consumer group if needed."""
        if self._client is None:
            client = self._conn.client()
            self._claim_script = client.register_script(_QUEUE_CLAIM)
            self._ack_script = client.register_script(_QUEUE_ACK)
            self._release_script = client.register_script(_QUEUE_RELEASE)
            self._extend_script = client.register_script(_QUEUE_EXTEND)
            self._client = client
        await self._ensure_group()

    async def _ensure_group(self) -> None:
        with self._conn.errors("creating the consumer group"):
            try:
                # From id 0: ids enqueued before any consumer existed count too.
                await self._r.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def close(self) -> None:
        """Close the connection pool; a later `open` connects again."""
        client, self._client = self._client, None
        if client is not None:
            await _aclose(client)

    async def ping(self) -> None:
        """Raise `StorageError` unless Redis answers."""
        with self._conn.errors("pinging"):
            await self._r.ping()

    async def enqueue(self, item_ids: Sequence[str]) -> None:
        """Append ids to the stream (pipelined, a chunk per round trip)."""
        with self._conn.errors("enqueuing"):
            for start in range(0, len(item_ids), _CHUNK):
                async with self._r.pipeline(transaction=False) as pipe:
                    for item_id in item_ids[start : start + _CHUNK]:
                        pipe.xadd(self.stream, {"i": item_id, "d": "0"})
                    await pipe.execute()

    async def _with_group(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """Run *call*; if Redis lost the group (restarted without data), recreate it once."""
        try:
            return await call()
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
        await self._ensure_group()
        return await call()

    async def claim(
        self, *, consumer: str, max_items: int, lease_seconds: float, wait: float
    ) -> list[Claim]:
        """Lease up to *max_items* ids, waiting up to *wait* seconds for one."""
        if max_items <= 0:
            return []
        deadline = time.monotonic() + max(0.0, wait)
        with self._conn.errors("claiming from the queue"):
            while True:
                at = now()
                claims, last_id, wake_at = await self._with_group(
                    functools.partial(self._take, consumer, max_items, at, at + lease_seconds)
                )
                remaining = deadline - time.monotonic()
                if claims or remaining <= 0:
                    return claims
                # Nothing yet: block until an entry newer than the last one
                # arrives, or until something delayed or leased falls due.
                pause = min(remaining, _POLL_SECONDS)
                if wake_at is not None:
                    pause = min(pause, max(0.001, wake_at - now()))
                block = max(1, int(pause * 1000))
                await self._r.xread({self.stream: last_id}, count=1, block=block)

    async def _take(
        self, consumer: str, max_items: int, at: float, lease_until: float
    ) -> tuple[list[Claim], str, float | None]:
        raw = await self._claim_script(
            keys=[self.stream, self.delayed, self.leases],
            args=[GROUP, consumer, _t(at), _t(lease_until), max_items],
        )
        taken, last_id, next_delayed, next_lease = raw
        claims = [
            Claim(item_id=item_id, token=f"{entry}/{count}/{consumer}", deliveries=int(deliveries))
            for entry, item_id, deliveries, count in taken
        ]
        wake = [float(t) for t in (next_delayed, next_lease) if t]
        return claims, last_id, (min(wake) if wake else None)

    @staticmethod
    def _token(claim: Claim) -> list[str]:
        """Split a token into [entry id, delivery count, consumer]."""
        parts = claim.token.split("/", 2)
        if len(parts) != 3:
            raise ValueError(f"not a Redis queue token: {claim.token!r}")
        return parts

    async def release_many(self, claims: Sequence[Claim], *, delay: float = 0.0) -> None:
        """Hand the ids these claims still hold back, at once or after *delay* seconds."""
        if not claims:
            return
        tokens = [self._token(c) for c in claims]
        due = "" if delay <= 0 else _t(now() + delay)
        with self._conn.errors("releasing"):
            async with self._r.pipeline(transaction=False) as pipe:
                for claim, token in zip(claims, tokens, strict=True):
                    member = f"{claim.deliveries}:{uuid.uuid4().hex}:{claim.item_id}"
                    await self._release_script(
                        keys=[self.stream, self.delayed, self.leases],
                        args=[GROUP, *token, claim.item_id, claim.deliveries, due, member],
                        client=pipe,
                    )
                await pipe.execute()

    async def ack_many(self, claims: Sequence[Claim]) -> None:
        """Remove every entry these claims still hold: one pipelined round trip."""
        if not claims:
            return
        tokens = [self._token(c) for c in claims]
        with self._conn.errors("acknowledging"):
            async with self._r.pipeline(transaction=False) as pipe:
                for token in tokens:
                    await self._ack_script(
                        keys=[self.stream, self.leases], args=[GROUP, *token], client=pipe
                    )
                await pipe.execute()

    async def extend_many(self, claims: Sequence[Claim], *, lease_seconds: float) -> None:
        """Hold every id these claims still hold until *lease_seconds* from now: one round trip."""
        if not claims:
            return
        tokens = [self._token(c) for c in claims]
        until = _t(now() + lease_seconds)
        with self._conn.errors("extending claims"):
            async with self._r.pipeline(transaction=False) as pipe:
                for token in tokens:
                    await self._extend_script(
                        keys=[self.stream, self.leases], args=[GROUP, *token, until], client=pipe
                    )
                await pipe.execute()

    async def depth(self) -> int:
        """Entries in the stream (waiting or leased) plus delayed ids."""
        with self._conn.errors("measuring the queue"):
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.xlen(self.stream)
                pipe.zcard(self.delayed)
                length, delayed = await pipe.execute()
        return int(length) + int(delayed)


async def _aclose(client: aioredis.Redis) -> None:
    # redis-py >= 5 spells it aclose(); close() is its deprecated alias.
    closer = getattr(client, "aclose", None) or client.close
    with contextlib.suppress(RedisError, OSError):
        await closer()


@hookimpl
def csvimg_register_backends(registry: BackendRegistry) -> None:
    """Serve ``redis://``, ``rediss://`` and ``redis+unix://`` for storage and queue."""
    for scheme in ("redis", "rediss", "redis+unix"):
        registry.add_storage(scheme, RedisStorage.from_url)
        registry.add_queue(scheme, RedisQueue.from_url)
