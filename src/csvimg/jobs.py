"""Units of work and their state machines.

A `Request` is one uploaded CSV; an `Item` is one image URL of one row.
Both are frozen attrs classes: backends store them and hand back new
values built with `attrs.evolve`, never mutate them.

The only legal moves are the ones in `REQUEST_TRANSITIONS` and
`ITEM_TRANSITIONS`; every backend checks them through `check_request` /
`check_item`, which raise `TransitionError` on anything else::

    Request: PENDING -> PROCESSING -> COMPLETED | FAILED
             PENDING -> FAILED                  (cancelled before any work)
    Item:    PENDING -> PROCESSING -> DONE | FAILED
             PROCESSING -> PENDING              (retryable error, lease expired)
             PENDING -> FAILED                  (cancelled)

A request is COMPLETED when every item reached DONE or FAILED and at least
one is DONE; it is FAILED when every item failed (or it was cancelled).
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, overload

import attrs

from csvimg._errors import TransitionError

__all__ = [
    "ITEM_TRANSITIONS",
    "REQUEST_TRANSITIONS",
    "Delivery",
    "Event",
    "Item",
    "ItemIds",
    "ItemResult",
    "ItemStatus",
    "ProcessOptions",
    "Request",
    "RequestStatus",
    "Row",
    "Webhook",
    "check_item",
    "check_request",
    "item_id",
    "item_rows",
    "new_id",
    "now",
]


def now() -> float:
    """Return the current time as seconds since the epoch (UTC)."""
    return time.time()


def new_id() -> str:
    """Return a fresh request id: a random UUID4 in canonical form."""
    return str(uuid.uuid4())


class RequestStatus(enum.StrEnum):
    """Where a request is in its life; the values are the API's strings."""

    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"

    @property
    def finished(self) -> bool:
        """Whether the request reached a terminal state."""
        return self in (RequestStatus.COMPLETED, RequestStatus.FAILED)


class ItemStatus(enum.StrEnum):
    """Where one image is in its life."""

    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    DONE = "DONE"
    FAILED = "FAILED"

    @property
    def finished(self) -> bool:
        """Whether the item reached a terminal state."""
        return self in (ItemStatus.DONE, ItemStatus.FAILED)


REQUEST_TRANSITIONS: Mapping[RequestStatus, frozenset[RequestStatus]] = {
    RequestStatus.PENDING: frozenset({RequestStatus.PROCESSING, RequestStatus.FAILED}),
    RequestStatus.PROCESSING: frozenset({RequestStatus.COMPLETED, RequestStatus.FAILED}),
    RequestStatus.COMPLETED: frozenset(),
    RequestStatus.FAILED: frozenset(),
}
"""Legal request moves: current status -> statuses it may move to."""

ITEM_TRANSITIONS: Mapping[ItemStatus, frozenset[ItemStatus]] = {
    ItemStatus.PENDING: frozenset({ItemStatus.PROCESSING, ItemStatus.FAILED}),
    ItemStatus.PROCESSING: frozenset(
        {ItemStatus.DONE, ItemStatus.FAILED, ItemStatus.PENDING}
    ),
    ItemStatus.DONE: frozenset(),
    ItemStatus.FAILED: frozenset(),
}
"""Legal item moves: current status -> statuses it may move to."""


def check_request(current: RequestStatus, target: RequestStatus) -> None:
    """Raise `TransitionError` unless a request may move *current* -> *target*."""
    if target not in REQUEST_TRANSITIONS[current]:
        raise TransitionError(f"request cannot move from {current.value} to {target.value}")


def check_item(current: ItemStatus, target: ItemStatus) -> None:
    """Raise `TransitionError` unless an item may move *current* -> *target*."""
    if target not in ITEM_TRANSITIONS[current]:
        raise TransitionError(f"item cannot move from {current.value} to {target.value}")


def _upper(value: str) -> str:
    return value.upper()


def _positive_quality(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 1 <= value <= 100:
        raise ValueError(f"quality must be between 1 and 100, not {value}")


@attrs.frozen
class ProcessOptions:
    """How the images of a request are compressed.

    ``quality`` 50 is the product's "compress by 50%"; ``format`` is the
    output format (``JPEG``, ``WEBP`` or ``AVIF`` where Pillow has it);
    ``max_dimension`` caps the longer side in pixels (``None``: keep size).
    """

    quality: int = attrs.field(default=50, validator=_positive_quality)
    format: str = attrs.field(default="JPEG", converter=_upper)
    max_dimension: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProcessOptions:
        """Build from `to_dict` output (unknown keys ignored)."""
        names = {a.name for a in attrs.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@attrs.frozen
class Row:
    """One product row of the CSV as uploaded.

    ``index`` is its 0-based order among data rows, ``line`` its row number
    in the file (header = 1), ``cells`` every cell exactly as read, and
    ``urls`` the image URLs parsed from the URL cell, in order.
    """

    index: int
    line: int
    cells: tuple[str, ...]
    urls: tuple[str, ...]


@attrs.frozen
class Request:
    """One uploaded CSV and its progress."""

    id: str
    status: RequestStatus = RequestStatus.PENDING
    created_at: float = attrs.field(factory=now)
    updated_at: float = attrs.field(factory=now)
    total: int = 0
    done: int = 0
    failed: int = 0
    header: tuple[str, ...] = ()
    url_column: int = 2
    callback_url: str | None = None
    options: ProcessOptions = attrs.field(factory=ProcessOptions)
    owner: str | None = None
    filename: str | None = None

    @property
    def finished_items(self) -> int:
        """How many items reached a terminal state."""
        return self.done + self.failed

    def with_status(self, status: RequestStatus, *, at: float | None = None) -> Request:
        """Return a copy moved to *status*, checking the transition."""
        check_request(self.status, status)
        return attrs.evolve(self, status=status, updated_at=now() if at is None else at)


@attrs.frozen
class Item:
    """One image URL of one row, and what became of it."""

    id: str
    request_id: str
    row: int
    position: int
    url: str
    status: ItemStatus = ItemStatus.PENDING
    attempts: int = 0
    output_key: str | None = None
    content_type: str | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    width: int | None = None
    height: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    lease_until: float | None = None
    updated_at: float = attrs.field(factory=now)

    def with_status(self, status: ItemStatus, **changes: Any) -> Item:
        """Return a copy moved to *status* (checked) with other *changes*."""
        check_item(self.status, status)
        changes.setdefault("updated_at", now())
        return attrs.evolve(self, status=status, **changes)

    @property
    def result(self) -> ItemResult:
        """The outcome recorded on this item (meaningful once it is finished)."""
        return ItemResult(
            output_key=self.output_key,
            content_type=self.content_type,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            width=self.width,
            height=self.height,
            error_code=self.error_code,
            error_message=self.error_message,
        )


def item_id(request_id: str, seq: int) -> str:
    """Return the id of item number *seq* (0-based) of a request."""
    return f"{request_id}.{seq}"


class ItemIds(Sequence[str]):
    """The ids of items ``0 .. total - 1`` of a request, made on demand.

    What `csvimg.engine.Engine.submit` hands to `Queue.enqueue`: a
    sequence of `item_id` strings that costs two attributes however many
    items the request has (300,000 ids as a list take ~30 MB). Indexing,
    slicing (a list), iteration and ``len`` work as on a list of the ids.
    A queue may also read ``request_id`` and ``total`` to enqueue the whole
    range at once (the SQLite queue does, in one statement).
    """

    __slots__ = ("request_id", "total")

    def __init__(self, request_id: str, total: int) -> None:
        if total < 0:
            raise ValueError(f"total must not be negative, not {total}")
        self.request_id = request_id
        self.total = total

    def __len__(self) -> int:
        return self.total

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return list(map(f"{self.request_id}.".__add__,
                            map(str, range(self.total)[index])))
        return item_id(self.request_id, range(self.total)[index])

    def __iter__(self) -> Iterator[str]:
        return map(f"{self.request_id}.".__add__, map(str, range(self.total)))

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        rid, dot, seq = value.rpartition(".")
        return (dot == "." and rid == self.request_id and seq.isdigit()
                and seq == str(int(seq)) and int(seq) < self.total)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ItemIds):
            return (self.request_id, self.total) == (other.request_id, other.total)
        if isinstance(other, Sequence) and not isinstance(other, str):
            if len(other) != self.total:
                return False
            return all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which have none

    def __repr__(self) -> str:
        return f"ItemIds({self.request_id!r}, {self.total})"


def item_rows(rows: Iterable[Row], *, start: int = 0) -> Iterator[tuple[int, int, int, str]]:
    """Yield ``(seq, row, position, url)`` for every URL of *rows*, in order.

    The items a storage derives from a request's rows in `create_request`:
    item number ``seq`` (counted from 0 over all rows, in row then position
    order) has the id ``item_id(request_id, seq)``. Plain tuples, so that
    a storage can insert 300,000 items without building an `Item` each.
    *start* is the ``seq`` of the first URL, for rows taken in chunks.
    """
    seq = start
    for row in rows:
        index = row.index
        for position, url in enumerate(row.urls):
            yield seq, index, position, url
            seq += 1


@attrs.frozen
class ItemResult:
    """The outcome of processing one item, recorded by `csvimg.ledger.FinishItems`.

    Success when ``error_code`` is None (then ``output_key`` is set).
    """

    output_key: str | None = None
    content_type: str | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    width: int | None = None
    height: int | None = None
    error_code: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the item succeeded."""
        return self.error_code is None

    @classmethod
    def failure(cls, code: str, message: str, *, bytes_in: int | None = None) -> ItemResult:
        """Build a failed result."""
        return cls(error_code=code, error_message=message, bytes_in=bytes_in)


@attrs.frozen
class Event:
    """A durable outbox event (``request.completed`` / ``request.failed``).

    ``id`` is the Standard Webhooks ``webhook-id``: the same on every retry,
    so receivers can deduplicate.
    """

    id: str
    type: str
    request_id: str
    created_at: float
    owner: str | None = None
    callback_url: str | None = None
    attempts: int = 0
    next_attempt_at: float | None = None
    lease_until: float | None = None


@attrs.frozen
class Webhook:
    """A registered webhook receiver and its signing secret."""

    id: str
    url: str
    secret: str
    created_at: float = attrs.field(factory=now)
    owner: str | None = None
    active: bool = True


@attrs.frozen
class Delivery:
    """One attempt to deliver an event to one receiver."""

    event_id: str
    url: str
    attempt: int
    at: float
    status_code: int | None = None
    error: str | None = None
    webhook_id: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the receiver acknowledged with a 2xx."""
        return self.status_code is not None and 200 <= self.status_code < 300
