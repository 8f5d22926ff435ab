"""`StorageMachine`: Hypothesis drives a storage through random item moves against a model."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

import anyio
import anyio.from_thread
import attrs
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from csvimg import ledger
from csvimg.backends import Storage
from csvimg.backends.memory import MemoryStorage
from csvimg.jobs import (
    ITEM_TRANSITIONS,
    REQUEST_TRANSITIONS,
    Item,
    ItemStatus,
    Request,
    RequestStatus,
    now,
)
from csvimg.testing._helpers import (
    FAR_FUTURE,
    T,
    _failure,
    _ok,
    claimable_events,
    sample_request,
)


@attrs.define
class _ModelItem:
    status: ItemStatus = ItemStatus.PENDING
    attempts: int = 0
    live_lease: bool = False


def _reachable(table: Any, current: Any, target: Any) -> bool:
    """Whether *target* is *current* or at most two legal moves away.

    One storage call may make two moves (a takeover is PROCESSING ->
    PENDING -> PROCESSING, finishing a never-started item is PENDING ->
    PROCESSING -> DONE), never more.
    """
    if target == current or target in table[current]:
        return True
    return any(target in table[middle] for middle in table[current])


def _essence(item: Item) -> tuple[object, ...]:
    return (
        item.id, item.status, item.attempts, item.lease_until, item.output_key,
        item.bytes_out, item.error_code,
    )


class StorageMachine(RuleBasedStateMachine):
    """Hypothesis drives one request's items through start/extend/finish/sweep.

    Two models check every step. The ledger itself (`csvimg.ledger`, run
    on a `MemoryStorage`) gets the same operations at the same times: its
    answers and its stored items must equal the backend's, so a backend
    with its own form of the rules (Redis's Lua) cannot drift from them.
    And a model of each item predicts every answer, and after every step the
    invariants compare the backend with it: counters equal the
    finished items and never exceed the total, the request finishes exactly
    when every item did (COMPLETED unless all failed), exactly one call saw
    it finish, exactly one event is claimable once it did, and every status
    change observed is allowed by `csvimg.jobs`' transition tables.

    `StorageContract.test_state_machine` subclasses it with ``storage`` set;
    the machine runs in a worker thread and calls the backend on the event
    loop through `anyio.from_thread`.
    """

    storage: ClassVar[Storage]
    long_lease: ClassVar[float] = 3600.0

    def __init__(self) -> None:
        super().__init__()
        self.request: Request | None = None
        self.items: list[Item] = []
        self.model: list[_ModelItem] = []
        self.seen_items: list[ItemStatus] = []
        self.seen_request = RequestStatus.PENDING
        self.started = False
        self.finishers = 0
        self.ledger = MemoryStorage()

    def both(self, op: ledger.Operation) -> ledger.Changes:
        """Apply *op* to the backend and to the ledger's model; check the answers agree."""
        got = self.call(self.storage.apply, op)
        want = self.call(self.ledger.apply, op)
        assert [(i.id, i.attempts, i.lease_until) for i in got.started] == [
            (i.id, i.attempts, i.lease_until) for i in want.started
        ], f"{type(op).__name__}: started differs from the ledger's"
        assert [r.id for r in got.finished] == [r.id for r in want.finished], (
            f"{type(op).__name__}: finished requests differ from the ledger's"
        )
        # The backend is shared by the examples; the model holds this one's only.
        mine = {item.id for item in self.items}
        assert sorted(set(got.ids) & mine) == sorted(want.ids), f"{type(op).__name__}: ids differ"
        return got

    def call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        """Run ``await fn(*args, **kwargs)`` on the test's event loop."""
        return anyio.from_thread.run(functools.partial(fn, *args, **kwargs))

    # Few items, so that random steps often hit the same item twice.
    @initialize(rows=st.integers(1, 3), per_row=st.integers(1, 2))
    def create(self, rows: int, per_row: int) -> None:
        """Create a fresh request of up to 6 items."""
        request, row_list, items = sample_request(rows, per_row)
        self.call(self.storage.create_request, request, row_list)
        self.call(self.ledger.create_request, request, row_list)
        self.request = request
        self.items = items
        self.model = [_ModelItem() for _ in items]
        self.seen_items = [ItemStatus.PENDING for _ in items]

    def _pick(self, index: int) -> tuple[Item, _ModelItem]:
        return self.items[index % len(self.items)], self.model[index % len(self.items)]

    @precondition(lambda self: self.request is not None)
    @rule(index=st.integers(0, 5), live=st.booleans())
    def start(self, index: int, live: bool) -> None:
        """Lease an item, with a long lease or one that ends at once."""
        item, m = self._pick(index)
        lease = self.long_lease if live else 0.0
        started = self.both(ledger.StartItems((item.id,), at=now(), lease_seconds=lease)).started
        got = started[0] if started else None
        if m.status.finished or (m.status is ItemStatus.PROCESSING and m.live_lease):
            assert got is None, f"start_item leased {m.status.value} item {item.id}"
        elif m.status is ItemStatus.PENDING:
            assert got is not None, f"start_item refused PENDING item {item.id}"
        # Else: PROCESSING with an ended lease, taken over or not (clock ticks).
        if got is not None:
            assert got.id == item.id
            assert got.status is ItemStatus.PROCESSING
            assert got.attempts == m.attempts + 1
            m.status, m.attempts, m.live_lease = ItemStatus.PROCESSING, got.attempts, live
            self.started = True

    @precondition(lambda self: self.request is not None)
    @rule(index=st.integers(0, 5), live=st.booleans())
    def extend(self, index: int, live: bool) -> None:
        """Extend a lease: true exactly for PROCESSING items."""
        item, m = self._pick(index)
        lease = self.long_lease if live else 0.0
        got = bool(self.both(ledger.ExtendLeases((item.id,), at=now(), lease_seconds=lease)).ids)
        assert got == (m.status is ItemStatus.PROCESSING)
        if got:
            m.live_lease = live

    @precondition(lambda self: self.request is not None)
    @rule(index=st.integers(0, 5), ok=st.booleans())
    def finish(self, index: int, ok: bool) -> None:
        """Finish an item; only the call finishing the last item gets the request."""
        item, m = self._pick(index)
        seq = index % len(self.items)
        result = _ok(seq) if ok else _failure(seq)
        finished = self.both(ledger.FinishItems([(item.id, result)], at=now())).finished
        got = finished[0] if finished else None
        if m.status.finished:
            assert got is None, "a second finish_item of one item returned the request"
            return
        m.status = ItemStatus.DONE if ok else ItemStatus.FAILED
        m.live_lease = False
        if all(x.status.finished for x in self.model):
            assert got is not None, "the call finishing the last item did not get the request"
            self.finishers += 1
            any_done = any(x.status is ItemStatus.DONE for x in self.model)
            assert got.status is (RequestStatus.COMPLETED if any_done else RequestStatus.FAILED)
        else:
            assert got is None, "finish_item returned the request before its last item"

    @precondition(lambda self: self.request is not None)
    @rule(later=st.booleans(), pending=st.booleans())
    def sweep(self, later: bool, pending: bool) -> None:
        """Sweep stale items: ended leases go back to PENDING."""
        at = now() + (2 * self.long_lease if later else 0.0)
        op = ledger.Sweep(now=at, pending_before=FAR_FUTURE if pending else 0.0, limit=1000)
        got = self.both(op).ids
        mine = {item.id: m for item, m in zip(self.items, self.model, strict=True)}
        for found in got:
            m = mine.get(found)
            if m is None:
                continue  # an item of an earlier example: not modelled
            assert not m.status.finished, f"stale_items returned finished item {found}"
            if m.status is ItemStatus.PROCESSING:
                assert later or not m.live_lease, f"stale_items took a live lease {found}"
                m.status, m.live_lease = ItemStatus.PENDING, False
        for item, m in zip(self.items, self.model, strict=True):
            if m.status is ItemStatus.PENDING and pending:
                assert item.id in got, f"stale_items missed forgotten item {item.id}"
            if m.status is ItemStatus.PROCESSING and later:
                raise AssertionError(f"stale_items missed ended lease of {item.id}")

    @precondition(lambda self: self.request is not None)
    @rule(indexes=st.lists(st.integers(0, 5), min_size=1, max_size=4))
    def start_or_give_up(self, indexes: list[int]) -> None:
        """Start a batch with ``max_attempts`` 2: an item past it fails, and may finish all."""
        picked = [self._pick(i) for i in indexes]
        op = ledger.StartItems(
            [item.id for item, _ in picked], at=now(), lease_seconds=self.long_lease,
            max_attempts=2,
        )
        changes = self.both(op)
        stored = {i.id: i for i in changes.items}
        for item, m in dict((item.id, (item, m)) for item, m in picked).values():
            after = stored.get(item.id)
            if after is None:
                continue
            m.attempts = after.attempts
            self.started = True
            if after.status is ItemStatus.FAILED:
                assert after.error_code == "too-many-attempts"
                assert after.attempts > 2
                m.status, m.live_lease = ItemStatus.FAILED, False
            else:
                m.status, m.live_lease = ItemStatus.PROCESSING, True
        self.finishers += len(changes.finished)

    @invariant()
    def backend_matches_ledger(self) -> None:
        """The backend stores what the ledger's model stores, item by item."""
        if self.request is None:
            return
        got = self.call(self.storage.list_items, self.request.id, limit=100)
        want = self.call(self.ledger.list_items, self.request.id, limit=100)
        assert [_essence(i) for i in got] == [_essence(i) for i in want]
        a = self.call(self.storage.get_request, self.request.id)
        b = self.call(self.ledger.get_request, self.request.id)
        assert a is not None
        assert b is not None
        assert (a.status, a.done, a.failed) == (b.status, b.done, b.failed)

    @invariant()
    def backend_matches_model(self) -> None:
        """Compare the stored request, items and events with the model."""
        if self.request is None:
            return
        request = self.call(self.storage.get_request, self.request.id)
        assert request is not None
        items = self.call(self.storage.list_items, self.request.id, limit=100)
        assert [i.id for i in items] == [i.id for i in self.items]
        for index, (stored, m) in enumerate(zip(items, self.model, strict=True)):
            assert stored.status is m.status, f"item {stored.id}"
            assert stored.attempts == m.attempts, f"item {stored.id}"
            assert _reachable(ITEM_TRANSITIONS, self.seen_items[index], stored.status), (
                f"item {stored.id} moved {self.seen_items[index].value} -> {stored.status.value}"
            )
            self.seen_items[index] = stored.status
        done = sum(1 for m in self.model if m.status is ItemStatus.DONE)
        failed = sum(1 for m in self.model if m.status is ItemStatus.FAILED)
        assert (request.done, request.failed) == (done, failed)
        assert request.done + request.failed <= request.total == len(self.items)
        assert _reachable(REQUEST_TRANSITIONS, self.seen_request, request.status), (
            f"request moved {self.seen_request.value} -> {request.status.value}"
        )
        self.seen_request = request.status
        events = self.call(claimable_events, self.storage, self.request.id)
        if done + failed == request.total:
            assert request.status is (RequestStatus.COMPLETED if done else RequestStatus.FAILED)
            assert self.finishers == 1
            assert len(events) == 1
            assert events[0].type == (
                "request.completed" if done else "request.failed"
            )
        else:
            assert not request.status.finished
            expected = RequestStatus.PROCESSING if self.started else RequestStatus.PENDING
            assert request.status is expected
            assert self.finishers == 0
            assert events == []
