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
  atomically. Every change of state after that is a `csvimg.ledger`
  operation handed to `Storage.apply`: the ledger holds the rules
  (leases, takeover, attempts, settling once, counters, the final status
  and its outbox event in the same write, the sweep, the outbox leases);
  the storage reads what the operation asks for and writes what it
  decides, atomically. The contract is batch-only: every operation takes
  many items at once, so a worker pays per batch what it would otherwise
  pay per item.
* **Queue** carries item ids, at least once: a claimed id is leased to one
  consumer and handed out again when the lease expires without
  `Queue.ack_many`. Because delivery is at least once, processing an item
  twice must be harmless, which the ledger's `StartItems` and
  `FinishItems` guarantee.
* **BlobStore** keeps output image bytes under keys such as
  ``<request_id>/<seq>.jpg``; `put` is atomic (a reader never sees half a
  blob) and keys cannot escape the store.
* **Notifier** delivers one outbox event to its receivers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import attrs

from csvimg import ledger
from csvimg._errors import ConfigError
from csvimg.jobs import Delivery, Event, Item, Request, Row, Webhook

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
    "check_backend",
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


def check_backend(kind: str, backend: object, protocol: type) -> None:
    """Raise `ConfigError` unless *backend* has every method of *protocol*.

    So a backend written for another version of the contract (a storage
    without `Storage.apply`, say) is refused where it is handed over, with
    the names it lacks, not later inside a worker.
    """
    missing = sorted(
        name
        for name, value in vars(protocol).items()
        if not name.startswith("_") and callable(value)
        and not callable(getattr(backend, name, None))
    )
    if missing:
        raise ConfigError(
            f"{kind} backend {type(backend).__name__} lacks {', '.join(missing)}: it does not "
            f"implement csvimg.backends.{protocol.__name__} of this csvimg version "
            "(see docs/plugins.md)"
        )


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

    async def apply(self, op: ledger.Operation) -> ledger.Changes:
        """Apply one `csvimg.ledger` operation atomically; return its changes.

        Read what ``op.reads`` asks for, hand it to ``op.decide`` and write
        the `Changes` it returns (whole items, requests and events, insert
        or replace by id), all in one transaction or under one lock, so two
        callers never decide on the same state. `csvimg.ledger.run` is that
        loop for a connector with plain ``read`` and ``write`` calls::

            async def apply(self, op):
                async with self._transaction() as tx:
                    return ledger.run(op, tx.read, tx.write)

        The operations are `StartItems`, `FinishItems`, `ExtendLeases`,
        `Sweep`, `LeaseEvents` and `RescheduleEvent`; the rules are theirs,
        not the backend's. A backend may answer an operation by a native
        form of the same rules (Redis does, in Lua), as long as the
        contract suite's state machine finds it equal to the ledger.
        """

    async def add_webhook(self, webhook: Webhook) -> None:
        """Register a webhook receiver."""

    async def list_webhooks(self, *, owner: str | None = None) -> list[Webhook]:
        """Return active and inactive registrations of *owner* (None: ownerless)."""

    async def set_webhook_active(self, webhook_id: str, active: bool) -> None:
        """Enable or disable a registration (a receiver's 410 disables it)."""

    async def delete_webhook(self, webhook_id: str, *, owner: str | None = None) -> bool:
        """Delete a registration of *owner*; False when there was none."""

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

    async def ack_many(self, claims: Sequence[Claim]) -> None:
        """Remove processed ids for good, in one round trip; claims no longer held are ignored."""

    async def release_many(self, claims: Sequence[Claim], *, delay: float = 0.0) -> None:
        """Give ids back, to be handed out again after *delay* seconds; others are ignored."""

    async def extend_many(self, claims: Sequence[Claim], *, lease_seconds: float) -> None:
        """Keep holding claimed ids for *lease_seconds* more; claims no longer held are ignored."""

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
