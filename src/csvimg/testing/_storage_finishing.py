"""Storage contract, part 3: finishing items, counters, the request's outcome."""

from __future__ import annotations

import anyio

from csvimg.backends import Storage
from csvimg.jobs import (
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
    finish_item,
    start_item,
)


class _FinishTests(_StorageCase):
    """Finishing items, counters, the request's outcome."""

    # -- finishing -----------------------------------------------------------

    async def test_finish_item_records_outcome_and_counts(self, storage: Storage) -> None:
        """Results land on items, counters move, the last call gets the request."""
        request, _, items = await self.create(storage, rows=1, urls_per_row=3)
        for item in items:
            assert await start_item(storage, item.id, lease_seconds=30)
        assert await finish_item(storage, items[0].id, _ok(0)) is None
        done = await storage.get_item(items[0].id)
        assert done is not None
        assert done.status is ItemStatus.DONE
        assert done.lease_until is None
        result = _ok(0)
        assert (done.output_key, done.content_type, done.bytes_in, done.bytes_out) == (
            result.output_key, result.content_type, result.bytes_in, result.bytes_out,
        )
        assert (done.width, done.height, done.error_code) == (640, 480, None)
        stored = await storage.get_request(request.id)
        assert stored is not None
        assert (stored.status, stored.done, stored.failed) == (RequestStatus.PROCESSING, 1, 0)

        assert await finish_item(storage, items[1].id, _failure(1)) is None
        failed = await storage.get_item(items[1].id)
        assert failed is not None
        assert failed.status is ItemStatus.FAILED
        assert failed.error_code == "not-an-image"
        assert failed.error_message == "item 1 is not an image"
        assert failed.bytes_in == 12
        stored = await storage.get_request(request.id)
        assert stored is not None
        assert (stored.status, stored.done, stored.failed) == (RequestStatus.PROCESSING, 1, 1)

        finished = await finish_item(storage, items[2].id, _ok(2))
        assert finished is not None
        assert finished.id == request.id
        assert (finished.status, finished.done, finished.failed) == (RequestStatus.COMPLETED, 2, 1)
        assert await storage.get_request(request.id) == finished

    async def test_finish_item_is_idempotent(self, storage: Storage) -> None:
        """A second finish of an item changes nothing and returns None."""
        request, _, items = await self.create(storage, rows=1, urls_per_row=2)
        assert await finish_item(storage, items[0].id, _ok(0)) is None
        assert await finish_item(storage, items[0].id, _failure(0)) is None
        first = await storage.get_item(items[0].id)
        assert first is not None
        assert first.status is ItemStatus.DONE
        finished = await finish_item(storage, items[1].id, _ok(1))
        assert finished is not None
        assert (finished.done, finished.failed) == (2, 0)
        assert await finish_item(storage, items[1].id, _ok(1)) is None
        assert await finish_item(storage, item_id(new_id(), 0), _ok(0)) is None
        assert await storage.get_request(request.id) == finished
        assert len(await claimable_events(storage, request.id)) == 1

    async def test_finish_of_a_pending_item_counts(self, storage: Storage) -> None:
        """A result for an item whose lease was taken back is accepted, not redone."""
        request, _, items = await self.create(storage, rows=1, urls_per_row=2)
        assert await finish_item(storage, items[0].id, _ok(0)) is None
        stored = await storage.get_request(request.id)
        assert stored is not None
        assert stored.done == 1
        item = await storage.get_item(items[0].id)
        assert item is not None
        assert item.status is ItemStatus.DONE

    async def test_completed_when_any_item_done(self, storage: Storage) -> None:
        """Some done, some failed: COMPLETED and one ``request.completed`` event."""
        request, _, items = await self.create(storage, rows=2, urls_per_row=1, owner="alice")
        await finish_item(storage, items[0].id, _failure(0))
        finished = await finish_item(storage, items[1].id, _ok(1))
        assert finished is not None
        assert finished.status is RequestStatus.COMPLETED
        events = await claimable_events(storage)
        assert len(events) == 1
        event = events[0]
        assert event.type == "request.completed"
        assert event.request_id == request.id
        assert event.owner == "alice"
        assert event.callback_url == request.callback_url
        assert event.attempts == 0
        assert event.next_attempt_at is not None
        assert event.next_attempt_at <= now()
        assert event.id

    async def test_failed_when_every_item_failed(self, storage: Storage) -> None:
        """All failed: FAILED and one ``request.failed`` event."""
        request, _, items = await self.create(storage, rows=1, urls_per_row=2)
        await start_item(storage, items[0].id, lease_seconds=30)
        await finish_item(storage, items[0].id, _failure(0))
        finished = await finish_item(storage, items[1].id, _failure(1))
        assert finished is not None
        assert (finished.status, finished.done, finished.failed) == (RequestStatus.FAILED, 0, 2)
        events = await claimable_events(storage, request.id)
        assert [e.type for e in events] == ["request.failed"]

    async def test_concurrent_finishers_complete_exactly_once(self, storage: Storage) -> None:
        """Many tasks finish every item at once: exact counts, one winner, one event."""
        request, _, items = await self.create(storage, rows=8, urls_per_row=3)
        results: list[Request | None] = []

        async def finish(seq: int) -> None:
            outcome = _failure(seq) if seq % 4 == 0 else _ok(seq)
            results.append(await finish_item(storage, items[seq].id, outcome))

        async with anyio.create_task_group() as tg:
            for _ in range(self.concurrent_finishers):
                for seq in range(len(items)):
                    tg.start_soon(finish, seq)
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        failed = sum(1 for seq in range(len(items)) if seq % 4 == 0)
        assert (winners[0].done, winners[0].failed) == (len(items) - failed, failed)
        assert winners[0].status is RequestStatus.COMPLETED
        assert await storage.get_request(request.id) == winners[0]
        assert len(await claimable_events(storage, request.id)) == 1

    # -- batches ---------------------------------------------------------------
