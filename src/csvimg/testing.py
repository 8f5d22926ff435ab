"""The contract test suite every backend runs, built-in or third-party.

`csvimg.backends` states the contract of each kind of backend in words;
this module is the executable version. It ships in the wheel so that a
package providing, say, a PostgreSQL storage proves the same behaviour as
``memory://`` and ``sqlite://`` by subclassing a base class here and
providing one fixture (the fsspec ``tests/abstract`` style)::

    import pytest
    from csvimg.testing import StorageContract

    class TestPostgresStorage(StorageContract):
        @pytest.fixture
        async def storage(self, postgresql_url):
            backend = PostgresStorage.from_url(postgresql_url, Settings())
            await backend.open()
            yield backend          # a fresh, empty, opened backend per test
            await backend.close()

The three base classes and the fixture each one needs:

* `StorageContract`  -- ``storage``: an opened `Storage`
* `QueueContract`    -- ``queue``:   an opened `Queue`
* `BlobStoreContract` -- ``blobs``:  an opened `BlobStore`

Tests are ``async def`` methods run by AnyIO's pytest plugin, which comes
with anyio and needs no configuration: the base classes carry the
``anyio`` mark and an ``anyio_backend`` fixture answering ``"asyncio"``
(override it, e.g. with ``params=["asyncio", "trio"]``, to run on more
loops). So the backend fixture may be an async generator, as above. The
suite needs ``pytest`` and ``hypothesis`` installed; only test suites
import this module.

To see values in failed asserts, have pytest rewrite this module too: in
the suite's ``conftest.py``, before anything imports it::

    pytest.register_assert_rewrite("csvimg.testing")

What is proven:

* storage -- round trips of requests, rows and items with pagination;
  `create_request` all or nothing; newest-first listing per owner;
  `start_item` / `extend_lease` / `retry_item` moves and refusals, lease
  takeover; `finish_item` results, counters, idempotence, the COMPLETED /
  FAILED rule, exactly one winner and one event under concurrent
  finishers; the batch methods (`start_items`, `extend_leases`,
  `finish_items`) with known, unknown, finished and repeated ids, batches
  finishing some requests and not others, and exactly one winner and one
  event under concurrent batches; `stale_items`; webhooks; the outbox (due, leased,
  rescheduled, delivered); delivery logs; and a Hypothesis state machine
  (`StorageMachine`) checking the invariants after random sequences.
* queue -- claim / ack, *max_items*, waiting and waking, lease expiry and
  redelivery with counted deliveries, release with delay, extend, `ack_many`
  and `extend_many` (stale claims ignored), depth,
  at-least-once with concurrent consumers that die mid-item.
* blob store -- put / get / stat / delete, content types, etags that
  follow the bytes, overwrite, nested keys, atomic replacement under
  concurrent readers, and refusal of every key in `HOSTILE_KEYS` with
  `ValueError` (see `csvimg.backends.files.check_key` for the rule).

Timing knobs are class attributes (`QueueContract.lease`,
`StorageContract.short_lease`...): a backend whose clock is remote may
raise them. `StorageContract.state_machine_settings` sizes the Hypothesis
state machine.

Some tests read events by claiming them with `claimable_events`, which
leases them until `FAR_FUTURE`: the backend under test must not be
shared with anything else.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, ClassVar, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
import attrs
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from csvimg._errors import NotFoundError, StorageError
from csvimg.backends import BlobStore, Claim, Queue, Storage
from csvimg.jobs import (
    ITEM_TRANSITIONS,
    REQUEST_TRANSITIONS,
    Delivery,
    Event,
    Item,
    ItemIds,
    ItemResult,
    ItemStatus,
    ProcessOptions,
    Request,
    RequestStatus,
    Row,
    Webhook,
    item_id,
    new_id,
    now,
)

__all__ = [
    "FAR_FUTURE",
    "HOSTILE_KEYS",
    "BlobStoreContract",
    "QueueContract",
    "StorageContract",
    "StorageMachine",
    "claimable_events",
    "sample_request",
]

T = TypeVar("T")

FAR_FUTURE = 4_102_444_800.0
"""2100-01-01 in epoch seconds: a *now* at which every event is due."""

HOSTILE_KEYS: tuple[str, ...] = (
    "",
    "/",
    "/etc/passwd",
    "../x",
    "..",
    ".",
    "a/../../x",
    "a/..",
    "a/./b",
    "a//b",
    "a/",
    "a\\b",
    "..\\x",
    "C:\\x",
    "a\x00b",
)
"""Blob keys every blob store must refuse with `ValueError`."""

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


async def claimable_events(storage: Storage, request_id: str | None = None) -> list[Event]:
    """Claim every undelivered event (of *request_id* when given), oldest first.

    Claims at `FAR_FUTURE` with a zero lease, so a later call sees the same
    events again; but a claimer using the real clock will not see them
    until then. For tests only.
    """
    events = await storage.claim_events(now=FAR_FUTURE, limit=100_000, lease_seconds=0.0)
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


# ---------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------


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


class StorageMachine(RuleBasedStateMachine):
    """Hypothesis drives one request's items through start/extend/retry/finish.

    A model of each item predicts every answer, and after every step the
    invariants compare the backend with the model: counters equal the
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

    def call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        """Run ``await fn(*args, **kwargs)`` on the test's event loop."""
        return anyio.from_thread.run(functools.partial(fn, *args, **kwargs))

    # Few items, so that random steps often hit the same item twice.
    @initialize(rows=st.integers(1, 3), per_row=st.integers(1, 2))
    def create(self, rows: int, per_row: int) -> None:
        """Create a fresh request of up to 6 items."""
        request, row_list, items = sample_request(rows, per_row)
        self.call(self.storage.create_request, request, row_list)
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
        got = self.call(
            self.storage.start_item, item.id, lease_seconds=self.long_lease if live else 0.0
        )
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
        got = self.call(
            self.storage.extend_lease, item.id, lease_seconds=self.long_lease if live else 0.0
        )
        assert got == (m.status is ItemStatus.PROCESSING)
        if got:
            m.live_lease = live

    @precondition(lambda self: self.request is not None)
    @rule(index=st.integers(0, 5))
    def retry(self, index: int) -> None:
        """Retry an item: true exactly for PROCESSING items."""
        item, m = self._pick(index)
        got = self.call(
            self.storage.retry_item, item.id, error_code="timeout", error_message="slow"
        )
        assert got == (m.status is ItemStatus.PROCESSING)
        if got:
            m.status, m.live_lease = ItemStatus.PENDING, False

    @precondition(lambda self: self.request is not None)
    @rule(index=st.integers(0, 5), ok=st.booleans())
    def finish(self, index: int, ok: bool) -> None:
        """Finish an item; only the call finishing the last item gets the request."""
        item, m = self._pick(index)
        seq = index % len(self.items)
        got = self.call(self.storage.finish_item, item.id, _ok(seq) if ok else _failure(seq))
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
        got = self.call(
            self.storage.stale_items,
            now=at,
            pending_before=FAR_FUTURE if pending else 0.0,
            limit=1000,
        )
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


class StorageContract(_AnyioContract):
    """The `Storage` contract; a subclass provides the ``storage`` fixture.

    The fixture yields a fresh, empty, opened backend for each test.
    """

    short_lease: ClassVar[float] = 0.05
    """A lease that ends during a test (seconds); tests sleep twice as long."""

    concurrent_finishers: ClassVar[int] = 3
    """How many tasks race to finish each item in the exactly-once test."""

    state_machine_settings: ClassVar[settings] = settings(
        max_examples=50,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    """Hypothesis settings of `test_state_machine`."""

    @staticmethod
    async def create(storage: Storage, *args: Any, **kwargs: Any) -> tuple[
        Request, list[Row], list[Item]
    ]:
        """Build a `sample_request` and store it (the storage derives the items)."""
        request, rows, items = sample_request(*args, **kwargs)
        await storage.create_request(request, rows)
        return request, rows, items

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

    # -- leasing -------------------------------------------------------------

    async def test_start_item(self, storage: Storage) -> None:
        """PENDING -> PROCESSING, attempts + 1, leased; the request starts too."""
        request, _, items = await self.create(storage, rows=1, urls_per_row=2)
        before = now()
        got = await storage.start_item(items[0].id, lease_seconds=30)
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
        assert await storage.start_item(item_id(new_id(), 0), lease_seconds=30) is None
        first = await storage.start_item(items[0].id, lease_seconds=30)
        assert first is not None
        assert await storage.start_item(items[0].id, lease_seconds=30) is None
        assert await storage.get_item(items[0].id) == first
        await storage.finish_item(items[0].id, _ok(0))
        assert await storage.start_item(items[0].id, lease_seconds=30) is None
        finished = await storage.get_item(items[0].id)
        assert finished is not None
        assert finished.status is ItemStatus.DONE
        assert finished.attempts == 1

    async def test_expired_lease_is_taken_over(self, storage: Storage) -> None:
        """A PROCESSING item whose lease ended is leased again (its worker died)."""
        _, _, items = await self.create(storage, rows=1, urls_per_row=1)
        assert await storage.start_item(items[0].id, lease_seconds=self.short_lease)
        await anyio.sleep(self.short_lease * 2)
        again = await storage.start_item(items[0].id, lease_seconds=30)
        assert again is not None
        assert again.status is ItemStatus.PROCESSING
        assert again.attempts == 2
        assert again.lease_until is not None
        assert again.lease_until > now() + 20

    async def test_extend_lease(self, storage: Storage) -> None:
        """Only a PROCESSING item's lease can be extended, and it then holds."""
        _, _, items = await self.create(storage, rows=1, urls_per_row=2)
        a, b = items[0].id, items[1].id
        assert await storage.start_item(a, lease_seconds=self.short_lease)
        assert await storage.extend_lease(a, lease_seconds=30) is True
        await anyio.sleep(self.short_lease * 2)
        assert await storage.start_item(a, lease_seconds=30) is None
        stored = await storage.get_item(a)
        assert stored is not None
        assert stored.lease_until is not None
        assert stored.lease_until > now() + 20
        assert await storage.extend_lease(b, lease_seconds=30) is False
        assert await storage.extend_lease(item_id(new_id(), 0), lease_seconds=30) is False
        await storage.finish_item(a, _ok(0))
        assert await storage.extend_lease(a, lease_seconds=30) is False

    async def test_retry_item(self, storage: Storage) -> None:
        """PROCESSING -> PENDING with the error kept; anything else is refused."""
        _, _, items = await self.create(storage, rows=1, urls_per_row=2)
        a, b = items[0].id, items[1].id
        assert await storage.retry_item(b, error_code="timeout", error_message="x") is False
        assert await storage.start_item(a, lease_seconds=30)
        assert await storage.retry_item(a, error_code="timeout", error_message="slow") is True
        stored = await storage.get_item(a)
        assert stored is not None
        assert stored.status is ItemStatus.PENDING
        assert stored.lease_until is None
        assert (stored.error_code, stored.error_message) == ("timeout", "slow")
        assert stored.attempts == 1
        assert await storage.retry_item(a, error_code="timeout", error_message="x") is False
        again = await storage.start_item(a, lease_seconds=30)
        assert again is not None
        assert again.attempts == 2
        unknown = item_id(new_id(), 0)
        assert await storage.retry_item(unknown, error_code="x", error_message="x") is False
        await storage.finish_item(a, _ok(0))
        assert await storage.retry_item(a, error_code="x", error_message="x") is False

    async def test_stale_items_takes_back_ended_leases(self, storage: Storage) -> None:
        """PROCESSING items whose lease ended go back to PENDING, once."""
        _, _, items = await self.create(storage, rows=1, urls_per_row=3)
        leased, live, done = (i.id for i in items)
        assert await storage.start_item(leased, lease_seconds=30)
        assert await storage.start_item(live, lease_seconds=7200)
        assert await storage.start_item(done, lease_seconds=30)
        await storage.finish_item(done, _ok(2))
        t = now()
        assert await storage.stale_items(now=t, pending_before=0, limit=10) == []
        later = t + 3600
        assert await storage.stale_items(now=later, pending_before=0, limit=10) == [leased]
        back = await storage.get_item(leased)
        assert back is not None
        assert (back.status, back.lease_until, back.attempts) == (ItemStatus.PENDING, None, 1)
        assert back.updated_at == later
        assert await storage.stale_items(now=later, pending_before=0, limit=10) == []
        assert await storage.start_item(leased, lease_seconds=30) is not None
        finished = await storage.get_item(done)
        assert finished is not None
        assert finished.status is ItemStatus.DONE

    async def test_stale_items_touches_forgotten_pending_items(self, storage: Storage) -> None:
        """PENDING items untouched since *pending_before*, once per window, *limit* at most."""
        _, _, items = await self.create(storage, rows=1, urls_per_row=3)
        ids = [i.id for i in items]
        t = now() + 1
        assert await storage.stale_items(now=t, pending_before=t - 3600, limit=10) == []
        first = await storage.stale_items(now=t, pending_before=t, limit=2)
        assert len(first) == 2
        assert set(first) < set(ids)
        touched = await storage.get_item(first[0])
        assert touched is not None
        assert (touched.status, touched.updated_at) == (ItemStatus.PENDING, t)
        rest = await storage.stale_items(now=t, pending_before=t, limit=10)
        assert sorted(first + rest) == sorted(ids)
        assert await storage.stale_items(now=t, pending_before=t, limit=10) == []
        again = await storage.stale_items(now=t + 60, pending_before=t + 30, limit=10)
        assert sorted(again) == sorted(ids)

    # -- finishing -----------------------------------------------------------

    async def test_finish_item_records_outcome_and_counts(self, storage: Storage) -> None:
        """Results land on items, counters move, the last call gets the request."""
        request, _, items = await self.create(storage, rows=1, urls_per_row=3)
        for item in items:
            assert await storage.start_item(item.id, lease_seconds=30)
        assert await storage.finish_item(items[0].id, _ok(0)) is None
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

        assert await storage.finish_item(items[1].id, _failure(1)) is None
        failed = await storage.get_item(items[1].id)
        assert failed is not None
        assert failed.status is ItemStatus.FAILED
        assert failed.error_code == "not-an-image"
        assert failed.error_message == "item 1 is not an image"
        assert failed.bytes_in == 12
        stored = await storage.get_request(request.id)
        assert stored is not None
        assert (stored.status, stored.done, stored.failed) == (RequestStatus.PROCESSING, 1, 1)

        finished = await storage.finish_item(items[2].id, _ok(2))
        assert finished is not None
        assert finished.id == request.id
        assert (finished.status, finished.done, finished.failed) == (RequestStatus.COMPLETED, 2, 1)
        assert await storage.get_request(request.id) == finished

    async def test_finish_item_is_idempotent(self, storage: Storage) -> None:
        """A second finish of an item changes nothing and returns None."""
        request, _, items = await self.create(storage, rows=1, urls_per_row=2)
        assert await storage.finish_item(items[0].id, _ok(0)) is None
        assert await storage.finish_item(items[0].id, _failure(0)) is None
        first = await storage.get_item(items[0].id)
        assert first is not None
        assert first.status is ItemStatus.DONE
        finished = await storage.finish_item(items[1].id, _ok(1))
        assert finished is not None
        assert (finished.done, finished.failed) == (2, 0)
        assert await storage.finish_item(items[1].id, _ok(1)) is None
        assert await storage.finish_item(item_id(new_id(), 0), _ok(0)) is None
        assert await storage.get_request(request.id) == finished
        assert len(await claimable_events(storage, request.id)) == 1

    async def test_finish_of_a_pending_item_counts(self, storage: Storage) -> None:
        """A result for an item whose lease was taken back is accepted, not redone."""
        request, _, items = await self.create(storage, rows=1, urls_per_row=2)
        assert await storage.finish_item(items[0].id, _ok(0)) is None
        stored = await storage.get_request(request.id)
        assert stored is not None
        assert stored.done == 1
        item = await storage.get_item(items[0].id)
        assert item is not None
        assert item.status is ItemStatus.DONE

    async def test_completed_when_any_item_done(self, storage: Storage) -> None:
        """Some done, some failed: COMPLETED and one ``request.completed`` event."""
        request, _, items = await self.create(storage, rows=2, urls_per_row=1, owner="alice")
        await storage.finish_item(items[0].id, _failure(0))
        finished = await storage.finish_item(items[1].id, _ok(1))
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
        await storage.start_item(items[0].id, lease_seconds=30)
        await storage.finish_item(items[0].id, _failure(0))
        finished = await storage.finish_item(items[1].id, _failure(1))
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
            results.append(await storage.finish_item(items[seq].id, outcome))

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

    async def test_start_items(self, storage: Storage) -> None:
        """Known PENDING ids start, in order; unknown, live-leased, finished and repeated don't."""
        request, _, items = await self.create(storage, rows=2, urls_per_row=3)
        ids = [i.id for i in items]
        assert await storage.start_item(ids[1], lease_seconds=30)
        await storage.finish_item(ids[2], _ok(2))
        unknown = item_id(new_id(), 0)
        assert await storage.start_items([], lease_seconds=30) == []
        before = now()
        got = await storage.start_items(
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
        assert await storage.start_item(items1[0].id, lease_seconds=self.short_lease)
        await anyio.sleep(self.short_lease * 2)
        got = await storage.start_items([items1[0].id, items2[0].id], lease_seconds=30)
        assert [(i.id, i.attempts) for i in got] == [(items1[0].id, 2), (items2[0].id, 1)]
        for request in (first, second):
            stored = await storage.get_request(request.id)
            assert stored is not None
            assert stored.status is RequestStatus.PROCESSING

    async def test_extend_leases(self, storage: Storage) -> None:
        """Only PROCESSING items are extended (and reported); their leases then hold."""
        _, _, items = await self.create(storage, rows=1, urls_per_row=4)
        a, b, pending, done = (i.id for i in items)
        assert await storage.start_items([a, b, done], lease_seconds=self.short_lease)
        await storage.finish_item(done, _ok(3))
        assert await storage.extend_leases([], lease_seconds=30) == []
        unknown = item_id(new_id(), 0)
        got = await storage.extend_leases([a, unknown, pending, done, b], lease_seconds=30)
        assert got == [a, b]
        await anyio.sleep(self.short_lease * 2)
        assert await storage.start_items([a, b], lease_seconds=30) == []
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
        await storage.start_items([i.id for i in items1 + items2], lease_seconds=30)
        assert await storage.finish_items([]) == []
        assert await storage.finish_item(items1[0].id, _failure(0)) is None
        unknown = item_id(new_id(), 0)
        got = await storage.finish_items(
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
        [done] = await storage.finish_items(rest)
        assert (done.id, done.status, done.done, done.failed) == (
            second.id, RequestStatus.COMPLETED, 1, 2,
        )
        assert await storage.finish_items(rest) == []
        assert len(await claimable_events(storage, second.id)) == 1

    async def test_finish_items_finishes_several_requests(self, storage: Storage) -> None:
        """A batch holding every item of two requests finishes both, one event each."""
        first, _, items1 = await self.create(storage, rows=1, urls_per_row=2)
        second, _, items2 = await self.create(storage, rows=1, urls_per_row=1)
        got = await storage.finish_items(
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
                winners.extend(await storage.finish_items(batch))

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

    async def test_state_machine(self, storage: Storage) -> None:
        """Random start/extend/retry/finish sequences keep every invariant."""
        machine = type("Machine", (StorageMachine,), {"storage": storage})
        config = self.state_machine_settings
        await anyio.to_thread.run_sync(
            lambda: run_state_machine_as_test(machine, settings=config)
        )

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
        finished = await storage.finish_item(items[0].id, _ok(0))
        assert finished is not None
        return finished

    async def test_claim_events_leases_and_reschedules(self, storage: Storage) -> None:
        """Due events are leased; rescheduling counts a round; None is delivered."""
        request = await self._finished_request(storage)
        t = now() + 1
        [event] = await storage.claim_events(now=t, limit=10, lease_seconds=30)
        assert event.request_id == request.id
        assert event.attempts == 0
        assert await storage.claim_events(now=t, limit=10, lease_seconds=30) == []
        assert await storage.claim_events(now=t + 29, limit=10, lease_seconds=30) == []
        [again] = await storage.claim_events(now=t + 31, limit=10, lease_seconds=30)
        assert again.id == event.id
        await storage.reschedule_event(event.id, next_attempt_at=t + 100)
        assert await storage.claim_events(now=t + 50, limit=10, lease_seconds=30) == []
        [third] = await storage.claim_events(now=t + 100, limit=10, lease_seconds=30)
        assert (third.id, third.attempts, third.next_attempt_at) == (event.id, 1, t + 100)
        await storage.reschedule_event(event.id, next_attempt_at=None)
        assert await storage.claim_events(now=FAR_FUTURE, limit=10, lease_seconds=30) == []

    async def test_claim_events_limit_and_order(self, storage: Storage) -> None:
        """At most *limit* per claim, oldest first; leased ones are skipped."""
        made = [await self._finished_request(storage) for _ in range(3)]
        t = now() + 1
        first = await storage.claim_events(now=t, limit=2, lease_seconds=30)
        second = await storage.claim_events(now=t, limit=2, lease_seconds=30)
        assert [e.request_id for e in first + second] == [r.id for r in made]
        assert len({e.id for e in first + second}) == 3

    async def test_events_not_yet_due_are_not_claimed(self, storage: Storage) -> None:
        """An event is claimed only once its next attempt is due."""
        await self._finished_request(storage)
        [event] = await storage.claim_events(now=now() + 1, limit=10, lease_seconds=0)
        assert event.next_attempt_at is not None
        await storage.reschedule_event(event.id, next_attempt_at=event.next_attempt_at + 600)
        assert await storage.claim_events(now=event.next_attempt_at + 599, limit=10,
                                          lease_seconds=0) == []

    async def test_reschedule_unknown_event(self, storage: Storage) -> None:
        """Rescheduling an event that does not exist raises `NotFoundError`."""
        with pytest.raises(NotFoundError):
            await storage.reschedule_event("msg_nope", next_attempt_at=None)

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


# ---------------------------------------------------------------------------
# Queue
# ---------------------------------------------------------------------------


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
            await queue.ack(claim)
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
            await queue.ack(claim)
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
        await queue.ack(first)  # the stale claim no longer holds the id
        assert await queue.depth() == 1
        await queue.ack(second)
        assert await queue.depth() == 0

    async def test_release(self, queue: Queue) -> None:
        """A released id comes back at once, or after its delay."""
        await queue.enqueue(["a"])
        [first] = await queue.claim(consumer="w1", max_items=1, lease_seconds=30, wait=0)
        await queue.release(first)
        [second] = await queue.claim(consumer="w1", max_items=1, lease_seconds=30, wait=0)
        assert (second.item_id, second.deliveries) == ("a", 2)
        await queue.release(second, delay=0.3)
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
        await queue.extend(claim, lease_seconds=30)
        await anyio.sleep(self.lease * 1.5)
        assert await queue.claim(consumer="w2", max_items=1, lease_seconds=30, wait=0) == []
        await queue.ack(claim)
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
            await queue.ack(claim)
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
                    await queue.ack(claim)
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


# ---------------------------------------------------------------------------
# Blob store
# ---------------------------------------------------------------------------


class BlobStoreContract(_AnyioContract):
    """The `BlobStore` contract; a subclass provides the ``blobs`` fixture.

    The fixture yields a fresh, empty, opened store for each test.
    """

    async def test_put_get_stat(self, blobs: BlobStore) -> None:
        """What was put is read back; stat describes it."""
        data = bytes(range(256)) * 40
        info = await blobs.put("req/0.jpg", data, content_type="image/jpeg")
        assert (info.key, info.size, info.content_type) == ("req/0.jpg", len(data), "image/jpeg")
        assert info.etag
        assert await blobs.get("req/0.jpg") == data
        stat = await blobs.stat("req/0.jpg")
        assert stat is not None
        assert (stat.key, stat.size, stat.content_type, stat.etag) == (
            info.key, info.size, info.content_type, info.etag,
        )

    async def test_content_types(self, blobs: BlobStore) -> None:
        """Each blob keeps the content type it was stored with."""
        await blobs.put("r/1.webp", b"RIFF....WEBP", content_type="image/webp")
        await blobs.put("r/2.png", b"\x89PNG", content_type="image/png")
        one, two = await blobs.stat("r/1.webp"), await blobs.stat("r/2.png")
        assert one is not None
        assert two is not None
        assert (one.content_type, two.content_type) == ("image/webp", "image/png")

    async def test_empty_blob(self, blobs: BlobStore) -> None:
        """Zero bytes is a blob too."""
        info = await blobs.put("empty.jpg", b"", content_type="image/jpeg")
        assert info.size == 0
        assert await blobs.get("empty.jpg") == b""

    async def test_etag_follows_content(self, blobs: BlobStore) -> None:
        """Same bytes, same etag (even under another key); other bytes, other etag."""
        a = await blobs.put("x/a.jpg", b"one", content_type="image/jpeg")
        again = await blobs.put("x/a.jpg", b"one", content_type="image/jpeg")
        elsewhere = await blobs.put("y/b.jpg", b"one", content_type="image/jpeg")
        assert a.etag == again.etag == elsewhere.etag
        changed = await blobs.put("x/a.jpg", b"two", content_type="image/jpeg")
        assert changed.etag != a.etag
        stat = await blobs.stat("x/a.jpg")
        assert stat is not None
        assert stat.etag == changed.etag
        stat_again = await blobs.stat("x/a.jpg")
        assert stat_again is not None
        assert stat_again.etag == changed.etag

    async def test_overwrite(self, blobs: BlobStore) -> None:
        """A second put replaces the first entirely."""
        await blobs.put("k.jpg", b"a" * 5000, content_type="image/jpeg")
        info = await blobs.put("k.jpg", b"b" * 10, content_type="image/jpeg")
        assert await blobs.get("k.jpg") == b"b" * 10
        stat = await blobs.stat("k.jpg")
        assert stat is not None
        assert stat.size == info.size == 10

    async def test_missing(self, blobs: BlobStore) -> None:
        """A missing blob: `NotFoundError` (a `KeyError`) from get, None from stat."""
        with pytest.raises(NotFoundError):
            await blobs.get("nope/0.jpg")
        with pytest.raises(KeyError):
            await blobs.get("nope.jpg")
        assert await blobs.stat("nope/0.jpg") is None
        await blobs.delete("nope/0.jpg")  # missing is fine

    async def test_delete(self, blobs: BlobStore) -> None:
        """Deleted blobs are gone; their neighbours stay."""
        await blobs.put("d/1.jpg", b"1", content_type="image/jpeg")
        await blobs.put("d/2.jpg", b"2", content_type="image/jpeg")
        await blobs.delete("d/1.jpg")
        assert await blobs.stat("d/1.jpg") is None
        with pytest.raises(NotFoundError):
            await blobs.get("d/1.jpg")
        assert await blobs.get("d/2.jpg") == b"2"
        await blobs.delete("d/1.jpg")

    async def test_nested_keys(self, blobs: BlobStore) -> None:
        """Keys with ``/`` nest; a key's prefix is not itself a blob."""
        keys = ["a/b/c.jpg", "a/b/d.jpg", "a/x.png", "top.jpg", "a/b/c/deeper.jpg"]
        for n, key in enumerate(keys):
            await blobs.put(key, key.encode() * (n + 1), content_type="image/jpeg")
        for n, key in enumerate(keys):
            assert await blobs.get(key) == key.encode() * (n + 1)
        assert await blobs.stat("a/b") is None
        with pytest.raises(NotFoundError):
            await blobs.get("a")

    @pytest.mark.parametrize("key", HOSTILE_KEYS)
    async def test_hostile_keys_are_refused(self, blobs: BlobStore, key: str) -> None:
        """Keys that could escape the store raise `ValueError` on every method."""
        with pytest.raises(ValueError, match="key"):
            await blobs.put(key, b"x", content_type="image/jpeg")
        with pytest.raises(ValueError, match="key"):
            await blobs.get(key)
        with pytest.raises(ValueError, match="key"):
            await blobs.stat(key)
        with pytest.raises(ValueError, match="key"):
            await blobs.delete(key)

    async def test_put_is_atomic(self, blobs: BlobStore) -> None:
        """Readers racing writers see one whole blob or another, never a mix."""
        payloads = (b"a" * 300_000, b"b" * 200_001)
        await blobs.put("race.jpg", payloads[0], content_type="image/jpeg")
        seen: list[bytes] = []

        async def write(data: bytes) -> None:
            for _ in range(15):
                await blobs.put("race.jpg", data, content_type="image/jpeg")

        async def read() -> None:
            for _ in range(30):
                seen.append(await blobs.get("race.jpg"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(write, payloads[0])
            tg.start_soon(write, payloads[1])
            tg.start_soon(read)
            tg.start_soon(read)
        assert all(data in payloads for data in seen)
        assert await blobs.get("race.jpg") in payloads
