"""Storage contract, part 2: leasing items (start, extend, retry, stale items)."""

from __future__ import annotations

import anyio

from csvimg.backends import Storage
from csvimg.jobs import (
    ItemStatus,
    RequestStatus,
    item_id,
    new_id,
    now,
)
from csvimg.testing._helpers import (
    _ok,
    _StorageCase,
    extend_lease,
    finish_item,
    stale_items,
    start_item,
)


class _LeaseTests(_StorageCase):
    """Leasing items (start, extend, stale items)."""

    # -- leasing -------------------------------------------------------------

    async def test_start_item(self, storage: Storage) -> None:
        """PENDING -> PROCESSING, attempts + 1, leased; the request starts too."""
        request, _, items = await self.create(storage, rows=1, urls_per_row=2)
        before = now()
        got = await start_item(storage, items[0].id, lease_seconds=30)
        after = now()
        assert got is not None
        assert got.id == items[0].id
        assert got.status is ItemStatus.PROCESSING
        assert got.attempts == 1
        assert got.lease_until is not None
        assert before + 30 - 0.01 <= got.lease_until <= after + 30 + 0.01
        assert await storage.get_item(got.id) == got
        stored = await storage.get_request(request.id)
        assert stored is not None
        assert stored.status is RequestStatus.PROCESSING
        other = await storage.get_item(items[1].id)
        assert other == items[1]

    async def test_start_item_refuses(self, storage: Storage) -> None:
        """None for unknown, live-leased and finished items; nothing changes."""
        _, _, items = await self.create(storage, rows=1, urls_per_row=1)
        assert await start_item(storage, item_id(new_id(), 0), lease_seconds=30) is None
        first = await start_item(storage, items[0].id, lease_seconds=30)
        assert first is not None
        assert await start_item(storage, items[0].id, lease_seconds=30) is None
        assert await storage.get_item(items[0].id) == first
        await finish_item(storage, items[0].id, _ok(0))
        assert await start_item(storage, items[0].id, lease_seconds=30) is None
        finished = await storage.get_item(items[0].id)
        assert finished is not None
        assert finished.status is ItemStatus.DONE
        assert finished.attempts == 1

    async def test_expired_lease_is_taken_over(self, storage: Storage) -> None:
        """A PROCESSING item whose lease ended is leased again (its worker died)."""
        _, _, items = await self.create(storage, rows=1, urls_per_row=1)
        assert await start_item(storage, items[0].id, lease_seconds=self.short_lease)
        await anyio.sleep(self.short_lease * 2)
        again = await start_item(storage, items[0].id, lease_seconds=30)
        assert again is not None
        assert again.status is ItemStatus.PROCESSING
        assert again.attempts == 2
        assert again.lease_until is not None
        assert again.lease_until > now() + 20

    async def test_extend_lease(self, storage: Storage) -> None:
        """Only a PROCESSING item's lease can be extended, and it then holds."""
        _, _, items = await self.create(storage, rows=1, urls_per_row=2)
        a, b = items[0].id, items[1].id
        assert await start_item(storage, a, lease_seconds=self.short_lease)
        assert await extend_lease(storage, a, lease_seconds=30) is True
        await anyio.sleep(self.short_lease * 2)
        assert await start_item(storage, a, lease_seconds=30) is None
        stored = await storage.get_item(a)
        assert stored is not None
        assert stored.lease_until is not None
        assert stored.lease_until > now() + 20
        assert await extend_lease(storage, b, lease_seconds=30) is False
        assert await extend_lease(storage, item_id(new_id(), 0), lease_seconds=30) is False
        await finish_item(storage, a, _ok(0))
        assert await extend_lease(storage, a, lease_seconds=30) is False

    async def test_stale_items_takes_back_ended_leases(self, storage: Storage) -> None:
        """PROCESSING items whose lease ended go back to PENDING, once."""
        _, _, items = await self.create(storage, rows=1, urls_per_row=3)
        leased, live, done = (i.id for i in items)
        assert await start_item(storage, leased, lease_seconds=30)
        assert await start_item(storage, live, lease_seconds=7200)
        assert await start_item(storage, done, lease_seconds=30)
        await finish_item(storage, done, _ok(2))
        t = now()
        assert await stale_items(storage, now=t, pending_before=0, limit=10) == []
        later = t + 3600
        assert await stale_items(storage, now=later, pending_before=0, limit=10) == [leased]
        back = await storage.get_item(leased)
        assert back is not None
        assert (back.status, back.lease_until, back.attempts) == (ItemStatus.PENDING, None, 1)
        assert back.updated_at == later
        assert await stale_items(storage, now=later, pending_before=0, limit=10) == []
        assert await start_item(storage, leased, lease_seconds=30) is not None
        finished = await storage.get_item(done)
        assert finished is not None
        assert finished.status is ItemStatus.DONE

    async def test_stale_items_keeps_to_its_limit(self, storage: Storage) -> None:
        """A sweep returns at most *limit* ended leases; the next sweep takes the rest."""
        _, _, items = await self.create(storage, rows=1, urls_per_row=3)
        ids = [i.id for i in items]
        for one in ids:
            assert await start_item(storage, one, lease_seconds=30)
        later = now() + 3600
        first = await stale_items(storage, now=later, pending_before=0, limit=2)
        assert len(first) == 2
        assert set(first) < set(ids)
        rest = await stale_items(storage, now=later, pending_before=0, limit=10)
        assert sorted(first + rest) == sorted(ids)

    async def test_stale_items_touches_forgotten_pending_items(self, storage: Storage) -> None:
        """PENDING items untouched since *pending_before*, once per window, *limit* at most."""
        _, _, items = await self.create(storage, rows=1, urls_per_row=3)
        ids = [i.id for i in items]
        t = now() + 1
        assert await stale_items(storage, now=t, pending_before=t - 3600, limit=10) == []
        first = await stale_items(storage, now=t, pending_before=t, limit=2)
        assert len(first) == 2
        assert set(first) < set(ids)
        touched = await storage.get_item(first[0])
        assert touched is not None
        assert (touched.status, touched.updated_at) == (ItemStatus.PENDING, t)
        rest = await stale_items(storage, now=t, pending_before=t, limit=10)
        assert sorted(first + rest) == sorted(ids)
        assert await stale_items(storage, now=t, pending_before=t, limit=10) == []
        again = await stale_items(storage, now=t + 60, pending_before=t + 30, limit=10)
        assert sorted(again) == sorted(ids)
