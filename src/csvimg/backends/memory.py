"""In-memory backends (``memory://``): storage, queue and blob store.

Complete implementations of the contracts, kept in one process's memory:
what unit tests run on and what an application embedding csvimg in one
process uses. Each URL builds a fresh, empty backend. Every method runs
under one lock, so a method is atomic even when called from threads.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import threading
import uuid
from collections.abc import Sequence

import anyio
import attrs

from csvimg import ledger
from csvimg._errors import NotFoundError, StorageError
from csvimg.backends import BlobInfo, Claim, check_key
from csvimg.hooks import BackendRegistry, hookimpl
from csvimg.jobs import (
    Delivery,
    Event,
    Item,
    ItemIds,
    ItemStatus,
    Request,
    Row,
    Webhook,
    item_id,
    item_rows,
    now,
)

# The rules' old home; kept importable for backends written against it.
from csvimg.ledger import finish_outcome, lease_item, settle_item
from csvimg.settings import Settings

__all__ = [
    "MemoryBlobStore",
    "MemoryQueue",
    "MemoryStorage",
    "finish_outcome",
    "lease_item",
    "settle_item",
]


class MemoryStorage:
    """Storage kept in dicts; see `csvimg.backends.Storage`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[str, Request] = {}
        self._rows: dict[str, list[Row]] = {}
        self._items: dict[str, Item] = {}
        self._item_ids: dict[str, ItemIds] = {}
        self._webhooks: dict[str, Webhook] = {}
        self._events: dict[str, Event] = {}
        self._deliveries: dict[str, list[Delivery]] = {}
        self.closed = False

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> MemoryStorage:
        """Build from ``memory://`` (the URL carries nothing else)."""
        return cls()

    async def open(self) -> None:
        """Nothing to do: memory is always open."""
        self.closed = False

    async def close(self) -> None:
        """Mark closed; data stays for a later `open`."""
        self.closed = True

    async def ping(self) -> None:
        """Answer unless closed."""
        if self.closed:
            raise StorageError("memory storage is closed")

    async def create_request(self, request: Request, rows: Sequence[Row]) -> None:
        """Store the request, rows and the items derived from them in one step."""
        rid = request.id
        at = request.created_at
        items = [
            Item(id=item_id(rid, seq), request_id=rid, row=row, position=position, url=url,
                 updated_at=at)
            for seq, row, position, url in item_rows(rows)
        ]
        with self._lock:
            if rid in self._requests:
                raise StorageError(f"request {rid} exists already")
            self._requests[rid] = request
            self._rows[rid] = list(rows)
            self._item_ids[rid] = ItemIds(rid, len(items))
            for item in items:
                self._items[item.id] = item

    async def get_request(self, request_id: str) -> Request | None:
        """Return the request or None."""
        return self._requests.get(request_id)

    async def list_requests(self, *, owner: str | None = None, limit: int = 50) -> list[Request]:
        """Newest first."""
        with self._lock:
            found = [r for r in self._requests.values() if owner is None or r.owner == owner]
        found.sort(key=lambda r: r.created_at, reverse=True)
        return found[:limit]

    async def list_rows(self, request_id: str, *, offset: int = 0, limit: int = 1000) -> list[Row]:
        """Rows in order."""
        return list(self._rows.get(request_id, [])[offset : offset + limit])

    async def list_items(
        self, request_id: str, *, offset: int = 0, limit: int = 1000
    ) -> list[Item]:
        """Items in (row, position) order."""
        with self._lock:
            ids = self._item_ids.get(request_id, ItemIds(request_id, 0))[offset : offset + limit]
            return [self._items[i] for i in ids]

    async def get_item(self, item_id: str) -> Item | None:
        """Return the item or None."""
        return self._items.get(item_id)

    def _read(self, reads: ledger.Reads) -> ledger.State:
        items = {i: self._items[i] for i in reads.item_ids if i in self._items}
        if reads.stale is not None:
            q = reads.stale
            for item in self._items.values():
                if (
                    item.status is ItemStatus.PROCESSING
                    and item.lease_until is not None
                    and item.lease_until < q.now
                ) or (item.status is ItemStatus.PENDING and item.updated_at < q.pending_before):
                    items[item.id] = item
        events = {i: self._events[i] for i in reads.event_ids if i in self._events}
        if reads.due is not None:
            events.update((e.id, e) for e in self._events.values())
        requests = {i.request_id: self._requests[i.request_id] for i in items.values()}
        return ledger.State(items=items, requests=requests, events=events)

    def _write(self, changes: ledger.Changes) -> None:
        for item in changes.items:
            self._items[item.id] = item
        for request in changes.requests:
            self._requests[request.id] = request
        for event in changes.events:
            self._events[event.id] = event

    async def apply(self, op: ledger.Operation) -> ledger.Changes:
        """Apply a ledger operation under the lock (see the protocol)."""
        with self._lock:
            return ledger.run(op, self._read, self._write)

    async def add_webhook(self, webhook: Webhook) -> None:
        """Register a receiver."""
        with self._lock:
            self._webhooks[webhook.id] = webhook

    async def list_webhooks(self, *, owner: str | None = None) -> list[Webhook]:
        """Registrations of *owner*, oldest first."""
        with self._lock:
            found = [w for w in self._webhooks.values() if w.owner == owner]
        return sorted(found, key=lambda w: w.created_at)

    async def set_webhook_active(self, webhook_id: str, active: bool) -> None:
        """Enable or disable."""
        with self._lock:
            hook = self._webhooks.get(webhook_id)
            if hook is not None:
                self._webhooks[webhook_id] = attrs.evolve(hook, active=active)

    async def delete_webhook(self, webhook_id: str, *, owner: str | None = None) -> bool:
        """Delete if it belongs to *owner*."""
        with self._lock:
            hook = self._webhooks.get(webhook_id)
            if hook is None or hook.owner != owner:
                return False
            del self._webhooks[webhook_id]
            return True

    async def add_delivery(self, request_id: str, delivery: Delivery) -> None:
        """Log one attempt."""
        with self._lock:
            self._deliveries.setdefault(request_id, []).append(delivery)

    async def list_deliveries(self, request_id: str) -> list[Delivery]:
        """Attempts, oldest first."""
        with self._lock:
            return list(self._deliveries.get(request_id, []))


class MemoryQueue:
    """A leased at-least-once queue in memory; see `csvimg.backends.Queue`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: list[tuple[float, int, str, int]] = []  # (available_at, seq, id, deliveries)
        self._leased: dict[str, tuple[str, float, int]] = {}  # token -> (id, until, deliveries)
        self._seq = itertools.count()
        self._wakeup: anyio.Event | None = None
        self.closed = False

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> MemoryQueue:
        """Build from ``memory://``."""
        return cls()

    async def open(self) -> None:
        """Nothing to do."""
        self.closed = False

    async def close(self) -> None:
        """Mark closed."""
        self.closed = True

    async def ping(self) -> None:
        """Answer unless closed."""
        if self.closed:
            raise StorageError("memory queue is closed")

    def _push(self, item_id: str, available_at: float, deliveries: int) -> None:
        heapq.heappush(self._ready, (available_at, next(self._seq), item_id, deliveries))

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    async def enqueue(self, item_ids: Sequence[str]) -> None:
        """Add ids, ready now."""
        at = now()
        with self._lock:
            for item_id in item_ids:
                self._push(item_id, at, 0)
        self._wake()

    def _take(self, max_items: int, lease_seconds: float) -> list[Claim]:
        at = now()
        with self._lock:
            for token, (item_id, until, deliveries) in list(self._leased.items()):
                if until <= at:
                    del self._leased[token]
                    self._push(item_id, at, deliveries)
            claims: list[Claim] = []
            while self._ready and len(claims) < max_items and self._ready[0][0] <= at:
                _, _, item_id, deliveries = heapq.heappop(self._ready)
                token = uuid.uuid4().hex
                self._leased[token] = (item_id, at + lease_seconds, deliveries + 1)
                claims.append(Claim(item_id=item_id, token=token, deliveries=deliveries + 1))
            return claims

    def _next_due(self) -> float | None:
        with self._lock:
            times = [t for t, *_ in self._ready[:1]] + [u for _, u, _ in self._leased.values()]
        return min(times) if times else None

    async def claim(
        self, *, consumer: str, max_items: int, lease_seconds: float, wait: float
    ) -> list[Claim]:
        """Lease up to *max_items* ids, waiting up to *wait* seconds."""
        deadline = now() + wait
        while True:
            claims = self._take(max_items, lease_seconds)
            remaining = deadline - now()
            if claims or remaining <= 0:
                return claims
            due = self._next_due()
            pause = remaining if due is None else max(0.001, min(remaining, due - now()))
            if self._wakeup is None:
                self._wakeup = anyio.Event()
            with anyio.move_on_after(pause):
                await self._wakeup.wait()

    async def release_many(self, claims: Sequence[Claim], *, delay: float = 0.0) -> None:
        """Hand the ids back after *delay*."""
        at = now() + delay
        with self._lock:
            for claim in claims:
                leased = self._leased.pop(claim.token, None)
                if leased is not None:
                    self._push(claim.item_id, at, leased[2])
        self._wake()

    async def ack_many(self, claims: Sequence[Claim]) -> None:
        """Forget every id."""
        with self._lock:
            for claim in claims:
                self._leased.pop(claim.token, None)

    async def extend_many(self, claims: Sequence[Claim], *, lease_seconds: float) -> None:
        """Hold every id longer."""
        until = now() + lease_seconds
        with self._lock:
            for claim in claims:
                leased = self._leased.get(claim.token)
                if leased is not None:
                    self._leased[claim.token] = (leased[0], until, leased[2])

    async def depth(self) -> int:
        """Waiting plus leased ids."""
        with self._lock:
            return len(self._ready) + len(self._leased)


class MemoryBlobStore:
    """Blobs in a dict; see `csvimg.backends.BlobStore`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blobs: dict[str, tuple[bytes, BlobInfo]] = {}

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> MemoryBlobStore:
        """Build from ``memory://``."""
        return cls()

    async def open(self) -> None:
        """Nothing to do."""

    async def close(self) -> None:
        """Nothing to do."""

    async def put(self, key: str, data: bytes, *, content_type: str) -> BlobInfo:
        """Store bytes."""
        check_key(key)
        info = BlobInfo(
            key=key,
            size=len(data),
            content_type=content_type,
            etag=hashlib.blake2b(data, digest_size=16).hexdigest(),
        )
        with self._lock:
            self._blobs[key] = (bytes(data), info)
        return info

    async def get(self, key: str) -> bytes:
        """Return bytes or raise `NotFoundError`."""
        check_key(key)
        with self._lock:
            found = self._blobs.get(key)
        if found is None:
            raise NotFoundError(f"no blob {key!r}")
        return found[0]

    async def stat(self, key: str) -> BlobInfo | None:
        """Return info or None."""
        check_key(key)
        with self._lock:
            found = self._blobs.get(key)
        return None if found is None else found[1]

    async def delete(self, key: str) -> None:
        """Remove the blob."""
        check_key(key)
        with self._lock:
            self._blobs.pop(key, None)


@hookimpl
def csvimg_register_backends(registry: BackendRegistry) -> None:
    """Serve ``memory://`` for storage, queue and blobs."""
    registry.add_storage("memory", MemoryStorage.from_url)
    registry.add_queue("memory", MemoryQueue.from_url)
    registry.add_blobs("memory", MemoryBlobStore.from_url)
