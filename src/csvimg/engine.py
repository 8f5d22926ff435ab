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

from csvimg import ledger, outbox, webhooks
from csvimg._errors import (
    CsvimgError,
    NotFinishedError,
    NotFoundError,
    StorageError,
)
from csvimg.backends import BlobInfo, BlobStore, Notifier, Queue, Storage, check_backend
from csvimg.jobs import (
    Delivery,
    Item,
    ItemIds,
    ItemResult,
    ProcessOptions,
    Request,
    Row,
    Webhook,
    new_id,
    now,
)
from csvimg.manifest import Manifest, parse_manifest
from csvimg.output import OUTPUT_COLUMN, neutralise, write_output_csv
from csvimg.plugins import Plugins
from csvimg.settings import Settings
from csvimg.urls import DefaultUrls, PublicUrls
from csvimg.worker import _BACKLOG_BYTES as _BACKLOG_BYTES
from csvimg.worker import _FLUSH_MAX as _FLUSH_MAX
from csvimg.worker import _REQUEST_CACHE as _REQUEST_CACHE
from csvimg.worker import _Batch, _Worker

if TYPE_CHECKING:
    # Pillow and aiohttp load when first used, not with the engine.
    from csvimg.codec import Compressed
    from csvimg.fetch import Fetcher

__all__ = ["IMAGES_PATH", "OUTPUT_COLUMN", "Engine", "neutralise"]

log = logging.getLogger("csvimg.engine")

IMAGES_PATH = "/api/v1/images/"
"""Where the reference server serves output images: ``<public_url>/api/v1/images/<key>``.

Kept for compatibility: the engine builds URLs with `Engine.urls`
(`csvimg.urls.DefaultUrls` by default), not with this constant.
"""


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
        urls: PublicUrls | None = None,
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
        self.urls: PublicUrls = urls or DefaultUrls()
        """Builds the public URLs of images and output CSVs (`csvimg.urls`)."""
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

    def _base(self, base_url: str | None) -> str:
        return (base_url or self.settings.public_url or "").rstrip("/")

    def image_url(self, item: Item, base_url: str | None = None) -> str | None:
        """The public URL of an item's output image (None if it has none).

        Built by `urls` under *base_url*, else ``Settings.public_url``.
        """
        if item.output_key is None:
            return None
        return self.urls.image_url(item.output_key, self._base(base_url))

    def output_csv_url(self, request_id: str, base_url: str | None = None) -> str:
        """The public URL of a request's output CSV (built by `urls`, like `image_url`)."""
        return self.urls.output_csv_url(request_id, self._base(base_url))

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
        async for chunk in write_output_csv(self.storage, request, to_url, page=page):
            yield chunk

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
        await outbox.run_outbox(self)

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

    async def rows(self, request_id: str, *, offset: int = 0, limit: int = 1000) -> list[Row]:
        """Input rows of a request, in upload order; `NotFoundError` if unknown."""
        await self.get_request(request_id)
        return await self.storage.list_rows(request_id, offset=offset, limit=limit)

    async def deliveries(self, request_id: str) -> list[Delivery]:
        """Webhook delivery attempts of a request, oldest first; `NotFoundError` if unknown."""
        await self.get_request(request_id)
        return await self.storage.list_deliveries(request_id)

    async def image_info(self, key: str) -> BlobInfo:
        """What the blob store knows of the output image *key*; `NotFoundError` if missing.

        A key the store itself refuses (`ValueError`) counts as missing.
        """
        try:
            info = await self.blobs.stat(key)
        except ValueError:  # NotFoundError is a KeyError, not a ValueError
            info = None
        if info is None:
            raise NotFoundError(f"no image {key[:200]!r}")
        return info

    async def image(self, key: str) -> bytes:
        """The bytes of the output image *key*; `NotFoundError` if missing."""
        return await self.blobs.get(key)

    async def queue_depth(self) -> int:
        """How many item ids wait in the queue or are leased (may be approximate)."""
        return await self.queue.depth()

    # -- webhook registrations --------------------------------------------

    async def check_callback_url(self, url: str) -> str:
        """Validate a receiver URL under ``Settings.fetch`` (the SSRF guard); return it normalised.

        Raises `CallbackUrlError` when it is not http(s) or its host
        resolves to an address the fetch policy refuses
        (`csvimg.webhooks.check_callback_url`).
        """
        return await webhooks.check_callback_url(url, self.settings.fetch)

    async def add_webhook(self, url: str, *, owner: str | None = None) -> Webhook:
        """Register a receiver of *owner*'s events; return it, with its new secret.

        *url* is checked by `check_callback_url` (`CallbackUrlError`); the
        id is `csvimg.webhooks.new_webhook_id`, the secret
        `csvimg.webhooks.new_secret` (show it once: listing omits nothing,
        but an HTTP API should not send it again).
        """
        checked = await self.check_callback_url(url.strip())
        webhook = Webhook(
            id=webhooks.new_webhook_id(), url=checked, secret=webhooks.new_secret(), owner=owner
        )
        await self.storage.add_webhook(webhook)
        return webhook

    async def webhooks(self, *, owner: str | None = None) -> list[Webhook]:
        """*owner*'s registrations, active or not (None: the ownerless ones)."""
        return await self.storage.list_webhooks(owner=owner)

    async def delete_webhook(self, webhook_id: str, *, owner: str | None = None) -> None:
        """Delete *owner*'s registration *webhook_id*; `NotFoundError` if there is none.

        An id without the form of one (`csvimg.webhooks.is_webhook_id`) is
        not looked up.
        """
        if not webhooks.is_webhook_id(webhook_id) or not await self.storage.delete_webhook(
            webhook_id, owner=owner
        ):
            raise NotFoundError(f"no webhook {webhook_id[:64]!r}")

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
