"""A storage backend from nothing: csvimg's state in a stdlib `shelve` file.

The walk-through of ``docs/plugins.md``: every method of
`csvimg.backends.Storage`, none of the job's rules. Those live in
`csvimg.ledger`; `ShelfStorage.apply` only reads what an operation asks
for, under one lock, and writes what the ledger decided. The contract suite
(``tests/test_example_shelf.py``) proves it, closing and reopening the file
too. Single process (a `shelve` file has no locking between processes);
every lookup that is not by key scans, which is fine for an example and for
a few thousand items.
"""

from __future__ import annotations

import shelve
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from csvimg import (
    BackendRegistry,
    Delivery,
    Item,
    ItemStatus,
    Request,
    Row,
    Settings,
    StorageError,
    Webhook,
    hookimpl,
    ledger,
)
from csvimg.jobs import item_id, item_rows

__all__ = ["ShelfStorage", "csvimg_register_backends"]


class ShelfStorage:
    """Storage in one `shelve` file: ``shelf:///path/to/state``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: shelve.Shelf[Any] | None = None

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> ShelfStorage:
        """Build from ``shelf:///path`` (the path of the shelf file)."""
        path = url.removeprefix("shelf://")
        if not path.startswith("/"):
            raise ValueError(f"a shelf URL names an absolute path: shelf:///path, not {url!r}")
        return cls(path)

    # -- life cycle -------------------------------------------------------------

    async def open(self) -> None:
        """Open (or create) the shelf file."""
        if self._db is None:
            self._db = shelve.open(str(self.path))  # noqa: S301, SIM115 - our own file, closed by close()

    async def close(self) -> None:
        """Write everything out and close the file."""
        if self._db is not None:
            self._db.close()
            self._db = None

    async def ping(self) -> None:
        """Answer unless closed."""
        self._shelf()

    def _shelf(self) -> shelve.Shelf[Any]:
        if self._db is None:
            raise StorageError(f"shelf {self.path} is not open")
        return self._db

    def _values(self, prefix: str) -> Iterator[Any]:
        db = self._shelf()
        return (db[key] for key in list(db.keys()) if key.startswith(prefix))

    # -- requests, rows, items --------------------------------------------------

    async def create_request(self, request: Request, rows: Sequence[Row]) -> None:
        """Store the request, its rows and the items they make, all at once."""
        rid, at = request.id, request.created_at
        with self._lock:
            db = self._shelf()
            if f"req:{rid}" in db:
                raise StorageError(f"request {rid} exists already")
            for seq, row, position, url in item_rows(rows):
                iid = item_id(rid, seq)
                db[f"item:{iid}"] = Item(
                    id=iid, request_id=rid, row=row, position=position, url=url, updated_at=at
                )
            db[f"rows:{rid}"] = list(rows)
            db[f"req:{rid}"] = request  # last: a request is there only with all its items

    async def get_request(self, request_id: str) -> Request | None:
        """The request, or None."""
        with self._lock:
            found: Request | None = self._shelf().get(f"req:{request_id}")
            return found

    async def list_requests(self, *, owner: str | None = None, limit: int = 50) -> list[Request]:
        """Newest first, of *owner* when given."""
        with self._lock:
            found = [r for r in self._values("req:") if owner is None or r.owner == owner]
        return sorted(found, key=lambda r: r.created_at, reverse=True)[:limit]

    async def list_rows(self, request_id: str, *, offset: int = 0, limit: int = 1000) -> list[Row]:
        """Rows in upload order."""
        with self._lock:
            rows: list[Row] = self._shelf().get(f"rows:{request_id}", [])
        return rows[offset : offset + limit]

    async def list_items(
        self, request_id: str, *, offset: int = 0, limit: int = 1000
    ) -> list[Item]:
        """Items in (row, position) order, which is their ``seq`` order."""
        with self._lock:
            db = self._shelf()
            request: Request | None = db.get(f"req:{request_id}")
            total = 0 if request is None else request.total
            seqs = range(offset, min(total, offset + limit))
            return [db[f"item:{item_id(request_id, seq)}"] for seq in seqs]

    async def get_item(self, item_id: str) -> Item | None:
        """The item, or None."""
        with self._lock:
            found: Item | None = self._shelf().get(f"item:{item_id}")
            return found

    # -- every change of state: the ledger decides --------------------------------

    async def apply(self, op: ledger.Operation) -> ledger.Changes:
        """Read what *op* asks for, let the ledger decide, write its answer: one lock."""
        with self._lock:
            return ledger.run(op, self._read, self._write)

    def _read(self, reads: ledger.Reads) -> ledger.State:
        db = self._shelf()
        items = {i: db[f"item:{i}"] for i in reads.item_ids if f"item:{i}" in db}
        if reads.stale is not None:  # a scan; the ledger picks and limits
            for item in self._values("item:"):
                if item.status in (ItemStatus.PENDING, ItemStatus.PROCESSING):
                    items[item.id] = item
        events = {e: db[f"event:{e}"] for e in reads.event_ids if f"event:{e}" in db}
        if reads.due is not None:  # a scan; the ledger picks due ones and limits
            events.update((e.id, e) for e in self._values("event:"))
        requests = {i.request_id: db[f"req:{i.request_id}"] for i in items.values()}
        return ledger.State(items=items, requests=requests, events=events)

    def _write(self, changes: ledger.Changes) -> None:
        db = self._shelf()
        for item in changes.items:
            db[f"item:{item.id}"] = item
        for request in changes.requests:
            db[f"req:{request.id}"] = request
        for event in changes.events:
            db[f"event:{event.id}"] = event

    # -- webhooks and the delivery log --------------------------------------------

    async def add_webhook(self, webhook: Webhook) -> None:
        """Register (or replace) a receiver."""
        with self._lock:
            self._shelf()[f"hook:{webhook.id}"] = webhook

    async def list_webhooks(self, *, owner: str | None = None) -> list[Webhook]:
        """Registrations of *owner*, oldest first."""
        with self._lock:
            found = [h for h in self._values("hook:") if h.owner == owner]
        return sorted(found, key=lambda h: h.created_at)

    async def set_webhook_active(self, webhook_id: str, active: bool) -> None:
        """Enable or disable a registration (unknown ids are ignored)."""
        with self._lock:
            db = self._shelf()
            hook: Webhook | None = db.get(f"hook:{webhook_id}")
            if hook is not None:
                db[f"hook:{webhook_id}"] = attrs.evolve(hook, active=active)

    async def delete_webhook(self, webhook_id: str, *, owner: str | None = None) -> bool:
        """Delete a registration of *owner*; False when there was none."""
        with self._lock:
            db = self._shelf()
            hook: Webhook | None = db.get(f"hook:{webhook_id}")
            if hook is None or hook.owner != owner:
                return False
            del db[f"hook:{webhook_id}"]
            return True

    async def add_delivery(self, request_id: str, delivery: Delivery) -> None:
        """Append one delivery attempt to the request's log."""
        with self._lock:
            db = self._shelf()
            db[f"deliv:{request_id}"] = [*db.get(f"deliv:{request_id}", []), delivery]

    async def list_deliveries(self, request_id: str) -> list[Delivery]:
        """The request's delivery attempts, oldest first."""
        with self._lock:
            found: list[Delivery] = self._shelf().get(f"deliv:{request_id}", [])
            return found


@hookimpl
def csvimg_register_backends(registry: BackendRegistry) -> None:
    """Serve ``shelf://`` for storage; with no queue URL set, workers run in-process."""
    registry.add_storage("shelf", ShelfStorage.from_url, queue="memory")
