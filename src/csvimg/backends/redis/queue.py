"""`RedisQueue`: the queue as a Redis stream read by one consumer group.

Its Lua scripts are in ``lua/queue_*.lua`` (see `csvimg.backends.redis._lua`).
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from csvimg._errors import StorageError
from csvimg.backends import Claim
from csvimg.backends.redis._connection import _aclose, _Connection, _t
from csvimg.backends.redis._lua import script
from csvimg.jobs import now

if TYPE_CHECKING:
    from csvimg.settings import Settings

__all__ = ["GROUP", "RedisQueue"]

_T = TypeVar("_T")

GROUP: Final = "csvimg"
"""The consumer group every `RedisQueue` reads the stream with."""

# Commands per pipeline round trip when enqueuing: large enough to amortise
# the round trip, small enough to keep buffers low.
_CHUNK: Final = 5000

# Longest single XREAD BLOCK of a waiting claim: a safety net (the wait is
# cut short for due delays and leases anyway); well under the socket timeout.
_POLL_SECONDS: Final = 1.0

# A claim's token is "<entry id>/<delivery count>/<consumer>": the entry and
# its delivery counter name one hand-out, so a consumer whose lease ran out
# cannot ack, release or extend the entry after another took it over (or
# after it took the entry over itself): ``_queue_holds.lua`` checks it.
_CLAIM: Final = script("queue_claim")
_ACK: Final = script("queue_ack", "_queue_holds")
_RELEASE: Final = script("queue_release", "_queue_holds")
_EXTEND: Final = script("queue_extend", "_queue_holds")


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
            self._claim_script = client.register_script(_CLAIM)
            self._ack_script = client.register_script(_ACK)
            self._release_script = client.register_script(_RELEASE)
            self._extend_script = client.register_script(_EXTEND)
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
