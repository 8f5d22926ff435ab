"""Backend contracts: storage, queue, blob store and notifier.

Each kind of backend is a typed async `Protocol`. A backend is built from a
URL by the factory its plugin registered for the URL's scheme (see
`csvimg.plugins`), opened once with `open()`, used by any number of tasks
at once, and closed with `close()`.

The contract in words (the executable version is `csvimg.testing`):

* **Storage** is the source of truth: requests, their rows and items,
  webhook registrations, the outbox of events and the log of delivery
  attempts. `create_request` writes a request with all its rows and the
  items it derives from them (one per URL, see `csvimg.jobs.item_rows`)
  atomically. `finish_item` is atomic and idempotent: it records an item's
  result, bumps the request's counters and, when the last item finishes,
  moves the request to COMPLETED or FAILED *and* records the outbox event in
  the same transaction; it returns the finished request only to the one
  caller that finished it.
* **Queue** carries item ids, at least once: a claimed id is leased to one
  consumer and handed out again when the lease expires without `ack`.
  Because delivery is at least once, processing an item twice must be
  harmless, which `Storage.start_item` / `finish_item` guarantee.
* **Batches**: `Storage.start_items`, `finish_items`, `extend_leases` and
  `Queue.ack_many`, `extend_many` do what the single-item methods do, for
  many items in one round trip (one transaction, pipeline or script).
  Workers use them to pay per batch what they would otherwise pay per item.
  A backend written before they existed still works: the engine falls back
  to the single-item methods when a backend lacks them.
* **BlobStore** keeps output image bytes under keys such as
  ``<request_id>/<seq>.jpg``; `put` is atomic (a reader never sees half a
  blob) and keys cannot escape the store.
* **Notifier** delivers one outbox event to its receivers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import attrs

from csvimg.jobs import Delivery, Event, Item, ItemResult, Request, Row, Webhook

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "MAX_KEY_LENGTH",
    "BlobInfo",
    "BlobStore",
    "Claim",
    "Notifier",
    "Queue",
    "Storage",
    "check_key",
]

MAX_KEY_LENGTH = 1024
"""Longest blob key accepted, in characters."""


def check_key(key: str) -> str:
    """Return *key* if it is a safe relative blob key, else raise `ValueError`.

    A key is ``/``-separated segments, none of them empty, ``.`` or ``..``;
    it may not start with ``/`` nor hold a backslash or a NUL, and is at
    most `MAX_KEY_LENGTH` characters with segments of at most 255 bytes.
    The rule is the same for every blob store, so a key that works on one
    works on all (and never escapes a folder on any).
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"bad blob key {key!r}: empty")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"bad blob key: longer than {MAX_KEY_LENGTH} characters")
    if "\x00" in key:
        raise ValueError(f"bad blob key {key!r}: holds a NUL character")
    if "\\" in key:
        raise ValueError(f"bad blob key {key!r}: holds a backslash")
    if key.startswith("/"):
        raise ValueError(f"bad blob key {key!r}: absolute path")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"bad blob key {key!r}: empty, '.' or '..' segment")
        if len(segment.encode("utf-8", "surrogatepass")) > 255:
            raise ValueError(f"bad blob key {key!r}: a segment is longer than 255 bytes")
    return key


@runtime_checkable
class Storage(Protocol):
    """Durable state: requests, rows, items, webhooks, outbox, deliveries."""

    async def open(self) -> None:
        """Connect and create the schema if needed."""

    async def close(self) -> None:
        """Release connections."""

    async def ping(self) -> None:
        """Raise `StorageError` unless the backend answers."""

    async def create_request(self, request: Request, rows: Sequence[Row]) -> None:
        """Store a new request with all its rows and their items, all or nothing.

        The storage derives the items itself: one PENDING item per URL of
        *rows*, item number ``seq`` (0-based, in row then position order,
        as `csvimg.jobs.item_rows` yields them) with id
        ``item_id(request.id, seq)``, ``attempts`` 0 and ``updated_at``
        equal to ``request.created_at``. ``request.total`` is their number.
        An existing request id raises `StorageError`.
        """

    async def get_request(self, request_id: str) -> Request | None:
        """Return the request, or None when unknown."""

    async def list_requests(
        self, *, owner: str | None = None, limit: int = 50
    ) -> list[Request]:
        """Return the newest requests first (of *owner* when given)."""

    async def list_rows(self, request_id: str, *, offset: int = 0, limit: int = 1000) -> list[Row]:
        """Return rows in upload order, ``offset`` counted in rows."""

    async def list_items(
        self, request_id: str, *, offset: int = 0, limit: int = 1000
    ) -> list[Item]:
        """Return items in (row, position) order, ``offset`` counted in items."""

    async def get_item(self, item_id: str) -> Item | None:
        """Return one item, or None when unknown."""

    async def start_item(self, item_id: str, *, lease_seconds: float) -> Item | None:
        """Lease an item for processing and return it (attempts incremented).

        Moves PENDING -> PROCESSING, or takes over a PROCESSING item whose
        lease has expired (its worker died). Moves the request PENDING ->
        PROCESSING on its first item. Returns None when the item is unknown,
        already finished, or leased by a live worker: the caller then drops
        its copy of the queue message.
        """

    async def extend_lease(self, item_id: str, *, lease_seconds: float) -> bool:
        """Push a PROCESSING item's lease forward; False if no longer ours to hold."""

    async def start_items(self, item_ids: Sequence[str], *, lease_seconds: float) -> list[Item]:
        """`start_item` for many ids at once, atomically; return the items that started.

        Same rules as `start_item`, id by id in the order given (an id given
        twice starts once): unknown, finished and live-leased ids are left
        out of the answer. One transaction (or script): either every
        started item is leased or none is.
        """

    async def extend_leases(self, item_ids: Sequence[str], *, lease_seconds: float) -> list[str]:
        """`extend_lease` for many ids at once; return the ids whose lease was extended."""

    async def retry_item(self, item_id: str, *, error_code: str, error_message: str) -> bool:
        """Move PROCESSING -> PENDING after a retryable failure; False if not PROCESSING."""

    async def finish_item(self, item_id: str, result: ItemResult) -> Request | None:
        """Record an item's outcome atomically; see the module docstring.

        Idempotent: an item that already finished is left as it is. Returns
        the request only when this call finished it (exactly one caller).
        """

    async def finish_items(self, results: Sequence[tuple[str, ItemResult]]) -> list[Request]:
        """`finish_item` for many ``(item_id, result)`` pairs, atomically.

        Same rules as `finish_item`, pair by pair in the order given (a
        second result for one item is ignored). Returns the requests this
        call finished, each once, with exactly one outbox event recorded for
        each, even when other callers finish items of the same requests at
        the same time. One transaction (or script): all results are recorded
        or none.
        """

    async def stale_items(self, *, now: float, pending_before: float, limit: int) -> list[str]:
        """Ids of items that may have fallen out of the queue, touched.

        PROCESSING items whose lease ended before *now* are moved back to
        PENDING (their worker died); PENDING items not touched since
        *pending_before* (lost between storing and enqueuing) are touched.
        Both get ``updated_at = now``, so an id is returned once per window.
        The engine re-enqueues them.
        """

    async def add_webhook(self, webhook: Webhook) -> None:
        """Register a webhook receiver."""

    async def list_webhooks(self, *, owner: str | None = None) -> list[Webhook]:
        """Return active and inactive registrations of *owner* (None: ownerless)."""

    async def set_webhook_active(self, webhook_id: str, active: bool) -> None:
        """Enable or disable a registration (a receiver's 410 disables it)."""

    async def delete_webhook(self, webhook_id: str, *, owner: str | None = None) -> bool:
        """Delete a registration of *owner*; False when there was none."""

    async def claim_events(self, *, now: float, limit: int, lease_seconds: float) -> list[Event]:
        """Lease up to *limit* undelivered events due at *now*."""

    async def reschedule_event(self, event_id: str, *, next_attempt_at: float | None) -> None:
        """Schedule the event's next delivery round; None marks it delivered."""

    async def add_delivery(self, request_id: str, delivery: Delivery) -> None:
        """Append one delivery attempt to the request's log."""

    async def list_deliveries(self, request_id: str) -> list[Delivery]:
        """Return the request's delivery attempts, oldest first."""


@attrs.frozen
class Claim:
    """An item id leased from a queue; ``token`` identifies this delivery."""

    item_id: str
    token: str
    deliveries: int = 1


@runtime_checkable
class Queue(Protocol):
    """At-least-once queue of item ids with leases."""

    async def open(self) -> None:
        """Connect and create what the queue needs."""

    async def close(self) -> None:
        """Release connections."""

    async def ping(self) -> None:
        """Raise `StorageError` unless the queue answers."""

    async def enqueue(self, item_ids: Sequence[str]) -> None:
        """Add item ids; enqueuing an id twice may deliver it twice."""

    async def claim(
        self, *, consumer: str, max_items: int, lease_seconds: float, wait: float
    ) -> list[Claim]:
        """Lease up to *max_items* ids, waiting up to *wait* seconds for one."""

    async def ack(self, claim: Claim) -> None:
        """Remove a processed id for good."""

    async def release(self, claim: Claim, *, delay: float = 0.0) -> None:
        """Give an id back to be handed out again after *delay* seconds."""

    async def extend(self, claim: Claim, *, lease_seconds: float) -> None:
        """Keep holding a claimed id for *lease_seconds* more."""

    async def ack_many(self, claims: Sequence[Claim]) -> None:
        """`ack` every claim, in one round trip; claims no longer held are ignored."""

    async def extend_many(self, claims: Sequence[Claim], *, lease_seconds: float) -> None:
        """`extend` every claim, in one round trip; claims no longer held are ignored."""

    async def depth(self) -> int:
        """How many ids wait or are leased (for metrics; may be approximate)."""


@attrs.frozen
class BlobInfo:
    """What a blob store knows about one stored blob."""

    key: str
    size: int
    content_type: str
    etag: str
    path: Path | None = None


@runtime_checkable
class BlobStore(Protocol):
    """Where output images live.

    Keys follow `check_key`; any other key raises `ValueError`.
    """

    async def open(self) -> None:
        """Prepare the store (create folders, connect)."""

    async def close(self) -> None:
        """Release resources."""

    async def put(self, key: str, data: bytes, *, content_type: str) -> BlobInfo:
        """Store *data* under *key* atomically, replacing any old blob."""

    async def get(self, key: str) -> bytes:
        """Return the blob's bytes; `NotFoundError` when missing."""

    async def stat(self, key: str) -> BlobInfo | None:
        """Return the blob's info, or None when missing."""

    async def delete(self, key: str) -> None:
        """Remove a blob (missing is fine)."""


@runtime_checkable
class Notifier(Protocol):
    """Delivers outbox events (webhooks over HTTP are the built-in one)."""

    async def open(self) -> None:
        """Prepare (HTTP client pools...)."""

    async def close(self) -> None:
        """Release resources."""

    async def deliver(self, event: Event, request: Request) -> float | None:
        """Make one delivery round for *event*.

        Returns None when nothing is left to do, or the time (epoch seconds)
        at which the next round is due. Attempts are recorded in storage.
        """
