"""The job's rules, once: what each change of a batch of items must write.

Every rule that moves items, requests and outbox events lives here, as
pure functions over values (no I/O, no clock, no lock). A storage backend
is a *connector*: for an operation it reads what `Reads` asks for, under
its lock or in one transaction, hands that `State` to the operation's
`decide`, writes the `Changes` it answers (upserts of items, requests and
events, all or nothing) and returns them::

    async def apply(self, op: Operation) -> Changes:
        async with self.transaction() as tx:
            changes = op.decide(await tx.read(op.reads))
            await tx.write(changes)
        return changes

`run` does exactly this for a connector that offers ``read`` and
``write`` callables; the memory backend is such a connector. (The SQLite
backend and the Postgres example call `lease_item`, `settle_item` and
`finish_outcome` from here, and Redis keeps a Lua form of the rules,
checked by the contract suite's state machine; moving them onto `run`
is the next step of the redesign.)

The operations:

* `StartItems` — lease items for processing: PENDING -> PROCESSING, an
  expired lease (a dead worker's) taken over, attempts counted, an item
  past ``max_attempts`` failed instead, the request PENDING -> PROCESSING
  on its first item.
* `FinishItems` — settle each item once, count it on its request, move the
  request to COMPLETED (some item done) or FAILED (all failed) on its last
  item, and record the outbox event in the same write.
* `ExtendLeases` — push the leases of PROCESSING items forward.
* `Sweep` — take back expired leases, touch PENDING items left too long.
* `LeaseEvents` / `RescheduleEvent` — lease due outbox events; count a
  delivery round and schedule the next one, or mark the event delivered.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import attrs

from csvimg._errors import NotFoundError
from csvimg.jobs import Event, Item, ItemResult, ItemStatus, Request, RequestStatus

__all__ = [
    "Changes",
    "DueEvents",
    "ExtendLeases",
    "FinishItems",
    "LeaseEvents",
    "Operation",
    "Reads",
    "RescheduleEvent",
    "StaleItems",
    "StartItems",
    "State",
    "Sweep",
    "finish_outcome",
    "lease_item",
    "run",
    "settle_item",
    "too_many_attempts",
]


# -- what a connector reads --------------------------------------------------


@attrs.frozen
class StaleItems:
    """Select items that may have fallen out of the queue, at most *limit*.

    PROCESSING items whose ``lease_until`` is before *now*, and PENDING
    items whose ``updated_at`` is before *pending_before*. The selection
    may return more or fewer (the ledger checks each item again and keeps
    at most *limit*); an index on (status, lease_until) and (status,
    updated_at) keeps it cheap.
    """

    now: float
    pending_before: float
    limit: int


@attrs.frozen
class DueEvents:
    """Select undelivered events due at *now*, oldest first, at most *limit*.

    Due: ``next_attempt_at`` is set and not after *now*, and ``lease_until``
    is unset or not after *now*.
    """

    now: float
    limit: int


@attrs.frozen
class Reads:
    """What an operation needs read, in one transaction, before it decides.

    ``item_ids``: those items (unknown ids are left out); ``stale``: the
    items that selection finds; for every item read, its request.
    ``event_ids``: those events; ``due``: the events that selection finds.
    """

    item_ids: tuple[str, ...] = ()
    event_ids: tuple[str, ...] = ()
    stale: StaleItems | None = None
    due: DueEvents | None = None


@attrs.frozen
class State:
    """What a connector read for an operation: values by id."""

    items: Mapping[str, Item] = attrs.field(factory=dict)
    requests: Mapping[str, Request] = attrs.field(factory=dict)
    events: Mapping[str, Event] = attrs.field(factory=dict)


# -- what a connector writes ---------------------------------------------------


@attrs.frozen
class Changes:
    """What an operation decided: records to write, and its answer.

    ``items``, ``requests`` and ``events`` are whole records to write
    (insert or replace by id), all in the same transaction. The rest is the
    answer to the caller and is not written: ``started`` items,
    ``finished`` requests (each reported to exactly one caller, the one
    whose write finished it) and the ``ids`` an operation reports
    (extended leases, swept items).
    """

    items: tuple[Item, ...] = ()
    requests: tuple[Request, ...] = ()
    events: tuple[Event, ...] = ()
    started: tuple[Item, ...] = ()
    finished: tuple[Request, ...] = ()
    ids: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """Whether there is nothing to write."""
        return not (self.items or self.requests or self.events)


@runtime_checkable
class Operation(Protocol):
    """One change of the job's state: what to read, and how to decide."""

    @property
    def reads(self) -> Reads:
        """What the connector must read before calling `decide`."""

    def decide(self, state: State) -> Changes:
        """Return what to write, given what was read (pure)."""


# -- the rules -----------------------------------------------------------------


def lease_item(item: Item | None, *, at: float, lease_seconds: float) -> Item | None:
    """Return *item* leased for processing at *at*, or None if it may not be.

    PENDING moves to PROCESSING; a PROCESSING item whose lease ended (its
    worker died) goes back to PENDING and is taken over; attempts count up.
    None for an unknown, finished, or live-leased item.
    """
    if item is None or item.status.finished:
        return None
    if item.status is ItemStatus.PROCESSING:
        if item.lease_until is not None and item.lease_until > at:
            return None
        item = item.with_status(ItemStatus.PENDING, updated_at=at)
    return item.with_status(
        ItemStatus.PROCESSING,
        attempts=item.attempts + 1,
        lease_until=at + lease_seconds,
        updated_at=at,
    )


def settle_item(item: Item, result: ItemResult, *, at: float) -> Item:
    """Return unfinished *item* moved to DONE or FAILED with *result*.

    A PENDING item is accepted too: a slow worker's result may arrive after
    its lease was taken back, and keeping it beats redoing the work.
    """
    if item.status is ItemStatus.PENDING:
        item = item.with_status(ItemStatus.PROCESSING, updated_at=at)
    return item.with_status(
        ItemStatus.DONE if result.ok else ItemStatus.FAILED,
        output_key=result.output_key,
        content_type=result.content_type,
        bytes_in=result.bytes_in,
        bytes_out=result.bytes_out,
        width=result.width,
        height=result.height,
        error_code=result.error_code,
        error_message=result.error_message,
        lease_until=None,
        updated_at=at,
    )


def finish_outcome(
    request: Request, result: ItemResult, at: float
) -> tuple[Request, Event | None]:
    """Count one settled item on *request*; on its last, finish it.

    Returns the updated request and, when that item was the last one, the
    outbox event to record with it: COMPLETED if any item is done, FAILED
    if all failed.
    """
    done = request.done + (1 if result.ok else 0)
    failed = request.failed + (0 if result.ok else 1)
    updated = attrs.evolve(request, done=done, failed=failed, updated_at=at)
    if done + failed < request.total:
        return updated, None
    if updated.status is RequestStatus.PENDING:
        updated = updated.with_status(RequestStatus.PROCESSING, at=at)
    final = RequestStatus.COMPLETED if done > 0 else RequestStatus.FAILED
    updated = updated.with_status(final, at=at)
    event = Event(
        id=f"msg_{uuid.uuid4().hex}",
        type="request.completed" if final is RequestStatus.COMPLETED else "request.failed",
        request_id=request.id,
        created_at=at,
        owner=request.owner,
        callback_url=request.callback_url,
        next_attempt_at=at,
    )
    return updated, event


def too_many_attempts(attempts: int) -> ItemResult:
    """The result of an item given up after *attempts* starts (a worker died each time)."""
    return ItemResult.failure(
        "too-many-attempts", f"gave up after {attempts - 1} attempts (a worker died each time)"
    )


class _Batch:
    """Records changed by one operation, latest value per id, in first-touched order."""

    def __init__(self, state: State) -> None:
        self.items: dict[str, Item] = {}
        self.requests: dict[str, Request] = {}
        self.events: dict[str, Event] = {}
        self._state = state
        self.finished: list[Request] = []

    def item(self, item_id: str) -> Item | None:
        found = self.items.get(item_id)
        return found if found is not None else self._state.items.get(item_id)

    def request(self, request_id: str) -> Request:
        found = self.requests.get(request_id)
        if found is None:
            found = self._state.requests.get(request_id)
        if found is None:
            raise NotFoundError(f"no request {request_id}")
        return found

    def settle(self, item: Item, result: ItemResult, at: float) -> None:
        self.items[item.id] = settle_item(item, result, at=at)
        request, event = finish_outcome(self.request(item.request_id), result, at)
        self.requests[request.id] = request
        if event is not None:
            self.events[event.id] = event
            self.finished.append(request)

    def changes(self, **answer: Sequence[object]) -> Changes:
        return Changes(
            items=tuple(self.items.values()),
            requests=tuple(self.requests.values()),
            events=tuple(self.events.values()),
            finished=tuple(self.finished),
            **{k: tuple(v) for k, v in answer.items()},  # type: ignore[arg-type]
        )


def _unique(ids: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(ids))


def _results(results: Iterable[tuple[str, ItemResult]]) -> tuple[tuple[str, ItemResult], ...]:
    return tuple(results)


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative, not {value!r}")


# -- the operations ------------------------------------------------------------


@attrs.frozen
class StartItems:
    """Lease *item_ids* for processing at *at*; see the module docstring.

    Answer: ``started``, the items now leased (attempts counted), in the
    order given, each once. Unknown, finished and live-leased ids are left
    out. An item whose start would be attempt ``max_attempts + 1`` is
    failed with ``too-many-attempts`` instead (and may finish its request).
    """

    item_ids: tuple[str, ...] = attrs.field(converter=_unique)
    at: float
    lease_seconds: float = attrs.field(validator=_positive)
    max_attempts: int | None = None

    @property
    def reads(self) -> Reads:
        """The items and their requests."""
        return Reads(item_ids=self.item_ids)

    def decide(self, state: State) -> Changes:
        """Lease, take over, or give up each item."""
        batch = _Batch(state)
        started: list[Item] = []
        for item_id in self.item_ids:
            item = lease_item(batch.item(item_id), at=self.at, lease_seconds=self.lease_seconds)
            if item is None:
                continue
            request = batch.request(item.request_id)
            if request.status is RequestStatus.PENDING:
                batch.requests[request.id] = request.with_status(
                    RequestStatus.PROCESSING, at=self.at
                )
            if self.max_attempts is not None and item.attempts > self.max_attempts:
                batch.settle(item, too_many_attempts(item.attempts), self.at)
                continue
            batch.items[item.id] = item
            started.append(item)
        return batch.changes(started=started)


@attrs.frozen
class FinishItems:
    """Record each ``(item_id, result)`` at *at*; see the module docstring.

    An item already finished (or a second result for one item) is left as
    it is. Answer: ``finished``, the requests this write finished, each
    with its outbox event among ``events``.
    """

    results: tuple[tuple[str, ItemResult], ...] = attrs.field(converter=_results)
    at: float

    @property
    def reads(self) -> Reads:
        """The items and their requests."""
        return Reads(item_ids=_unique(i for i, _ in self.results))

    def decide(self, state: State) -> Changes:
        """Settle each item once and count it."""
        batch = _Batch(state)
        for item_id, result in self.results:
            item = batch.item(item_id)
            if item is None or item.status.finished:
                continue
            batch.settle(item, result, self.at)
        return batch.changes()


@attrs.frozen
class ExtendLeases:
    """Push the leases of the PROCESSING items among *item_ids* to *at* + *lease_seconds*.

    Answer: ``ids`` of the items whose lease was extended; any other id
    (unknown, PENDING, finished) is no longer the caller's to hold.
    """

    item_ids: tuple[str, ...] = attrs.field(converter=_unique)
    at: float
    lease_seconds: float = attrs.field(validator=_positive)

    @property
    def reads(self) -> Reads:
        """The items."""
        return Reads(item_ids=self.item_ids)

    def decide(self, state: State) -> Changes:
        """Extend each PROCESSING item's lease."""
        until = self.at + self.lease_seconds
        items = [
            attrs.evolve(item, lease_until=until)
            for item in (state.items.get(i) for i in self.item_ids)
            if item is not None and item.status is ItemStatus.PROCESSING
        ]
        return Changes(items=tuple(items), ids=tuple(item.id for item in items))


@attrs.frozen
class Sweep:
    """Take back items that may have fallen out of the queue, at most *limit*.

    PROCESSING items whose lease ended before *now* go back to PENDING
    (their worker died); PENDING items untouched since *pending_before*
    (lost between storing and enqueuing) are touched. Both get
    ``updated_at = now``, so another sweeper does not return them again
    within its window. Answer: ``ids``, to enqueue again.
    """

    now: float
    pending_before: float
    limit: int = attrs.field(validator=attrs.validators.ge(0))

    @property
    def reads(self) -> Reads:
        """The stale selection."""
        return Reads(stale=StaleItems(self.now, self.pending_before, self.limit))

    def decide(self, state: State) -> Changes:
        """Check each selected item again and keep at most *limit*."""
        items: list[Item] = []
        for item in sorted(state.items.values(), key=_sweep_order):
            if len(items) >= self.limit:
                break
            if (
                item.status is ItemStatus.PROCESSING
                and item.lease_until is not None
                and item.lease_until < self.now
            ):
                items.append(
                    item.with_status(ItemStatus.PENDING, lease_until=None, updated_at=self.now)
                )
            elif item.status is ItemStatus.PENDING and item.updated_at < self.pending_before:
                items.append(attrs.evolve(item, updated_at=self.now))
        return Changes(items=tuple(items), ids=tuple(item.id for item in items))


def _sweep_order(item: Item) -> tuple[int, float]:
    # Expired leases first (a worker died: its work waits), then forgotten ones.
    if item.status is ItemStatus.PROCESSING:
        return (0, item.lease_until or 0.0)
    return (1, item.updated_at)


@attrs.frozen
class LeaseEvents:
    """Lease up to *limit* undelivered events due at *now*, oldest first.

    Answer: the leased events among ``events`` (with ``lease_until`` set),
    in that order.
    """

    now: float
    limit: int = attrs.field(validator=attrs.validators.ge(0))
    lease_seconds: float = attrs.field(validator=_positive)

    @property
    def reads(self) -> Reads:
        """The due selection."""
        return Reads(due=DueEvents(self.now, self.limit))

    def decide(self, state: State) -> Changes:
        """Check each selected event again and lease it."""
        due = sorted(
            (e for e in state.events.values() if _due(e, self.now)),
            key=lambda e: e.created_at,
        )[: self.limit]
        until = self.now + self.lease_seconds
        return Changes(events=tuple(attrs.evolve(e, lease_until=until) for e in due))


def _due(event: Event, at: float) -> bool:
    return (
        event.next_attempt_at is not None
        and event.next_attempt_at <= at
        and (event.lease_until is None or event.lease_until <= at)
    )


@attrs.frozen
class RescheduleEvent:
    """Count a delivery round of *event_id* and schedule the next at *next_attempt_at*.

    None marks the event delivered: it is never leased again. An unknown id
    raises `NotFoundError` (nothing is written).
    """

    event_id: str
    next_attempt_at: float | None

    @property
    def reads(self) -> Reads:
        """The event."""
        return Reads(event_ids=(self.event_id,))

    def decide(self, state: State) -> Changes:
        """Count the round, release the lease."""
        event = state.events.get(self.event_id)
        if event is None:
            raise NotFoundError(f"no event {self.event_id}")
        return Changes(
            events=(
                attrs.evolve(
                    event,
                    attempts=event.attempts + 1,
                    next_attempt_at=self.next_attempt_at,
                    lease_until=None,
                ),
            )
        )


# -- a connector's loop, once -----------------------------------------------------


class _Read(Protocol):
    def __call__(self, reads: Reads) -> State: ...


class _Write(Protocol):
    def __call__(self, changes: Changes) -> None: ...


def run(op: Operation, read: _Read, write: _Write) -> Changes:
    """Read what *op* needs, decide, write the changes; return them.

    For connectors whose reads and writes are plain calls inside a
    transaction or lock the caller holds (memory, SQLite, Postgres in a
    thread...). Nothing is written when *op* decides nothing.
    """
    changes = op.decide(read(op.reads))
    if not changes.empty:
        write(changes)
    return changes
