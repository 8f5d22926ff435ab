"""Storage contract, part 5: webhooks, the outbox of events, delivery logs."""

from __future__ import annotations

import attrs
import pytest

from csvimg._errors import NotFoundError
from csvimg.backends import Storage
from csvimg.jobs import (
    Delivery,
    Request,
    Webhook,
    now,
)
from csvimg.testing._helpers import (
    FAR_FUTURE,
    _ok,
    _StorageCase,
    claim_events,
    finish_item,
    reschedule_event,
)


class _OutboxTests(_StorageCase):
    """Webhooks, the outbox of events, delivery logs."""

    # -- webhooks, outbox, deliveries ----------------------------------------

    async def test_webhooks(self, storage: Storage) -> None:
        """Add, list per owner oldest first, disable, delete only by owner."""
        base = now() - 100
        hooks = [
            Webhook(id=f"wh_{n}", url=f"https://hooks.example/{n}", secret=f"whsec_{n}",
                    created_at=base + n, owner=owner)
            for n, owner in enumerate((None, "alice", "alice", "bob"))
        ]
        for hook in reversed(hooks):
            await storage.add_webhook(hook)
        assert await storage.list_webhooks() == [hooks[0]]
        assert await storage.list_webhooks(owner="alice") == [hooks[1], hooks[2]]
        assert await storage.list_webhooks(owner="nobody") == []
        await storage.set_webhook_active("wh_1", False)
        assert await storage.list_webhooks(owner="alice") == [
            attrs.evolve(hooks[1], active=False), hooks[2],
        ]
        await storage.set_webhook_active("wh_1", True)
        assert (await storage.list_webhooks(owner="alice"))[0].active is True
        assert await storage.delete_webhook("wh_1", owner="bob") is False
        assert await storage.delete_webhook("wh_1") is False
        assert await storage.delete_webhook("wh_1", owner="alice") is True
        assert await storage.delete_webhook("wh_1", owner="alice") is False
        assert await storage.list_webhooks(owner="alice") == [hooks[2]]
        assert await storage.delete_webhook("wh_0") is True
        assert await storage.list_webhooks() == []

    async def _finished_request(self, storage: Storage) -> Request:
        _, _, items = await self.create(storage, rows=1, urls_per_row=1)
        finished = await finish_item(storage, items[0].id, _ok(0))
        assert finished is not None
        return finished

    async def test_claim_events_leases_and_reschedules(self, storage: Storage) -> None:
        """Due events are leased; rescheduling counts a round; None is delivered."""
        request = await self._finished_request(storage)
        t = now() + 1
        [event] = await claim_events(storage, now=t, limit=10, lease_seconds=30)
        assert event.request_id == request.id
        assert event.attempts == 0
        assert await claim_events(storage, now=t, limit=10, lease_seconds=30) == []
        assert await claim_events(storage, now=t + 29, limit=10, lease_seconds=30) == []
        [again] = await claim_events(storage, now=t + 31, limit=10, lease_seconds=30)
        assert again.id == event.id
        await reschedule_event(storage, event.id, next_attempt_at=t + 100)
        assert await claim_events(storage, now=t + 50, limit=10, lease_seconds=30) == []
        [third] = await claim_events(storage, now=t + 100, limit=10, lease_seconds=30)
        assert (third.id, third.attempts, third.next_attempt_at) == (event.id, 1, t + 100)
        await reschedule_event(storage, event.id, next_attempt_at=None)
        assert await claim_events(storage, now=FAR_FUTURE, limit=10, lease_seconds=30) == []

    async def test_claim_events_limit_and_order(self, storage: Storage) -> None:
        """At most *limit* per claim, oldest first; leased ones are skipped."""
        made = [await self._finished_request(storage) for _ in range(3)]
        t = now() + 1
        first = await claim_events(storage, now=t, limit=2, lease_seconds=30)
        second = await claim_events(storage, now=t, limit=2, lease_seconds=30)
        assert [e.request_id for e in first + second] == [r.id for r in made]
        assert len({e.id for e in first + second}) == 3

    async def test_events_not_yet_due_are_not_claimed(self, storage: Storage) -> None:
        """An event is claimed only once its next attempt is due."""
        await self._finished_request(storage)
        [event] = await claim_events(storage, now=now() + 1, limit=10, lease_seconds=0)
        assert event.next_attempt_at is not None
        await reschedule_event(storage, event.id, next_attempt_at=event.next_attempt_at + 600)
        assert await claim_events(storage, now=event.next_attempt_at + 599, limit=10,
                                          lease_seconds=0) == []

    async def test_reschedule_unknown_event(self, storage: Storage) -> None:
        """Rescheduling an event that does not exist raises `NotFoundError`."""
        with pytest.raises(NotFoundError):
            await reschedule_event(storage, "msg_nope", next_attempt_at=None)

    async def test_deliveries(self, storage: Storage) -> None:
        """Attempts are logged per request, oldest first."""
        request = await self._finished_request(storage)
        other = await self._finished_request(storage)
        t = now()
        log = [
            Delivery(event_id="msg_1", url="https://hooks.example/a", attempt=1, at=t,
                     error="connect timeout"),
            Delivery(event_id="msg_1", url="https://hooks.example/a", attempt=2, at=t + 5,
                     status_code=200, webhook_id="wh_1"),
        ]
        for delivery in log:
            await storage.add_delivery(request.id, delivery)
        await storage.add_delivery(other.id, attrs.evolve(log[0], event_id="msg_2"))
        assert await storage.list_deliveries(request.id) == log
        assert [d.event_id for d in await storage.list_deliveries(other.id)] == ["msg_2"]
