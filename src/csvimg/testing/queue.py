"""`QueueContract`: the executable contract of a `Queue`."""

from __future__ import annotations

from typing import ClassVar

import anyio

from csvimg.backends import Claim, Queue
from csvimg.jobs import (
    ItemIds,
    item_id,
    new_id,
)
from csvimg.testing._helpers import (
    _AnyioContract,
)


class QueueContract(_AnyioContract):
    """The `Queue` contract; a subclass provides the ``queue`` fixture.

    The fixture yields a fresh, empty, opened queue for each test.
    """

    lease: ClassVar[float] = 0.3
    """A lease that runs out during a test (seconds)."""

    async def test_ping(self, queue: Queue) -> None:
        """An opened queue answers."""
        await queue.ping()

    async def test_enqueue_claim_ack(self, queue: Queue) -> None:
        """Enqueued ids are claimed once each, then gone when acked."""
        await queue.enqueue(["a", "b", "c"])
        claims = await queue.claim(consumer="w1", max_items=10, lease_seconds=30, wait=0)
        assert sorted(c.item_id for c in claims) == ["a", "b", "c"]
        assert all(c.deliveries == 1 for c in claims)
        assert len({c.token for c in claims}) == 3
        assert await queue.claim(consumer="w1", max_items=10, lease_seconds=30, wait=0) == []
        for claim in claims:
            await queue.ack_many([claim])
        assert await queue.depth() == 0

    async def test_enqueue_item_ids(self, queue: Queue) -> None:
        """A lazy `ItemIds` range is enqueued as the list of its ids would be."""
        rid = new_id()
        await queue.enqueue(ItemIds(rid, 0))
        assert await queue.depth() == 0
        await queue.enqueue(ItemIds(rid, 12))
        assert await queue.depth() == 12
        claims = await queue.claim(consumer="w1", max_items=20, lease_seconds=30, wait=0)
        assert sorted(c.item_id for c in claims) == sorted(item_id(rid, n) for n in range(12))
        for claim in claims:
            await queue.ack_many([claim])
        assert await queue.depth() == 0

    async def test_max_items_and_duplicates(self, queue: Queue) -> None:
        """At most *max_items* per claim; an id enqueued twice comes twice."""
        await queue.enqueue(["a", "a", "b"])
        first = await queue.claim(consumer="w1", max_items=2, lease_seconds=30, wait=0)
        assert len(first) == 2
        rest = await queue.claim(consumer="w2", max_items=10, lease_seconds=30, wait=0)
        assert sorted(c.item_id for c in first + rest) == ["a", "a", "b"]
        await queue.enqueue([])
        assert await queue.depth() == 3

    async def test_claim_waits_then_returns_empty(self, queue: Queue) -> None:
        """An empty queue answers [] after about *wait* seconds."""
        start = anyio.current_time()
        assert await queue.claim(consumer="w1", max_items=5, lease_seconds=30, wait=0.3) == []
        elapsed = anyio.current_time() - start
        assert 0.25 <= elapsed < 3
        start = anyio.current_time()
        assert await queue.claim(consumer="w1", max_items=5, lease_seconds=30, wait=0) == []
        assert anyio.current_time() - start < 1

    async def test_claim_returns_when_an_id_arrives(self, queue: Queue) -> None:
        """A waiting claim returns soon after an enqueue, long before *wait*."""
        got: list[Claim] = []

        async def consume() -> None:
            got.extend(
                await queue.claim(consumer="w1", max_items=5, lease_seconds=30, wait=10)
            )

        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.sleep(0.1)
            await queue.enqueue(["late"])
        assert [c.item_id for c in got] == ["late"]
        assert anyio.current_time() - start < 3

    async def test_expired_lease_is_redelivered(self, queue: Queue) -> None:
        """Not acked in time: handed out again, deliveries counted, new token."""
        await queue.enqueue(["a"])
        [first] = await queue.claim(consumer="w1", max_items=1, lease_seconds=self.lease, wait=0)
        assert first.deliveries == 1
        assert await queue.claim(consumer="w2", max_items=1, lease_seconds=30, wait=0) == []
        await anyio.sleep(self.lease * 1.5)
        [second] = await queue.claim(
            consumer="w2", max_items=1, lease_seconds=30, wait=self.lease * 5
        )
        assert second.item_id == "a"
        assert second.deliveries == 2
        assert second.token != first.token
        await queue.ack_many([first])  # the stale claim no longer holds the id
        assert await queue.depth() == 1
        await queue.ack_many([second])
        assert await queue.depth() == 0

    async def test_release(self, queue: Queue) -> None:
        """A released id comes back at once, or after its delay."""
        await queue.enqueue(["a"])
        [first] = await queue.claim(consumer="w1", max_items=1, lease_seconds=30, wait=0)
        await queue.release_many([first])
        [second] = await queue.claim(consumer="w1", max_items=1, lease_seconds=30, wait=0)
        assert (second.item_id, second.deliveries) == ("a", 2)
        await queue.release_many([second], delay=0.3)
        assert await queue.claim(consumer="w1", max_items=1, lease_seconds=30, wait=0) == []
        start = anyio.current_time()
        [third] = await queue.claim(consumer="w1", max_items=1, lease_seconds=30, wait=3)
        assert anyio.current_time() - start >= 0.15
        assert (third.item_id, third.deliveries) == ("a", 3)
        assert await queue.depth() == 1

    async def test_extend(self, queue: Queue) -> None:
        """An extended lease outlives its first deadline."""
        await queue.enqueue(["a"])
        [claim] = await queue.claim(consumer="w1", max_items=1, lease_seconds=self.lease, wait=0)
        await queue.extend_many([claim], lease_seconds=30)
        await anyio.sleep(self.lease * 1.5)
        assert await queue.claim(consumer="w2", max_items=1, lease_seconds=30, wait=0) == []
        await queue.ack_many([claim])
        assert await queue.depth() == 0

    async def test_ack_many(self, queue: Queue) -> None:
        """Every held claim is acked at once; claims no longer held change nothing."""
        await queue.enqueue(["a", "b", "c"])
        await queue.ack_many([])
        first = await queue.claim(consumer="w1", max_items=2, lease_seconds=self.lease, wait=0)
        assert len(first) == 2
        await anyio.sleep(self.lease * 1.5)
        # The leases ran out: another consumer holds those ids now.
        second = await queue.claim(
            consumer="w2", max_items=3, lease_seconds=30, wait=self.lease * 5
        )
        assert sorted(c.item_id for c in second) == ["a", "b", "c"]
        await queue.ack_many(first)  # stale claims: ignored
        assert await queue.depth() == 3
        await queue.ack_many(second)
        assert await queue.depth() == 0

    async def test_extend_many(self, queue: Queue) -> None:
        """Every extended claim outlives its first deadline; the others come back."""
        await queue.enqueue(["a", "b", "c"])
        claims = await queue.claim(consumer="w1", max_items=3, lease_seconds=self.lease, wait=0)
        assert len(claims) == 3
        await queue.extend_many([], lease_seconds=30)
        await queue.extend_many(claims[:2], lease_seconds=30)
        await anyio.sleep(self.lease * 1.5)
        back = await queue.claim(consumer="w2", max_items=3, lease_seconds=30, wait=self.lease * 5)
        assert [c.item_id for c in back] == [claims[2].item_id]
        await queue.ack_many([*claims[:2], *back])
        assert await queue.depth() == 0

    async def test_depth(self, queue: Queue) -> None:
        """Depth counts waiting and leased ids; ack removes them."""
        assert await queue.depth() == 0
        await queue.enqueue([f"i{n}" for n in range(5)])
        assert await queue.depth() == 5
        claims = await queue.claim(consumer="w1", max_items=2, lease_seconds=30, wait=0)
        assert await queue.depth() == 5
        for claim in claims:
            await queue.ack_many([claim])
        assert await queue.depth() == 3

    async def test_at_least_once_with_concurrent_consumers(self, queue: Queue) -> None:
        """Consumers race and some die mid-item: still every id gets acked."""
        ids = [f"item-{n}" for n in range(120)]
        acked: set[str] = set()
        deliveries: dict[str, int] = {}
        done = anyio.Event()

        async def consume(name: str) -> None:
            while not done.is_set():
                claims = await queue.claim(
                    consumer=name, max_items=7, lease_seconds=self.lease, wait=0.1
                )
                for claim in claims:
                    deliveries[claim.item_id] = max(
                        deliveries.get(claim.item_id, 0), claim.deliveries
                    )
                    if claim.deliveries == 1 and claim.item_id.endswith("3"):
                        continue  # this consumer "dies": no ack, the lease runs out
                    await queue.ack_many([claim])
                    acked.add(claim.item_id)
                if acked == set(ids):
                    done.set()

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for n in range(4):
                    tg.start_soon(consume, f"w{n}")
                for start in range(0, len(ids), 40):
                    await queue.enqueue(ids[start : start + 40])
                    await anyio.sleep(0.02)
        assert acked == set(ids)
        assert all(deliveries[i] >= 2 for i in ids if i.endswith("3"))
        assert await queue.depth() == 0
