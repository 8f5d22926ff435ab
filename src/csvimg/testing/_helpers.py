"""What every contract suite shares: sample data, event claiming, the AnyIO base classes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, TypeVar

import pytest

from csvimg import ledger
from csvimg.backends import Storage
from csvimg.jobs import (
    Event,
    Item,
    ItemResult,
    ProcessOptions,
    Request,
    Row,
    item_id,
    new_id,
    now,
)

T = TypeVar("T")

FAR_FUTURE = 4_102_444_800.0
"""2100-01-01 in epoch seconds: a *now* at which every event is due."""

_CELLS = ("Café ☕", "", 'say "hi", twice', "line\nbreak", "=1+2", "  spaced  ")


def sample_request(
    rows: int = 3,
    urls_per_row: int = 2,
    *,
    request_id: str | None = None,
    owner: str | None = None,
    created_at: float | None = None,
    callback_url: str | None = "https://hooks.example/csvimg",
) -> tuple[Request, list[Row], list[Item]]:
    """Build a request with *rows* rows of *urls_per_row* image URLs each.

    Cells hold the awkward things real CSVs hold (non-ASCII, quotes, commas,
    newlines, formula prefixes), so a round trip proves the encoding. The
    items are the ones a storage must derive from the rows in
    ``create_request(request, rows)``: (row, position) order, ids from
    `csvimg.jobs.item_id`, PENDING, ``updated_at`` the request's
    ``created_at``.
    """
    rid = request_id or new_id()
    at = now() if created_at is None else created_at
    row_list: list[Row] = []
    items: list[Item] = []
    for index in range(rows):
        urls = tuple(f"https://img.example/{rid[:8]}/{index}/{p}.jpg" for p in range(urls_per_row))
        row_list.append(
            Row(
                index=index,
                line=index + 2,
                cells=(str(index + 1), _CELLS[index % len(_CELLS)], ",".join(urls)),
                urls=urls,
            )
        )
        for position, url in enumerate(urls):
            items.append(
                Item(
                    id=item_id(rid, len(items)),
                    request_id=rid,
                    row=index,
                    position=position,
                    url=url,
                    updated_at=at,
                )
            )
    request = Request(
        id=rid,
        created_at=at,
        updated_at=at,
        total=len(items),
        header=("S. No.", "Product Name", "Input Image Urls"),
        url_column=2,
        callback_url=callback_url,
        options=ProcessOptions(quality=70, format="WEBP", max_dimension=1024),
        owner=owner,
        filename="products.csv",
    )
    return request, row_list, items


# The ledger's operations as plain calls: what tests and contract suites
# write instead of building each operation by hand.


async def start_items(
    storage: Storage,
    item_ids: Sequence[str],
    *,
    lease_seconds: float,
    max_attempts: int | None = None,
) -> list[Item]:
    """Apply `csvimg.ledger.StartItems` now; return the items that started."""
    op = ledger.StartItems(tuple(item_ids), at=now(), lease_seconds=lease_seconds,
                           max_attempts=max_attempts)
    return list((await storage.apply(op)).started)


async def start_item(storage: Storage, item_id: str, *, lease_seconds: float) -> Item | None:
    """`start_items` for one id: the item, or None when it did not start."""
    started = await start_items(storage, [item_id], lease_seconds=lease_seconds)
    return started[0] if started else None


async def extend_leases(
    storage: Storage, item_ids: Sequence[str], *, lease_seconds: float
) -> list[str]:
    """Apply `csvimg.ledger.ExtendLeases` now; return the ids extended."""
    op = ledger.ExtendLeases(tuple(item_ids), at=now(), lease_seconds=lease_seconds)
    return list((await storage.apply(op)).ids)


async def extend_lease(storage: Storage, item_id: str, *, lease_seconds: float) -> bool:
    """`extend_leases` for one id: whether it was extended."""
    return bool(await extend_leases(storage, [item_id], lease_seconds=lease_seconds))


async def finish_items(
    storage: Storage, results: Sequence[tuple[str, ItemResult]]
) -> list[Request]:
    """Apply `csvimg.ledger.FinishItems` now; return the requests it finished."""
    return list((await storage.apply(ledger.FinishItems(tuple(results), at=now()))).finished)


async def finish_item(storage: Storage, item_id: str, result: ItemResult) -> Request | None:
    """`finish_items` for one item: the request, when this call finished it."""
    finished = await finish_items(storage, [(item_id, result)])
    return finished[0] if finished else None


async def stale_items(
    storage: Storage, *, now: float, pending_before: float, limit: int
) -> list[str]:
    """Apply `csvimg.ledger.Sweep`; return the ids to enqueue again."""
    op = ledger.Sweep(now=now, pending_before=pending_before, limit=limit)
    return list((await storage.apply(op)).ids)


async def claim_events(
    storage: Storage, *, now: float, limit: int, lease_seconds: float
) -> list[Event]:
    """Apply `csvimg.ledger.LeaseEvents`; return the leased events, oldest first."""
    op = ledger.LeaseEvents(now=now, limit=limit, lease_seconds=lease_seconds)
    return list((await storage.apply(op)).events)


async def reschedule_event(
    storage: Storage, event_id: str, *, next_attempt_at: float | None
) -> None:
    """Apply `csvimg.ledger.RescheduleEvent` (`NotFoundError` for an unknown id)."""
    await storage.apply(ledger.RescheduleEvent(event_id, next_attempt_at))


async def claimable_events(storage: Storage, request_id: str | None = None) -> list[Event]:
    """Claim every undelivered event (of *request_id* when given), oldest first.

    Claims at `FAR_FUTURE` with a zero lease, so a later call sees the same
    events again; but a claimer using the real clock will not see them
    until then. For tests only.
    """
    events = await claim_events(storage, now=FAR_FUTURE, limit=100_000, lease_seconds=0.0)
    return [e for e in events if request_id is None or e.request_id == request_id]


def _ok(seq: int) -> ItemResult:
    return ItemResult(
        output_key=f"out/{seq}.jpg",
        content_type="image/jpeg",
        bytes_in=2000 + seq,
        bytes_out=1000 + seq,
        width=640,
        height=480,
    )


def _failure(seq: int) -> ItemResult:
    return ItemResult.failure("not-an-image", f"item {seq} is not an image", bytes_in=12)


async def _collect(
    page: Callable[[int, int], Awaitable[Sequence[T]]], size: int
) -> tuple[list[T], int]:
    """Read every page of *size*; return everything and the number of calls."""
    out: list[T] = []
    calls = 0
    while True:
        chunk = await page(len(out), size)
        calls += 1
        assert len(chunk) <= size
        out.extend(chunk)
        if len(chunk) < size:
            return out, calls


class _AnyioContract:
    """Runs every test method of a subclass on AnyIO (asyncio by default)."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.anyio]

    @pytest.fixture
    def anyio_backend(self) -> str:
        """Run on asyncio; override to add ``trio``."""
        return "asyncio"


class _StorageCase(_AnyioContract):
    """The knobs and the request factory every part of `StorageContract` uses."""

    short_lease: ClassVar[float] = 0.05
    """A lease that ends during a test (seconds); tests sleep twice as long."""

    concurrent_finishers: ClassVar[int] = 3
    """How many tasks race to finish each item in the exactly-once test."""

    keeps_data: ClassVar[bool] = True
    """Whether what was stored outlives the backend object; False only for a
    backend that keeps nothing by design (``memory://``), which skips the
    reopening test."""

    async def reopened(self, storage: Storage) -> Storage:
        """Return a new, opened backend object on the data *storage* (closed) kept.

        A backend that keeps data overrides this (a file: open the same path;
        a server: connect with the same URL), so the suite checks that what
        was written is really stored, not only held in the object's memory.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must override reopened() to build a second "
            f"{type(storage).__name__} on the same data, or set keeps_data = False "
            "for a backend that keeps nothing by design"
        )

    @staticmethod
    async def create(storage: Storage, *args: Any, **kwargs: Any) -> tuple[
        Request, list[Row], list[Item]
    ]:
        """Build a `sample_request` and store it (the storage derives the items)."""
        request, rows, items = sample_request(*args, **kwargs)
        await storage.create_request(request, rows)
        return request, rows, items
