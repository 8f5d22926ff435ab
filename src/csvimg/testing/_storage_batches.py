"""Storage contract, part 4: the batch forms (start_items, extend_leases, finish_items)."""

from __future__ import annotations

import anyio

from csvimg.backends import Storage
from csvimg.jobs import (
    ItemResult,
    ItemStatus,
    Request,
    RequestStatus,
    item_id,
    new_id,
    now,
)
from csvimg.testing._helpers import (
    _failure,
    _ok,
    _StorageCase,
    claimable_events,
    extend_leases,
    finish_item,
    finish_items,
    start_item,
    start_items,
)


class _BatchTests(_StorageCase):
    """The batch forms (start_items, extend_leases, finish_items)."""

    async def test_start_items(self, storage: Storage) -> None:
        """Known PENDING ids start, in order; unknown, live-leased, finished and repeated don't."""
        request, _, items = await self.create(storage, rows=2, urls_per_row=3)
        ids = [i.id for i in items]
        assert await start_item(storage, ids[1], lease_seconds=30)
        await finish_item(storage, ids[2], _ok(2))
        unknown = item_id(new_id(), 0)
        assert await start_items(storage, [], lease_seconds=30) == []
        before = now()
        got = await start_items(storage,
            [ids[3], unknown, ids[0], ids[1], ids[2], ids[3], ids[5]], lease_seconds=30
        )
        after = now()
        assert [i.id for i in got] == [ids[3], ids[0], ids[5]]
        for item in got:
            assert item.status is ItemStatus.PROCESSING
            assert item.attempts == 1
            assert item.lease_until is not None
            assert before + 30 - 0.01 <= item.lease_until <= after + 30 + 0.01
            assert await storage.get_item(item.id) == item
        assert await storage.get_item(ids[4]) == items[4]
        leased = await storage.get_item(ids[1])
        assert leased is not None
        assert leased.attempts == 1
        stored = await storage.get_request(request.id)
        assert stored is not None
        assert stored.status is RequestStatus.PROCESSING

    async def test_start_items_takes_over_ended_leases_across_requests(
        self, storage: Storage
    ) -> None:
        """Items of several requests start together; ended leases are taken over."""
        first, _, items1 = await self.create(storage, rows=1, urls_per_row=1)
        second, _, items2 = await self.create(storage, rows=1, urls_per_row=1)
        assert await start_item(storage, items1[0].id, lease_seconds=self.short_lease)
        await anyio.sleep(self.short_lease * 2)
        got = await start_items(storage, [items1[0].id, items2[0].id], lease_seconds=30)
        assert [(i.id, i.attempts) for i in got] == [(items1[0].id, 2), (items2[0].id, 1)]
        for request in (first, second):
            stored = await storage.get_request(request.id)
            assert stored is not None
            assert stored.status is RequestStatus.PROCESSING

    async def test_extend_leases(self, storage: Storage) -> None:
        """Only PROCESSING items are extended (and reported); their leases then hold."""
        _, _, items = await self.create(storage, rows=1, urls_per_row=4)
        a, b, pending, done = (i.id for i in items)
        assert await start_items(storage, [a, b, done], lease_seconds=self.short_lease)
        await finish_item(storage, done, _ok(3))
        assert await extend_leases(storage, [], lease_seconds=30) == []
        unknown = item_id(new_id(), 0)
        got = await extend_leases(storage, [a, unknown, pending, done, b], lease_seconds=30)
        assert got == [a, b]
        await anyio.sleep(self.short_lease * 2)
        assert await start_items(storage, [a, b], lease_seconds=30) == []
        for held in (a, b):
            stored = await storage.get_item(held)
            assert stored is not None
            assert stored.lease_until is not None
            assert stored.lease_until > now() + 20
        untouched = await storage.get_item(pending)
        assert untouched == items[2]

    async def test_finish_items(self, storage: Storage) -> None:
        """One batch finishes the last item of one request and not the other's."""
        first, _, items1 = await self.create(storage, rows=1, urls_per_row=2)
        second, _, items2 = await self.create(storage, rows=1, urls_per_row=3)
        await start_items(storage, [i.id for i in items1 + items2], lease_seconds=30)
        assert await finish_items(storage, []) == []
        assert await finish_item(storage, items1[0].id, _failure(0)) is None
        unknown = item_id(new_id(), 0)
        got = await finish_items(storage,
            [
                (items2[0].id, _ok(10)),
                (unknown, _ok(11)),
                (items1[0].id, _ok(12)),  # finished already: ignored
                (items1[1].id, _ok(13)),  # the last of `first`
                (items2[1].id, _failure(14)),
                (items1[1].id, _failure(15)),  # twice in one batch: the first wins
            ]
        )
        assert len(got) == 1
        [finished] = got
        assert finished.id == first.id
        assert (finished.status, finished.done, finished.failed) == (RequestStatus.COMPLETED, 1, 1)
        assert await storage.get_request(first.id) == finished
        assert [e.type for e in await claimable_events(storage, first.id)] == [
            "request.completed"
        ]
        running = await storage.get_request(second.id)
        assert running is not None
        assert (running.status, running.done, running.failed) == (RequestStatus.PROCESSING, 1, 1)
        assert await claimable_events(storage, second.id) == []
        kept = await storage.get_item(items1[0].id)
        assert kept is not None
        assert (kept.status, kept.error_code) == (ItemStatus.FAILED, "not-an-image")
        last = await storage.get_item(items1[1].id)
        assert last is not None
        assert (last.status, last.output_key, last.lease_until) == (
            ItemStatus.DONE, _ok(13).output_key, None,
        )
        failed = await storage.get_item(items2[1].id)
        assert failed is not None
        assert failed.status is ItemStatus.FAILED
        assert await storage.get_item(unknown) is None
        # Finishing the rest returns `second` once; repeating the batch returns nothing.
        rest = [(items2[2].id, _failure(16)), (items2[0].id, _failure(17))]
        [done] = await finish_items(storage, rest)
        assert (done.id, done.status, done.done, done.failed) == (
            second.id, RequestStatus.COMPLETED, 1, 2,
        )
        assert await finish_items(storage, rest) == []
        assert len(await claimable_events(storage, second.id)) == 1

    async def test_finish_items_finishes_several_requests(self, storage: Storage) -> None:
        """A batch holding every item of two requests finishes both, one event each."""
        first, _, items1 = await self.create(storage, rows=1, urls_per_row=2)
        second, _, items2 = await self.create(storage, rows=1, urls_per_row=1)
        got = await finish_items(storage,
            [(items1[0].id, _failure(0)), (items2[0].id, _failure(1)), (items1[1].id, _ok(2))]
        )
        assert sorted((r.id, r.status) for r in got) == sorted(
            [(first.id, RequestStatus.COMPLETED), (second.id, RequestStatus.FAILED)]
        )
        assert [e.type for e in await claimable_events(storage, first.id)] == [
            "request.completed"
        ]
        assert [e.type for e in await claimable_events(storage, second.id)] == ["request.failed"]

    async def test_concurrent_finish_batches_complete_exactly_once(
        self, storage: Storage
    ) -> None:
        """Batches racing over the same items: exact counts, one winner and one event each."""
        requests = [await self.create(storage, rows=4, urls_per_row=3) for _ in range(2)]
        pairs = [
            (item.id, _failure(seq) if seq % 5 == 0 else _ok(seq))
            for _, _, items in requests
            for seq, item in enumerate(items)
        ]
        winners: list[Request] = []

        async def finish(batches: list[list[tuple[str, ItemResult]]]) -> None:
            for batch in batches:
                winners.extend(await finish_items(storage, batch))

        async with anyio.create_task_group() as tg:
            for n in range(self.concurrent_finishers):
                size = 2 + n * 3
                order = pairs if n % 2 == 0 else pairs[::-1]
                tg.start_soon(finish, [order[i : i + size] for i in range(0, len(order), size)])
        assert sorted(r.id for r in winners) == sorted(r.id for r, _, _ in requests)
        failed = sum(1 for seq in range(12) if seq % 5 == 0)
        for winner in winners:
            assert (winner.status, winner.done, winner.failed) == (
                RequestStatus.COMPLETED, 12 - failed, failed,
            )
            assert await storage.get_request(winner.id) == winner
            assert len(await claimable_events(storage, winner.id)) == 1
