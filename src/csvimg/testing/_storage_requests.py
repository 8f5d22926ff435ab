"""Storage contract, part 1: requests, rows and items round trip."""

from __future__ import annotations

import pytest

from csvimg._errors import StorageError
from csvimg.backends import Storage
from csvimg.jobs import (
    ItemStatus,
    item_id,
    new_id,
    now,
)
from csvimg.testing._helpers import (
    _collect,
    _ok,
    _StorageCase,
    finish_item,
    sample_request,
    start_item,
)


class _RequestTests(_StorageCase):
    """Requests, rows and items round trip."""

    # -- requests, rows, items ---------------------------------------------

    async def test_ping(self, storage: Storage) -> None:
        """An opened backend answers."""
        await storage.ping()

    async def test_create_and_get_request(self, storage: Storage) -> None:
        """Every field of a request survives the round trip."""
        request, _, _ = await self.create(storage, owner="alice")
        assert await storage.get_request(request.id) == request

    async def test_unknown_ids(self, storage: Storage) -> None:
        """Unknown requests and items are None; their lists are empty."""
        assert await storage.get_request(new_id()) is None
        assert await storage.get_item(item_id(new_id(), 0)) is None
        assert await storage.list_rows(new_id()) == []
        assert await storage.list_items(new_id()) == []
        assert await storage.list_deliveries(new_id()) == []

    async def test_rows_round_trip_in_order_with_pagination(self, storage: Storage) -> None:
        """Rows come back in upload order, page by page, cells intact."""
        request, rows, _ = await self.create(storage, rows=11, urls_per_row=1)
        assert await storage.list_rows(request.id) == rows
        for size in (1, 4, 11):
            got, _ = await _collect(
                lambda offset, limit: storage.list_rows(request.id, offset=offset, limit=limit),
                size,
            )
            assert got == rows
        assert await storage.list_rows(request.id, offset=11) == []
        assert await storage.list_rows(request.id, offset=3, limit=2) == rows[3:5]

    async def test_items_round_trip_in_order_with_pagination(self, storage: Storage) -> None:
        """Items come back in (row, position) order, page by page, fields intact."""
        request, _, items = await self.create(storage, rows=5, urls_per_row=3)
        assert await storage.list_items(request.id) == items
        for size in (1, 4, 15):
            got, _ = await _collect(
                lambda offset, limit: storage.list_items(request.id, offset=offset, limit=limit),
                size,
            )
            assert got == items
        assert await storage.list_items(request.id, offset=15) == []
        assert await storage.list_items(request.id, offset=4, limit=3) == items[4:7]
        for item in items:
            assert await storage.get_item(item.id) == item

    async def test_requests_are_separate(self, storage: Storage) -> None:
        """Rows and items of one request never show up under another."""
        first, rows1, items1 = await self.create(storage, rows=2)
        second, rows2, items2 = await self.create(storage, rows=3)
        assert await storage.list_rows(first.id) == rows1
        assert await storage.list_rows(second.id) == rows2
        assert await storage.list_items(first.id) == items1
        assert await storage.list_items(second.id) == items2

    async def test_create_request_is_all_or_nothing(self, storage: Storage) -> None:
        """A duplicate request id raises `StorageError` and changes nothing."""
        request, rows, items = await self.create(storage, rows=2, urls_per_row=2)
        again, rows2, items2 = sample_request(
            rows=4, urls_per_row=2, request_id=request.id, owner="mallory"
        )
        with pytest.raises(StorageError):
            await storage.create_request(again, rows2)
        assert await storage.get_request(request.id) == request
        assert await storage.list_rows(request.id) == rows
        assert await storage.list_items(request.id) == items
        assert await storage.get_item(items2[-1].id) is None

    async def test_list_requests_newest_first_and_by_owner(self, storage: Storage) -> None:
        """Newest first, *limit* of them, optionally one owner's."""
        base = now() - 100
        made = []
        for n, owner in enumerate(("alice", "bob", "alice", None)):
            request, _, _ = await self.create(storage, rows=1, owner=owner, created_at=base + n)
            made.append(request)
        ids = [r.id for r in made]
        assert [r.id for r in await storage.list_requests()] == ids[::-1]
        assert [r.id for r in await storage.list_requests(limit=2)] == [ids[3], ids[2]]
        assert [r.id for r in await storage.list_requests(owner="alice")] == [ids[2], ids[0]]
        assert await storage.list_requests(owner="nobody") == []
        assert (await storage.list_requests(owner="bob"))[0] == made[1]

    async def test_data_survives_closing_and_reopening(self, storage: Storage) -> None:
        """Closed, then opened again as a new object: every request, row and item is there."""
        if not self.keeps_data:
            pytest.skip("keeps_data = False: this backend keeps nothing once closed")
        request, rows, items = await self.create(storage, rows=2, urls_per_row=2)
        assert await start_item(storage, items[0].id, lease_seconds=30)
        await finish_item(storage, items[0].id, _ok(0))
        expected = await storage.list_items(request.id)
        stored = await storage.get_request(request.id)
        await storage.close()
        other = await self.reopened(storage)
        try:
            assert await other.get_request(request.id) == stored
            assert await other.list_rows(request.id) == rows
            assert await other.list_items(request.id) == expected
            assert expected[0].status is ItemStatus.DONE
        finally:
            await other.close()
