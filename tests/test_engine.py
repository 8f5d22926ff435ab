"""`import csvimg` end to end: memory backends, a real image host, real images."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

import anyio
import pytest
from PIL import Image

import csvimg
from csvimg import (
    ConfigError,
    Engine,
    ItemStatus,
    ManifestError,
    NotFinishedError,
    RequestStatus,
    Settings,
    StorageError,
    ledger,
)
from csvimg.fetch import FetchPolicy, parse_allow
from csvimg.testing import claim_events, start_item
from images import photo, photo_jpeg
from servers import ImageHost

pytestmark = pytest.mark.anyio


def _photo_png(width: int, height: int) -> bytes:
    im = photo(width, height).convert("RGBA")
    im.putalpha(200)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def host() -> Iterator[ImageHost]:
    with ImageHost() as h:
        h.add("/a.jpg", photo_jpeg(640, 480, quality=92), content_type="image/jpeg")
        h.add("/b.png", _photo_png(300, 200), content_type="image/png")
        h.add("/c.jpg", photo_jpeg(800, 600, quality=95), content_type="image/jpeg")
        h.add("/page.html", b"<html><body>not an image</body></html>", content_type="text/html")
        yield h


def _settings(host: ImageHost, **kw: object) -> Settings:
    fetch = FetchPolicy(allow=parse_allow(host.allow), retries=0)
    return Settings(fetch=fetch, public_url="http://img.example", **kw)  # type: ignore[arg-type]


def _csv(rows: list[tuple[str, str, str]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["S. No.", "Product Name", "Input Image Urls"])
    w.writerows(rows)
    return buf.getvalue().encode()


async def test_end_to_end_with_memory_backends(host: ImageHost) -> None:
    data = _csv(
        [
            ("1", "SKU1", f"{host.url('/a.jpg')},{host.url('/b.png')}"),
            ("2", "=HYPERLINK(\"x\")", host.url("/missing.jpg")),
            ("3", "SKU3", f"{host.url('/c.jpg')},{host.url('/page.html')},{host.url('/a.jpg')}"),
        ]
    )
    async with Engine(_settings(host)) as engine:
        request = await engine.submit(data, filename="products.csv")
        assert request.status is RequestStatus.PENDING and request.total == 6
        with pytest.raises(NotFinishedError):
            await engine.output_csv_bytes(request.id)
        finished = await engine.run_until_finished(request.id, timeout=60)
        assert finished.status is RequestStatus.COMPLETED
        assert (finished.done, finished.failed) == (4, 2)

        items = await engine.items(request.id)
        positions = [(i.row, i.position) for i in items]
        assert positions == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2)]
        by_url = {i.url.rsplit("/", 1)[1]: i for i in items}
        assert by_url["missing.jpg"].error_code == "http-404"
        assert by_url["page.html"].error_code == "not-an-image"
        assert all(i.status is ItemStatus.DONE for i in items if i.error_code is None)

        out = (await engine.output_csv_bytes(request.id)).decode()
        rows = list(csv.reader(io.StringIO(out)))
        assert rows[0] == ["S. No.", "Product Name", "Input Image Urls", "Output Image Urls"]
        assert [r[0] for r in rows[1:]] == ["1", "2", "3"]
        assert rows[2][1] == "'=HYPERLINK(\"x\")"  # neutralised
        assert rows[1][2] == f"{host.url('/a.jpg')},{host.url('/b.png')}"  # input unchanged
        out_urls = [r[3].split(",") for r in rows[1:]]
        assert [len(u) for u in out_urls] == [2, 1, 3]
        assert out_urls[1] == [""] and out_urls[2][1] == ""
        sources = {"a.jpg": host_bytes(host, "/a.jpg"), "b.png": host_bytes(host, "/b.png"),
                   "c.jpg": host_bytes(host, "/c.jpg")}
        for row_urls, row_items in ((out_urls[0], items[0:2]), (out_urls[2], items[3:6])):
            for url, item in zip(row_urls, row_items, strict=True):
                if item.output_key is None:
                    continue
                assert url == f"http://img.example/api/v1/images/{item.output_key}"
                blob = await engine.blobs.get(item.output_key)
                with Image.open(io.BytesIO(blob)) as im:
                    assert im.format == "JPEG"
                    src = Image.open(io.BytesIO(sources[item.url.rsplit("/", 1)[1]]))
                    assert im.size == src.size  # right image in the right place
                assert len(blob) < len(sources[item.url.rsplit("/", 1)[1]])
                assert item.bytes_out == len(blob)


def host_bytes(host: ImageHost, path: str) -> bytes:
    import httpx

    return httpx.get(host.url(path)).content


async def test_invalid_csv_stores_nothing(host: ImageHost) -> None:
    async with Engine(_settings(host)) as engine:
        with pytest.raises(ManifestError) as info:
            await engine.submit(b"S. No.,Product Name,Input Image Urls\n1,,ftp://x/y.jpg\n")
        codes = {p.code for p in info.value.errors}
        assert codes == {"blank-product-name", "bad-scheme"}
        assert await engine.storage.list_requests() == []
        assert await engine.queue.depth() == 0


async def test_dead_worker_item_is_picked_up_again(host: ImageHost) -> None:
    """A worker that claims an item and vanishes: the lease brings it back."""
    settings = _settings(host, lease_seconds=0.5)
    async with Engine(settings) as engine:
        request = await engine.submit(_csv([("1", "A", host.url("/a.jpg"))]))
        # the "dead" worker: claims and starts the item, never finishes it
        [claim] = await engine.queue.claim(consumer="dead", max_items=1, lease_seconds=0.5, wait=1)
        started = await start_item(engine.storage, claim.item_id, lease_seconds=0.5)
        assert started is not None and started.attempts == 1
        finished = await engine.run_until_finished(request.id, timeout=30)
        assert (finished.done, finished.failed) == (1, 0)
        [item] = await engine.items(request.id)
        assert item.attempts == 2 and item.status is ItemStatus.DONE


async def test_item_processed_twice_counts_once(host: ImageHost) -> None:
    async with Engine(_settings(host)) as engine:
        request = await engine.submit(_csv([("1", "A", host.url("/a.jpg"))]))
        [item] = await engine.items(request.id)
        await engine.queue.enqueue([item.id])  # a duplicate delivery
        finished = await engine.run_until_finished(request.id, timeout=30)
        await anyio.sleep(0.2)
        again = await engine.get_request(request.id)
        assert (finished.done, again.done, again.failed) == (1, 1, 0)
        assert await engine.process_item(item.id) is True  # harmless now
        assert (await engine.get_request(request.id)).done == 1


async def test_all_failed_request_is_failed(host: ImageHost) -> None:
    async with Engine(_settings(host)) as engine:
        request = await engine.submit(_csv([("1", "A", host.url("/nope.jpg"))]))
        finished = await engine.run_until_finished(request.id, timeout=30)
        assert finished.status is RequestStatus.FAILED
        events = await claim_events(engine.storage, now=1e12, limit=10, lease_seconds=10)
        assert [e.type for e in events] == ["request.failed"]


class _StorageOnlyPlugin:
    """Registers a storage scheme and no queue: it asks for the in-process memory queue."""

    @csvimg.hookimpl
    def csvimg_register_backends(self, registry: csvimg.BackendRegistry) -> None:
        from csvimg.backends.memory import MemoryStorage

        registry.add_storage("kv", lambda url, settings: MemoryStorage(), queue="memory")


async def test_storage_only_plugin_runs_on_the_memory_queue(host: ImageHost) -> None:
    plugins = csvimg.Plugins(load_entrypoints=False, extra=[_StorageOnlyPlugin()])
    async with Engine(_settings(host, storage_url="kv://x"), plugins=plugins) as engine:
        request = await engine.submit(_csv([("1", "A", host.url("/a.jpg"))]))
        finished = await engine.run_until_finished(request.id, timeout=30)
        assert finished.status is RequestStatus.COMPLETED and finished.done == 1


async def test_poison_item_gives_up_after_max_attempts(host: ImageHost) -> None:
    settings = _settings(host, lease_seconds=0.05, max_attempts=2)
    async with Engine(settings) as engine:
        request = await engine.submit(_csv([("1", "A", host.url("/a.jpg"))]))
        [item] = await engine.items(request.id)
        for _ in range(2):  # two workers die holding it
            assert await start_item(engine.storage, item.id, lease_seconds=0.05) is not None
            await anyio.sleep(0.1)
        assert await engine.process_item(item.id)
        [failed] = await engine.items(request.id)
        assert failed.error_code == "too-many-attempts"


def test_sync_embedding_example(host: ImageHost, tmp_path: object) -> None:
    """The README's library example, with anyio.run."""

    async def main() -> bytes:
        async with csvimg.Engine(_settings(host)) as engine:
            request = await engine.submit(_csv([("1", "A", host.url("/a.jpg"))]))
            await engine.run_until_finished(request.id, timeout=30)
            return await engine.output_csv_bytes(request.id)

    out = anyio.run(main)
    assert b"Output Image Urls" in out


async def test_sweep_requeues_items_lost_between_store_and_enqueue(host: ImageHost) -> None:
    """A process that dies after storing a request but before enqueuing it."""
    settings = _settings(host, stale_after=0.2)
    assert Settings.from_env({"CSVIMG_STALE_AFTER": "0.2"}).stale_after == 0.2
    async with Engine(settings) as engine:
        manifest = await engine.parse(_csv([("1", "A", host.url("/a.jpg"))]))
        request = await engine.submit(manifest)
        # lose the queue message, as a crash right after storing would
        [claim] = await engine.queue.claim(consumer="x", max_items=1, lease_seconds=60, wait=1)
        await engine.queue.ack_many([claim])
        assert await engine.sweep() == 0  # not stale yet
        await anyio.sleep(0.3)
        assert await engine.sweep() == 1
        assert await engine.sweep() == 0  # touched: not returned twice in a window
        finished = await engine.run_until_finished(request.id, timeout=30)
        assert (finished.done, finished.failed) == (1, 0)


class _Counting:
    """Wraps a backend, counts calls by name (`apply` by the operation's type)."""

    def __init__(self, inner: object) -> None:
        self._inner = inner
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> object:
        attr = getattr(self._inner, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args: object, **kwargs: object) -> object:
            key = type(args[0]).__name__ if name == "apply" else name
            self.calls[key] = self.calls.get(key, 0) + 1
            return attr(*args, **kwargs)

        return call


async def test_worker_uses_batch_operations(host: ImageHost) -> None:
    """The worker starts, finishes, extends and acknowledges in batches."""
    from csvimg.backends.memory import MemoryQueue, MemoryStorage

    storage = _Counting(MemoryStorage())
    queue = _Counting(MemoryQueue())
    settings = _settings(host, lease_seconds=1.5)  # the lease keeper runs every 0.5 s
    async with Engine(settings, storage=storage, queue=queue) as engine:  # type: ignore[arg-type]
        host.add("/slow.jpg", photo_jpeg(320, 240), content_type="image/jpeg", delay=0.8)
        urls = [host.url("/a.jpg"), host.url("/c.jpg"), host.url("/slow.jpg"), host.url("/x.jpg")]
        rows = [(str(n), f"P{n}", url) for n, url in enumerate(urls, 1)]
        request = await engine.submit(_csv(rows))
        [item] = [i for i in await engine.items(request.id) if i.url.endswith("/a.jpg")]
        await engine.queue.enqueue([item.id])  # a duplicate delivery: started once
        finished = await engine.run_until_finished(request.id, timeout=30)
        assert (finished.done, finished.failed) == (3, 1)
        await anyio.sleep(0.3)
        assert await engine.queue.depth() == 0  # every copy acked
        events = await claim_events(engine.storage, now=1e12, limit=10, lease_seconds=10)
        assert [e.type for e in events] == ["request.completed"]
    used = {**storage.calls, **queue.calls}
    assert used["StartItems"] >= 1 and used["FinishItems"] >= 1 and used["ack_many"] >= 1
    assert used.get("ExtendLeases", 0) >= 1 and used.get("extend_many", 0) >= 1


def test_engine_refuses_a_backend_missing_contract_methods() -> None:
    """A storage written for the old contract is refused at once, naming what it lacks."""

    class OldStorage:
        async def start_item(self, item_id: str, *, lease_seconds: float) -> None: ...

    with pytest.raises(ConfigError, match=r"storage backend OldStorage lacks .*apply"):
        Engine(Settings(), storage=OldStorage())  # type: ignore[arg-type]


async def test_stop_finishes_in_flight_items_and_records_them(host: ImageHost) -> None:
    """On *stop* the worker claims no more, but records and acks what it holds."""
    async with Engine(_settings(host)) as engine:
        host.add("/slow.jpg", photo_jpeg(320, 240), content_type="image/jpeg", delay=0.5)
        request = await engine.submit(_csv([("1", "A", host.url("/slow.jpg"))]))
        stop, fetched = anyio.Event(), anyio.Event()
        engine.on_timing(lambda stage, _: fetched.set() if stage == "fetch" else None)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: engine.run_worker(stop=stop, claim_wait=0.1))
                await fetched.wait()  # in flight: downloaded, not compressed yet
                stop.set()  # the worker returns by itself once the item is recorded
        done = await engine.get_request(request.id)
        assert (done.status, done.done) == (RequestStatus.COMPLETED, 1)
        assert await engine.queue.depth() == 0


@pytest.mark.parametrize("budget", [32 * 1024 * 1024, 1])
async def test_download_slot_freed_while_image_waits_for_codec(
    host: ImageHost, budget: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A downloaded image waiting for the codec frees its download slot, within the budget.

    With concurrency 1 and the codec held, the second download starts only
    if the first image's bytes fit the backlog budget; otherwise the slot
    stays taken (memory stays bounded) until the first image is done.
    """
    import csvimg.worker as worker_module

    monkeypatch.setattr(worker_module, "_BACKLOG_BYTES", budget)
    fetches: list[float] = []
    fetched = [anyio.Event(), anyio.Event()]  # set by the first and second download
    release = anyio.Event()
    async with Engine(_settings(host, concurrency=1)) as engine:
        real_compress = engine.compress

        async def held_compress(data: bytes, options: csvimg.ProcessOptions) -> object:
            await release.wait()
            return await real_compress(data, options)

        monkeypatch.setattr(engine, "compress", held_compress)
        def on_timing(stage: str, _: float) -> None:
            if stage == "fetch":
                fetches.append(1)
                fetched[min(len(fetches), 2) - 1].set()

        engine.on_timing(on_timing)
        request = await engine.submit(
            _csv([("1", "A", host.url("/a.jpg")), ("2", "B", host.url("/c.jpg"))])
        )
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: engine.run_worker(claim_wait=0.1))
                await fetched[0].wait()
                if budget > 1:
                    await fetched[1].wait()  # the second download ran meanwhile
                else:
                    await anyio.sleep(0.5)
                    assert len(fetches) == 1  # no room: the slot stayed taken
                release.set()
                done = await engine.wait(request.id, timeout=15)
                tg.cancel_scope.cancel()
        assert (done.status, done.done) == (RequestStatus.COMPLETED, 2)


async def test_process_items_runs_the_worker_pipeline_without_a_queue(host: ImageHost) -> None:
    """A push queue's task (Celery) runs ids through the same pipeline, in batches."""
    from csvimg.backends.memory import MemoryStorage

    storage = _Counting(MemoryStorage())
    async with Engine(_settings(host), storage=storage) as engine:  # type: ignore[arg-type]
        urls = [host.url("/a.jpg"), host.url("/c.jpg"), host.url("/x.jpg")]
        request = await engine.submit(_csv([(str(n), "P", u) for n, u in enumerate(urls, 1)]))
        ids = [i.id for i in await engine.items(request.id)]
        storage.calls.clear()
        assert await engine.process_items([*ids, ids[0]]) == []  # a repeat starts once
        done = await engine.get_request(request.id)
        assert (done.status, done.done, done.failed) == (RequestStatus.COMPLETED, 2, 1)
        assert storage.calls["StartItems"] == 1  # all three in one start
        assert await engine.process_items(ids) == []  # finished already: nothing to do
        assert await engine.process_item(ids[0]) is True


async def test_process_item_raises_when_storage_fails(host: ImageHost) -> None:
    """A storage failure is not swallowed: the caller (a Celery task) retries later."""
    from csvimg.backends.memory import MemoryStorage

    class Failing(MemoryStorage):
        async def apply(self, op: ledger.Operation) -> ledger.Changes:
            if isinstance(op, ledger.FinishItems):
                raise StorageError("disk full")
            return await super().apply(op)

    async with Engine(_settings(host), storage=Failing()) as engine:
        request = await engine.submit(_csv([("1", "P", host.url("/a.jpg"))]))
        [item] = await engine.items(request.id)
        with pytest.raises(StorageError, match="disk full"):
            await engine.process_item(item.id)
        failed = await engine.process_items([item.id])
        assert [i for i, _ in failed] == []  # still leased by the first call: not started
        [again] = await engine.items(request.id)
        assert again.status is ItemStatus.PROCESSING  # comes back when its lease ends
