"""The worker pipeline behind `Engine.run_worker` and `Engine.process_items`.

`_Worker` is one worker loop: it claims item ids (from the queue, or from
a `_Batch` of ids for `Engine.process_items`), keeps up to ``concurrency``
items in flight (downloads overlap on the event loop, compression runs in
codec threads), records finished items in rounds (the group commit: one
`csvimg.ledger.FinishItems`, then one `Queue.ack_many`) and keeps the
leases of everything it holds alive.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from csvimg import ledger
from csvimg._errors import CsvimgError, ItemError, StorageError
from csvimg.backends import Claim, Queue
from csvimg.codec import sniff
from csvimg.jobs import Item, ItemResult, Request, now

if TYPE_CHECKING:
    from csvimg.engine import Engine

__all__: list[str] = []

log = logging.getLogger("csvimg.engine")


_FLUSH_MAX = 256
"""Most finished items the group-commit task records in one round."""

_BACKLOG_BYTES = 32 * 1024 * 1024
"""Downloaded bytes a worker lets wait for the codec after freeing their download slots.

A download slot is freed as soon as its image is in memory, while the
images so waiting stay within this budget: the next downloads start
instead of waiting behind a queue of codec work (a slow host answers a
whole round of downloads at once), and memory stays bounded by
``concurrency`` bodies in their slots plus this budget.
"""

_REQUEST_CACHE = 256
"""Requests a worker keeps (for their options) before it forgets them all."""


class _Batch:
    """A fixed list of item ids in place of a queue, for `Engine.process_items`.

    Hands the ids out as claims (up to what is asked, no waiting), takes
    acknowledgements and lease extensions as done (there is no message to
    keep), and records what is released: those ids failed on storage and
    must be tried again by the caller.
    """

    def __init__(self, item_ids: Sequence[str]) -> None:
        self.pending = list(item_ids)
        self.failed: list[tuple[str, StorageError]] = []
        self.error: StorageError | None = None

    @property
    def drained(self) -> bool:
        """Whether every id was handed out."""
        return not self.pending

    async def claim(
        self, *, consumer: str, max_items: int, lease_seconds: float, wait: float
    ) -> list[Claim]:
        taken, self.pending = self.pending[:max_items], self.pending[max_items:]
        return [Claim(item_id=i, token=f"batch:{i}") for i in taken]

    async def ack_many(self, claims: Sequence[Claim]) -> None:
        return None

    async def extend_many(self, claims: Sequence[Claim], *, lease_seconds: float) -> None:
        return None

    async def release_many(self, claims: Sequence[Claim], *, delay: float = 0.0) -> None:
        error = self.error or StorageError("storage failed")
        self.failed += [(claim.item_id, error) for claim in claims]


class _Worker:
    """One `Engine.run_worker` loop: claims, in-flight items, the group commit, the leases.

    A claimed id holds a slot from its claim until its image is downloaded
    (when the bytes fit `_BACKLOG_BYTES`; they then wait for a codec thread
    without a slot) or else until its result is handed to the flusher (or
    it is released); its claim stays in ``claims`` and, once
    started, its item id in ``leased`` until the flusher recorded and acked
    it, so the lease keeper extends both meanwhile.
    """

    def __init__(self, engine: Engine, concurrency: int, source: _Batch | None = None) -> None:
        self.engine = engine
        self.source = source
        self.queue: Queue | _Batch = engine.queue if source is None else source
        self.slots = anyio.Semaphore(concurrency)
        self.backlog_used = 0  # bytes of downloaded images waiting for the codec, slot freed
        self.claims: dict[str, Claim] = {}  # token -> claim, until acked or released
        self.leased: dict[str, int] = {}  # started item id -> tasks holding it
        self.waiting: list[tuple[Claim, Item | None, ItemResult | None]] = []
        self.wakeup = anyio.Event()
        self.closing = False
        self.requests: dict[str, Request] = {}

    async def run(self, stopping: anyio.Event, claim_wait: float) -> None:
        """Claim and process until *stopping* (or the batch is drained), then record the rest."""
        async with anyio.create_task_group() as outer:
            outer.start_soon(self.keep_leases)
            async with anyio.create_task_group() as flushing:
                flushing.start_soon(self.flush_loop)
                async with anyio.create_task_group() as items:
                    await self.claim_loop(items, stopping, claim_wait)
                self.close()  # the flusher records what is left, then returns
            outer.cancel_scope.cancel()

    # -- claiming and processing ------------------------------------------

    async def claim_loop(
        self, items: anyio.abc.TaskGroup, stopping: anyio.Event, claim_wait: float
    ) -> None:
        """Claim up to the free slots, start them in one call, run each in *items*."""
        engine = self.engine
        lease = engine.settings.lease_seconds
        slots = self.slots
        while not stopping.is_set() and not (self.source is not None and self.source.drained):
            await slots.acquire()
            if stopping.is_set():  # set while we waited for a free slot
                slots.release()
                break
            free = slots.value + 1
            try:
                claims = await self.queue.claim(
                    consumer=engine.consumer, max_items=free, lease_seconds=lease, wait=claim_wait
                )
            except StorageError as exc:
                slots.release()
                log.error("queue unavailable, retrying: %s", exc)
                await anyio.sleep(1.0)
                continue
            if not claims:
                slots.release()
                continue
            if stopping.is_set():  # told to stop while waiting: hand them back
                slots.release()
                for claim in claims:
                    with contextlib.suppress(CsvimgError):
                        await self.queue.release_many([claim])
                break
            for _ in claims[1:]:
                slots.acquire_nowait()
            for claim in claims:
                self.claims[claim.token] = claim
            try:
                started = await start_items(engine, [c.item_id for c in claims])
            except StorageError as exc:
                for claim in claims:
                    self._storage_failed(claim, exc)
                await self._release(claims)
                continue
            by_id = {item.id: item for item in started}
            for claim in claims:
                item = by_id.pop(claim.item_id, None)
                if item is None:
                    # Finished already, or another live worker holds it: drop
                    # this copy of the message (acked with the next flush).
                    self._hand_over(claim, None, None)
                    continue
                self.leased[item.id] = self.leased.get(item.id, 0) + 1
                items.start_soon(self._run, claim, item)

    async def _run(self, claim: Claim, item: Item) -> None:
        engine = self.engine
        held = 0  # bytes of the backlog budget this item holds, once downloaded
        freed = False  # its slot was given back at the end of the download

        def downloaded(size: int) -> None:
            # The download is over: give its slot to the next one when the
            # body fits the backlog budget (it then waits for a codec thread
            # without holding a download slot); otherwise keep the slot, so
            # memory stays bounded by slots plus budget.
            nonlocal held, freed
            if self.backlog_used + size <= _BACKLOG_BYTES:
                self.backlog_used += size
                held = size
                freed = True
                self.slots.release()

        try:
            try:
                request = await self._request(item.request_id)
                if request is None:  # pragma: no cover - storage keeps them together
                    result = None
                else:
                    result = await outcome(engine, item, request, downloaded)
            finally:
                self.backlog_used -= held
        except StorageError as exc:
            self._storage_failed(claim, exc)
            self._unlease(item.id)
            await self._release([claim], slot_held=not freed)
            return
        self._hand_over(claim, item if result is not None else None, result, slot_held=not freed)

    async def _request(self, request_id: str) -> Request | None:
        """The item's request, for its options (they never change): cached."""
        request = self.requests.get(request_id)
        if request is None:
            request = await self.engine.storage.get_request(request_id)
            if request is not None:
                if len(self.requests) >= _REQUEST_CACHE:
                    self.requests.clear()
                self.requests[request_id] = request
        return request

    def _hand_over(
        self,
        claim: Claim,
        item: Item | None,
        result: ItemResult | None,
        *,
        slot_held: bool = True,
    ) -> None:
        """Queue a result (or a bare ack) for the flusher and free the slot (if held)."""
        self.waiting.append((claim, item, result))
        self.wakeup.set()
        if slot_held:
            self.slots.release()

    def _unlease(self, item_id: str) -> None:
        held = self.leased.get(item_id, 0) - 1
        if held > 0:
            self.leased[item_id] = held
        else:
            self.leased.pop(item_id, None)

    def _storage_failed(self, claim: Claim, exc: BaseException) -> None:
        if self.source is not None and isinstance(exc, StorageError):
            self.source.error = exc
        log.error("item %s: storage failed, will retry: %s", claim.item_id, exc,
                  extra={"item_id": claim.item_id, "error_code": "storage-error"})

    async def _release(self, claims: Sequence[Claim], *, slot_held: bool = True) -> None:
        """Give claims back with a growing delay after a storage failure.

        Items already started come back once their lease ends (the sweeper).
        Frees one slot per claim unless *slot_held* is False (given back
        already, at the end of the download).
        """
        with anyio.CancelScope(shield=True):
            for claim in claims:
                self.claims.pop(claim.token, None)
                # If even this fails, the lease runs out and the item comes back.
                with contextlib.suppress(CsvimgError):
                    await self.queue.release_many(
                        [claim], delay=min(30.0, 2.0 * claim.deliveries)
                    )
        if slot_held:
            for _ in claims:
                self.slots.release()

    # -- group commit -----------------------------------------------------

    def close(self) -> None:
        """Tell the flusher to return once nothing waits."""
        self.closing = True
        self.wakeup.set()

    async def flush_loop(self) -> None:
        """Record waiting results, as many as are there, one round after another.

        No timer: a round starts as soon as something waits, and whatever
        finishes during a round waits for the next one.
        """
        while True:
            if not self.waiting:
                if self.closing:
                    return
                await self.wakeup.wait()
                self.wakeup = anyio.Event()
                continue
            batch = self.waiting[:_FLUSH_MAX]
            del self.waiting[:_FLUSH_MAX]
            await self._flush(batch)

    async def _flush(self, batch: list[tuple[Claim, Item | None, ItemResult | None]]) -> None:
        engine = self.engine
        results = [(item, result) for _, item, result in batch
                   if item is not None and result is not None]
        claims = [claim for claim, _, _ in batch]
        try:
            if results:
                await finish_items(engine, results)
        except StorageError as exc:
            for claim, item, _ in batch:
                if item is not None:
                    self._storage_failed(claim, exc)
                    self._unlease(item.id)
            with anyio.CancelScope(shield=True):
                for claim in claims:
                    self.claims.pop(claim.token, None)
                with contextlib.suppress(CsvimgError):
                    deliveries = max(claim.deliveries for claim in claims)
                    await self.queue.release_many(claims, delay=min(30.0, 2.0 * deliveries))
            return
        for item, _ in results:
            self._unlease(item.id)
        try:
            await self.queue.ack_many(claims)
        except StorageError as exc:
            # Recorded already: redelivered, they are found finished and dropped.
            log.error("queue: acknowledging %d items failed: %s", len(claims), exc)
        finally:
            for claim in claims:
                self.claims.pop(claim.token, None)

    # -- leases -----------------------------------------------------------

    async def keep_leases(self) -> None:
        """Every third of a lease, extend every item and claim this worker holds."""
        lease = self.engine.settings.lease_seconds
        while True:
            await anyio.sleep(max(0.5, lease / 3))
            item_ids = list(self.leased)
            claims = list(self.claims.values())
            try:
                if item_ids:
                    await self.engine.storage.apply(
                        ledger.ExtendLeases(tuple(item_ids), at=now(), lease_seconds=lease)
                    )
                if claims:
                    await self.queue.extend_many(claims, lease_seconds=lease)
            except StorageError as exc:
                log.error("extending %d leases failed, retrying: %s", len(claims), exc)


async def start_items(engine: Engine, item_ids: Sequence[str]) -> list[Item]:
    """Lease *item_ids* (the ledger's `StartItems`); return those that started.

    An item past ``max_attempts`` is failed by the same write instead;
    it is reported here, and so is a request that write finished.
    """
    s = engine.settings
    op = ledger.StartItems(
        tuple(item_ids), at=now(), lease_seconds=s.lease_seconds, max_attempts=s.max_attempts
    )
    changes = await engine.storage.apply(op)
    for item in changes.items:
        if item.status.finished:
            _report_item(engine, item, item.result)
    for request in changes.finished:
        _report_finished(engine, request)
    return list(changes.started)


async def finish_items(engine: Engine, results: Sequence[tuple[Item, ItemResult]]) -> None:
    """Record results (the ledger's `FinishItems`); report items and finished requests."""
    op = ledger.FinishItems([(item.id, result) for item, result in results], at=now())
    changes = await engine.storage.apply(op)
    for item, result in results:
        _report_item(engine, item, result)
    for request in changes.finished:
        _report_finished(engine, request)


async def outcome(
    engine: Engine,
    item: Item,
    request: Request,
    downloaded: Callable[[int], None] | None = None,
) -> ItemResult:
    """Fetch, compress and store one item; every failure but `StorageError` is a result.

    *downloaded(size)* is called once the image's bytes are in memory,
    before the codec step.
    """
    try:
        return await _produce(engine, item, request, downloaded)
    except ItemError as exc:
        return ItemResult.failure(exc.code, exc.message)
    except StorageError:
        raise
    except Exception as exc:
        log.exception("item %s of request %s: unexpected error", item.id, request.id,
                      extra={"request_id": request.id, "item_id": item.id,
                             "error_code": "internal-error"})
        return ItemResult.failure("internal-error", f"{type(exc).__name__}: {exc}")


async def _produce(
    engine: Engine,
    item: Item,
    request: Request,
    downloaded: Callable[[int], None] | None = None,
) -> ItemResult:
    started = time.perf_counter()
    try:
        fetched = await engine.fetcher.fetch(item.url, first_chunk_check=sniff)
    finally:
        engine._timed("fetch", started)
    if downloaded is not None:
        downloaded(len(fetched.data))
    started = time.perf_counter()
    try:
        out = await engine.compress(fetched.data, request.options)
    finally:
        engine._timed("codec", started)
    seq = item.id.rsplit(".", 1)[-1]
    key = f"{request.id}/{seq}.{out.extension}"
    try:
        await engine.blobs.put(key, out.data, content_type=out.content_type)
    except StorageError as exc:
        # A full or read-only blob store fails this image with a reason;
        # the request still finishes.
        return ItemResult.failure("storage-error", str(exc), bytes_in=out.bytes_in)
    return ItemResult(
        output_key=key,
        content_type=out.content_type,
        bytes_in=out.bytes_in,
        bytes_out=out.bytes_out,
        width=out.width,
        height=out.height,
    )


def _report_item(engine: Engine, item: Item, result: ItemResult) -> None:
    """Log a finished item and call the `on_item` callbacks."""
    ids = {"request_id": item.request_id, "item_id": item.id, "error_code": result.error_code}
    if result.ok:
        log.debug("item %s of request %s done", item.id, item.request_id, extra=ids)
    else:
        log.warning(
            "item %s of request %s failed: %s: %s (url %s)",
            item.id, item.request_id, result.error_code, result.error_message,
            _loggable(item.url), extra=ids,
        )
    for callback in engine._on_item:
        callback(item, result)


def _report_finished(engine: Engine, finished: Request) -> None:
    """Log a finished request and call the `on_request_finished` callbacks."""
    log.info(
        "request %s %s: %d done, %d failed",
        finished.id, finished.status.value, finished.done, finished.failed,
        extra={"request_id": finished.id},
    )
    for on_finished in engine._on_request_finished:
        on_finished(finished)


def _loggable(url: str) -> str:
    """Strip userinfo and query (they may carry secrets) from a URL for logs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url[:200]
    netloc, slash, path = rest.partition("/")
    netloc = netloc.rpartition("@")[2]
    path = path.split("?", 1)[0].split("#", 1)[0]
    return f"{scheme}://{netloc}{slash}{path}"[:200]
