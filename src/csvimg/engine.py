"""The engine: submit CSVs, run workers, read status, build the output CSV.

An `Engine` wires a storage, a queue, a blob store and a notifier (built
from URLs by `csvimg.plugins`) to the manifest parser, the safe fetcher and
the codec. It is what the reference server, the CLI and embedding
applications use::

    async with Engine(Settings()) as engine:          # memory:// backends
        request = await engine.submit(csv_bytes)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run_worker)
            done = await engine.wait(request.id)
            tg.cancel_scope.cancel()
        async for chunk in engine.output_csv(request.id):
            ...

Work is spread item by item: the queue carries one id per image URL, a
worker keeps up to ``concurrency`` items in flight (downloads overlap on
the event loop) and compresses in ``codec_threads`` threads (Pillow
releases the GIL, so every core is used).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Self

import anyio
import anyio.abc

from csvimg import ledger
from csvimg._errors import (
    CsvimgError,
    ItemError,
    NotFinishedError,
    NotFoundError,
    StorageError,
)
from csvimg.backends import BlobStore, Claim, Notifier, Queue, Storage, check_backend
from csvimg.codec import sniff
from csvimg.jobs import (
    Event,
    Item,
    ItemIds,
    ItemResult,
    ProcessOptions,
    Request,
    new_id,
    now,
)
from csvimg.manifest import Manifest, parse_manifest
from csvimg.plugins import Plugins
from csvimg.settings import Settings

if TYPE_CHECKING:
    # Pillow and aiohttp load when first used, not with the engine.
    from csvimg.codec import Compressed
    from csvimg.fetch import Fetcher

__all__ = ["IMAGES_PATH", "OUTPUT_COLUMN", "Engine", "neutralise"]

log = logging.getLogger("csvimg.engine")

OUTPUT_COLUMN = "Output Image Urls"
"""The name of the column the output CSV adds."""

IMAGES_PATH = "/api/v1/images/"
"""Where the reference server serves output images: ``<public_url>/api/v1/images/<key>``."""

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise(cell: str) -> str:
    """Defuse a cell a spreadsheet would run as a formula (CSV injection).

    A cell starting with ``= + - @``, tab or CR gets a leading apostrophe,
    as OWASP recommends; every other cell is returned unchanged.
    """
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


CsvSource = bytes | str | Iterable[bytes] | IO[bytes]


class Engine:
    """Processes CSVs of image URLs with pluggable backends.

    Build it from `Settings` (backends chosen by URL) or hand it backend
    objects directly; use it as an async context manager so backends are
    opened and closed.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        plugins: Plugins | None = None,
        storage: Storage | None = None,
        queue: Queue | None = None,
        blobs: BlobStore | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.plugins = plugins or Plugins()
        s = self.settings
        self.storage: Storage = storage or self.plugins.storage(s.storage_url, s)
        self.queue: Queue = queue or self.plugins.queue(self.plugins.queue_url(s), s)
        self.blobs: BlobStore = blobs or self.plugins.blobs(s.blobs_url, s)
        check_backend("storage", self.storage, Storage)
        check_backend("queue", self.queue, Queue)
        check_backend("blob store", self.blobs, BlobStore)
        self._notifier = notifier
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._fetcher: Fetcher | None = None
        self._codec_limiter = anyio.CapacityLimiter(max(1, s.codec_threads))
        self._opened = False
        self._on_item: list[Callable[[Item, ItemResult], Any]] = []
        self._on_timing: list[Callable[[str, float], Any]] = []
        self._on_request_finished: list[Callable[[Request], Any]] = []

    # -- life cycle -------------------------------------------------------

    @property
    def notifier(self) -> Notifier | None:
        """The notifier delivering outbox events, built on first use."""
        if self._notifier is None and self.settings.notifier_url:
            self._notifier = self.plugins.notifier(self.settings.notifier_url, self.settings)
            self._notifier_bind()
        return self._notifier

    def _notifier_bind(self) -> None:
        bind = getattr(self._notifier, "bind", None)
        if callable(bind):
            bind(self)

    async def open(self) -> None:
        """Open every backend and the HTTP client pool."""
        if self._opened:
            return
        await self.storage.open()
        await self.queue.open()
        await self.blobs.open()
        from csvimg.fetch import Fetcher

        self._fetcher = Fetcher(self.settings.fetch)
        await self._fetcher.__aenter__()
        self._opened = True

    async def close(self) -> None:
        """Close everything `open` opened."""
        if not self._opened:
            return
        self._opened = False
        if self._fetcher is not None:
            await self._fetcher.__aexit__(None, None, None)
            self._fetcher = None
        if self._notifier is not None:
            await self._notifier.close()
        await self.blobs.close()
        await self.queue.close()
        await self.storage.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def fetcher(self) -> Fetcher:
        """The shared, guarded HTTP client (the engine must be open)."""
        if self._fetcher is None:
            raise CsvimgError("the engine is not open: use 'async with Engine(...)'")
        return self._fetcher

    def on_item(self, callback: Callable[[Item, ItemResult], Any]) -> None:
        """Call *callback(item, result)* in the worker after each item finishes."""
        self._on_item.append(callback)

    def on_timing(self, callback: Callable[[str, float], Any]) -> None:
        """Call *callback(stage, seconds)* after each ``"fetch"`` and ``"codec"`` step.

        Failed steps are timed too (a timeout shows up as a slow fetch).
        """
        self._on_timing.append(callback)

    def on_request_finished(self, callback: Callable[[Request], Any]) -> None:
        """Call *callback(request)* when this engine's worker finishes a request."""
        self._on_request_finished.append(callback)

    def _timed(self, stage: str, started: float) -> None:
        seconds = time.perf_counter() - started
        for callback in self._on_timing:
            callback(stage, seconds)

    # -- submitting -------------------------------------------------------

    async def parse(self, source: CsvSource) -> Manifest:
        """Parse and validate a CSV off the event loop; raises `ManifestError`."""
        limits = self.settings.manifest
        return await anyio.to_thread.run_sync(lambda: parse_manifest(source, limits))

    async def submit(
        self,
        source: CsvSource | Manifest,
        *,
        callback_url: str | None = None,
        options: ProcessOptions | None = None,
        owner: str | None = None,
        filename: str | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Validate a CSV, store it as a new request and queue its images.

        Raises `ManifestError` (with every problem) for an invalid CSV and
        `StorageError` when the request could not be stored; in both cases
        nothing is stored.
        """
        manifest = source if isinstance(source, Manifest) else await self.parse(source)
        rid = request_id or new_id()
        total = manifest.total_urls
        at = now()
        request = Request(
            id=rid,
            created_at=at,
            updated_at=at,
            total=total,
            header=manifest.header,
            url_column=manifest.url_column,
            callback_url=callback_url,
            options=options or self.settings.options,
            owner=owner,
            filename=filename,
        )
        # The storage derives the items from the rows (no Item objects), and
        # the queue gets their ids as a lazy range, not a list of 300,000.
        await self.storage.create_request(request, manifest.rows)
        try:
            await self.queue.enqueue(ItemIds(rid, total))
        except CsvimgError as exc:
            # The request is stored for good: answering with an error would
            # make the client upload it twice. The sweeper enqueues items left
            # PENDING (see `sweep`), so nothing is lost, only delayed.
            log.error("request %s stored but not enqueued (the sweeper will): %s", rid, exc,
                      extra={"request_id": rid})
        log.info("request %s accepted: %d rows, %d images", rid, len(manifest.rows), total,
                 extra={"request_id": rid})
        return request

    # -- reading ----------------------------------------------------------

    async def get_request(self, request_id: str) -> Request:
        """Return the request or raise `NotFoundError`."""
        request = await self.storage.get_request(request_id)
        if request is None:
            raise NotFoundError(f"no request {request_id!r}")
        return request

    async def wait(
        self, request_id: str, *, timeout: float | None = None, poll: float = 0.05
    ) -> Request:
        """Poll until the request finishes; `TimeoutError` after *timeout* seconds."""
        with anyio.fail_after(timeout):
            while True:
                request = await self.get_request(request_id)
                if request.status.finished:
                    return request
                await anyio.sleep(poll)

    def image_url(self, item: Item, base_url: str | None = None) -> str | None:
        """The public URL of an item's output image (None if it has none)."""
        if item.output_key is None:
            return None
        base = (base_url or self.settings.public_url or "").rstrip("/")
        return f"{base}{IMAGES_PATH}{item.output_key}"

    async def output_csv(
        self,
        request_id: str,
        *,
        url_for: Callable[[Item], str | None] | None = None,
        page: int = 2000,
    ) -> AsyncIterator[bytes]:
        """Stream the output CSV: input rows unchanged plus ``Output Image Urls``.

        Each output cell holds one URL per input URL, in the same order,
        comma-separated; a failed image leaves its entry empty. Every cell
        is neutralised against formula injection. Raises
        `NotFinishedError` while the request is still running.
        """
        request = await self.get_request(request_id)
        if not request.status.finished:
            raise NotFinishedError(
                f"request {request_id} is {request.status.value}: "
                f"{request.finished_items} of {request.total} images finished"
            )
        to_url = url_for or self.image_url
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\r\n")
        writer.writerow([neutralise(c) for c in (*request.header, OUTPUT_COLUMN)])
        row_offset = 0
        item_offset = 0
        pending: list[Item] = []
        while True:
            rows = await self.storage.list_rows(request_id, offset=row_offset, limit=page)
            if not rows:
                break
            row_offset += len(rows)
            needed = sum(len(r.urls) for r in rows)
            while len(pending) < needed:
                more = await self.storage.list_items(
                    request_id, offset=item_offset, limit=max(page, needed - len(pending))
                )
                if not more:
                    raise StorageError(f"request {request_id}: items missing for output CSV")
                item_offset += len(more)
                pending.extend(more)
            taken = 0
            for row in rows:
                row_items = pending[taken : taken + len(row.urls)]
                taken += len(row.urls)
                urls = ",".join((to_url(i) or "") if i.output_key else "" for i in row_items)
                writer.writerow([neutralise(c) for c in (*row.cells, urls)])
            pending = pending[taken:]
            yield buf.getvalue().encode("utf-8")
            buf.seek(0)
            buf.truncate()
        if buf.tell():
            yield buf.getvalue().encode("utf-8")

    async def output_csv_bytes(self, request_id: str, **kwargs: Any) -> bytes:
        """Return the whole output CSV (see `output_csv`)."""
        return b"".join([c async for c in self.output_csv(request_id, **kwargs)])

    # -- processing -------------------------------------------------------

    async def compress(self, data: bytes, options: ProcessOptions) -> Compressed:
        """Compress in a codec thread (at most ``codec_threads`` at once)."""
        from csvimg.codec import compress

        limits = self.settings.codec
        return await anyio.to_thread.run_sync(
            lambda: compress(data, options, limits), limiter=self._codec_limiter
        )

    async def _produce(
        self,
        item: Item,
        request: Request,
        downloaded: Callable[[int], None] | None = None,
    ) -> ItemResult:
        started = time.perf_counter()
        try:
            fetched = await self.fetcher.fetch(item.url, first_chunk_check=sniff)
        finally:
            self._timed("fetch", started)
        if downloaded is not None:
            downloaded(len(fetched.data))
        started = time.perf_counter()
        try:
            out = await self.compress(fetched.data, request.options)
        finally:
            self._timed("codec", started)
        seq = item.id.rsplit(".", 1)[-1]
        key = f"{request.id}/{seq}.{out.extension}"
        try:
            await self.blobs.put(key, out.data, content_type=out.content_type)
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

    async def process_item(self, item_id: str) -> bool:
        """Process one item end to end; `process_items` for one id.

        Returns True: the item needs no more work from this caller (done
        now, finished already, given up, or held by another live worker).
        Raises `StorageError` when storage failed, so the caller can try
        again later (a Celery task retries with a back-off). Safe to call
        twice for the same item (at-least-once queues).
        """
        failed = await self.process_items([item_id])
        if failed:
            raise failed[0][1]
        return True

    async def process_items(
        self, item_ids: Sequence[str], *, concurrency: int | None = None
    ) -> list[tuple[str, StorageError]]:
        """Run *item_ids* through the worker pipeline, without a queue; return the failures.

        The same pipeline as `run_worker` (one `StartItems` per round,
        overlapping downloads up to *concurrency*, codec threads, the group
        commit, one task keeping the leases), fed from the list instead of
        a queue: what a task of a push queue (Celery) runs. Returns the ids
        whose storage failed, with the error; they were not recorded and
        should be tried again later.
        """
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return []
        source = _Batch(ids)
        limit = concurrency or self.settings.concurrency
        worker = _Worker(self, max(1, min(limit, len(ids))), source)
        await worker.run(anyio.Event(), 0.0)
        return source.failed

    async def _start_items(self, item_ids: Sequence[str]) -> list[Item]:
        """Lease *item_ids* (the ledger's `StartItems`); return those that started.

        An item past ``max_attempts`` is failed by the same write instead;
        it is reported here, and so is a request that write finished.
        """
        s = self.settings
        op = ledger.StartItems(
            tuple(item_ids), at=now(), lease_seconds=s.lease_seconds, max_attempts=s.max_attempts
        )
        changes = await self.storage.apply(op)
        for item in changes.items:
            if item.status.finished:
                self._report_item(item, item.result)
        for request in changes.finished:
            self._report_finished(request)
        return list(changes.started)

    async def _finish_items(self, results: Sequence[tuple[Item, ItemResult]]) -> None:
        """Record results (the ledger's `FinishItems`); report items and finished requests."""
        op = ledger.FinishItems([(item.id, result) for item, result in results], at=now())
        changes = await self.storage.apply(op)
        for item, result in results:
            self._report_item(item, result)
        for request in changes.finished:
            self._report_finished(request)

    def _report_item(self, item: Item, result: ItemResult) -> None:
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
        for callback in self._on_item:
            callback(item, result)

    def _report_finished(self, finished: Request) -> None:
        """Log a finished request and call the `on_request_finished` callbacks."""
        log.info(
            "request %s %s: %d done, %d failed",
            finished.id, finished.status.value, finished.done, finished.failed,
            extra={"request_id": finished.id},
        )
        for on_finished in self._on_request_finished:
            on_finished(finished)

    async def _outcome(
        self,
        item: Item,
        request: Request,
        downloaded: Callable[[int], None] | None = None,
    ) -> ItemResult:
        """Fetch, compress and store one item; every failure but `StorageError` is a result.

        *downloaded(size)* is called once the image's bytes are in memory,
        before the codec step.
        """
        try:
            return await self._produce(item, request, downloaded)
        except ItemError as exc:
            return ItemResult.failure(exc.code, exc.message)
        except StorageError:
            raise
        except Exception as exc:
            log.exception("item %s of request %s: unexpected error", item.id, request.id,
                          extra={"request_id": request.id, "item_id": item.id,
                                 "error_code": "internal-error"})
            return ItemResult.failure("internal-error", f"{type(exc).__name__}: {exc}")

    async def sweep(self) -> int:
        """Re-enqueue items that fell out of the queue (dead workers, crashes).

        Returns how many ids were enqueued again.
        """
        s = self.settings
        at = now()
        op = ledger.Sweep(now=at, pending_before=at - s.stale_after, limit=10_000)
        ids = (await self.storage.apply(op)).ids
        if ids:
            await self.queue.enqueue(ids)
            log.info("re-enqueued %d stale items", len(ids))
        return len(ids)

    async def run_worker(
        self,
        *,
        stop: anyio.Event | None = None,
        concurrency: int | None = None,
        claim_wait: float = 1.0,
        sweep: bool = True,
        deliver: bool = True,
    ) -> None:
        """Process queued items until cancelled or *stop* is set.

        On *stop*, no new item is claimed and in-flight items finish; when
        cancelled, in-flight items are abandoned and their leases bring them
        back to another worker. Also runs the sweeper and, when *deliver*,
        the outbox delivery loop.

        Storage and queue are used in batches: the ids of one claim are
        started with one `csvimg.ledger.StartItems`; finished items are
        recorded by a group-commit task (one `csvimg.ledger.FinishItems`,
        then one `Queue.ack_many`, for everything finished since its last
        round); one task extends every lease this worker holds.
        `process_items` runs the same pipeline on a list of ids.
        """
        worker = _Worker(self, concurrency or self.settings.concurrency)
        async with anyio.create_task_group() as outer:
            if sweep:
                outer.start_soon(self._sweep_loop)
            if deliver and self.notifier is not None:
                outer.start_soon(self.run_outbox)
            await worker.run(stop or anyio.Event(), claim_wait)
            outer.cancel_scope.cancel()

    async def _sweep_loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except StorageError as exc:
                log.error("sweep failed: %s", exc)
            await anyio.sleep(self.settings.sweep_interval)

    async def run_outbox(self) -> None:
        """Deliver due outbox events until cancelled (webhooks and other notifiers)."""
        notifier = self.notifier
        if notifier is None:
            return
        await notifier.open()
        s = self.settings
        while True:
            try:
                op = ledger.LeaseEvents(
                    now=now(), limit=20, lease_seconds=max(60.0, 4 * s.webhook_timeout)
                )
                events: Sequence[Event] = (await self.storage.apply(op)).events
            except StorageError as exc:
                log.error("outbox unavailable: %s", exc)
                events = []
            try:
                for event in events:
                    request = await self.storage.get_request(event.request_id)
                    if request is None:  # pragma: no cover - storage keeps them together
                        await self.storage.apply(ledger.RescheduleEvent(event.id, None))
                        continue
                    try:
                        next_at = await notifier.deliver(event, request)
                    except Exception:
                        log.exception("event %s: notifier failed", event.id,
                                      extra={"event_id": event.id,
                                             "request_id": event.request_id})
                        next_at = now() + s.webhook_schedule[0] if s.webhook_schedule else None
                    await self.storage.apply(ledger.RescheduleEvent(event.id, next_at))
            except StorageError as exc:
                # The claimed events come back when their lease ends.
                log.error("outbox: storage failed, retrying: %s", exc)
                events = []
            if not events:
                await anyio.sleep(s.outbox_interval)

    async def run_until_finished(
        self, request_id: str, *, timeout: float | None = None
    ) -> Request:
        """Run a worker in this task until *request_id* finishes; return it."""
        result: Request | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: self.run_worker(claim_wait=0.2))
            try:
                result = await self.wait(request_id, timeout=timeout)
            finally:
                tg.cancel_scope.cancel()
        assert result is not None
        return result

    async def items(self, request_id: str, *, offset: int = 0, limit: int = 100) -> list[Item]:
        """Per-image results of a request, in CSV order; `NotFoundError` if unknown."""
        await self.get_request(request_id)
        return await self.storage.list_items(request_id, offset=offset, limit=limit)

    async def ready(self) -> dict[str, str]:
        """Ping storage and queue; return ``{"storage": "ok"|error, "queue": ...}``."""
        out: dict[str, str] = {}
        for name, backend in (("storage", self.storage), ("queue", self.queue)):
            try:
                with anyio.fail_after(5):
                    await backend.ping()
                out[name] = "ok"
            except (CsvimgError, TimeoutError, OSError) as exc:
                out[name] = f"error: {exc}"
        return out


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
                started = await engine._start_items([c.item_id for c in claims])
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
                    result = await engine._outcome(item, request, downloaded)
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
                await engine._finish_items(results)
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


def _loggable(url: str) -> str:
    """Strip userinfo and query (they may carry secrets) from a URL for logs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url[:200]
    netloc, slash, path = rest.partition("/")
    netloc = netloc.rpartition("@")[2]
    path = path.split("?", 1)[0].split("#", 1)[0]
    return f"{scheme}://{netloc}{slash}{path}"[:200]

