"""SQLite backends: what the contract suite cannot see.

Several processes and threads on one file, reopening, lock waits and
timeouts, URL parsing, bulk inserts, broken files.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from csvimg._errors import ConfigError, StorageError
from csvimg.backends import sqlite as sqlite_module
from csvimg.backends.sqlite import SqliteQueue, SqliteStorage, parse_sqlite_url
from csvimg.backends.sqlite import storage as sqlite_storage
from csvimg.jobs import (
    Item,
    ItemIds,
    ItemResult,
    ItemStatus,
    Request,
    RequestStatus,
    Row,
    item_id,
    item_rows,
    new_id,
    now,
)
from csvimg.plugins import Plugins
from csvimg.settings import Settings
from csvimg.testing import (
    claimable_events,
    finish_item,
    finish_items,
    sample_request,
    stale_items,
    start_item,
    start_items,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "csvimg.db"


@pytest.fixture
async def storage(db: Path) -> AsyncIterator[SqliteStorage]:
    backend = SqliteStorage(db)
    await backend.open()
    yield backend
    await backend.close()


def _result(seq: int) -> ItemResult:
    if seq % 5 == 0:
        return ItemResult.failure("http-404", f"item {seq} is gone")
    return ItemResult(output_key=f"out/{seq}.jpg", content_type="image/jpeg", bytes_out=seq)


# -- URLs --------------------------------------------------------------------


def test_url_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path, busy = parse_sqlite_url("sqlite:///data/csvimg.db")
    assert path == tmp_path / "data" / "csvimg.db"
    assert busy == 30.0


def test_url_absolute_path_and_options() -> None:
    assert parse_sqlite_url("sqlite:////var/lib/csvimg.db") == (Path("/var/lib/csvimg.db"), 30.0)
    assert parse_sqlite_url("sqlite:////tmp/a%20b.db?busy_timeout=2.5") == (
        Path("/tmp/a b.db"),
        2.5,
    )


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///",
        "sqlite:///:memory:",
        "sqlite://host/x.db",
        "sqlite:///x.db?journal=off",
        "sqlite:///x.db?busy_timeout=soon",
        "sqlite:///x.db?busy_timeout=-1",
        "postgresql:///x.db",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_sqlite_url(url)


def test_registered_for_storage_and_queue(db: Path) -> None:
    plugins = Plugins(load_entrypoints=False)
    url = f"sqlite:///{db}"  # an absolute path after three slashes: four in all
    storage = plugins.storage(url, Settings())
    queue = plugins.queue(url, Settings())
    assert isinstance(storage, SqliteStorage)
    assert isinstance(queue, SqliteQueue)
    assert storage.path == queue.path == db


# -- durability ----------------------------------------------------------------


async def test_reopen_resumes_everything(db: Path) -> None:
    """A new instance (as in a new process) sees leases, counters, queue, events."""
    storage, queue = SqliteStorage(db), SqliteQueue(db)
    await storage.open()
    await queue.open()
    request, rows, items = sample_request(rows=2, urls_per_row=2)
    await storage.create_request(request, rows)
    await queue.enqueue([i.id for i in items])
    [claim] = await queue.claim(consumer="w1", max_items=1, lease_seconds=60, wait=0)
    leased = await start_item(storage, claim.item_id, lease_seconds=60)
    assert leased is not None
    await finish_item(storage, items[3].id, _result(3))
    await storage.close()
    await queue.close()

    storage, queue = SqliteStorage(db), SqliteQueue(db)
    await storage.open()
    await queue.open()
    try:
        assert await storage.get_item(leased.id) == leased
        assert await start_item(storage, leased.id, lease_seconds=60) is None
        stored = await storage.get_request(request.id)
        assert stored is not None
        assert (stored.status, stored.failed + stored.done) == (RequestStatus.PROCESSING, 1)
        assert await queue.depth() == 4
        others = await queue.claim(consumer="w2", max_items=10, lease_seconds=60, wait=0)
        assert sorted(c.item_id for c in others) == sorted(i.id for i in items[1:])
        for seq in range(3):
            await finish_item(storage, items[seq].id, _result(seq))
        assert len(await claimable_events(storage, request.id)) == 1
    finally:
        await storage.close()
        await queue.close()


async def test_closed_backend_raises_then_reopens(db: Path) -> None:
    storage = SqliteStorage(db)
    await storage.open()
    await storage.close()
    with pytest.raises(StorageError, match="closed"):
        await storage.ping()
    with pytest.raises(StorageError):
        await storage.get_request(new_id())
    await storage.open()
    await storage.ping()
    await storage.close()


async def test_duplicate_item_ids_write_nothing(storage: SqliteStorage, db: Path) -> None:
    """An item id already taken (a stray row) makes the whole create fail."""
    request, rows, items = sample_request(rows=2, urls_per_row=2)
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO items (id, request_id, seq, row, position, url, status, attempts, "
            "updated_at) VALUES (?, 'stray', 0, 0, 0, 'https://x/', 'PENDING', 0, 0)",
            (items[3].id,),
        )
    with pytest.raises(StorageError, match="duplicate item"):
        await storage.create_request(request, rows)
    assert await storage.get_request(request.id) is None
    assert await storage.list_rows(request.id) == []
    assert await storage.list_items(request.id) == []


@pytest.mark.parametrize("in_sql", [True, False])
async def test_items_derived_from_rows_either_way(
    storage: SqliteStorage, monkeypatch: pytest.MonkeyPatch, in_sql: bool
) -> None:
    """SQL-derived and tuple-inserted items are the same, chunk after chunk.

    Chunks of 3 rows; the second has a URL that JSON escapes and the fourth
    indexes that skip, so those take the tuple path even when SQL may derive.
    """
    monkeypatch.setattr(sqlite_storage, "_ROWS_PER_CHUNK", 3)
    monkeypatch.setattr(storage, "derive_items_in_sql", in_sql)
    with sqlite3.connect(":memory:") as probe:  # this SQLite can, so SQL does derive
        assert sqlite_module._sql_items_available(probe)
    rid = new_id()
    urls = [
        ("https://a.example/0",), ("https://a.example/1a", "https://a.example/1b"), (),
        ("https://a.example/caf\u00e9/\U0001f600.jpg",), ("https://a.example/4",),
        ("https://a.example/5",), ("https://a.example/6", "https://a.example/6b"),
        ("https://a.example/7",), ("https://a.example/8",),
        ("https://a.example/9",), ("https://a.example/12",), ("https://a.example/13",),
        ("https://a.example/14",),
    ]
    indexes = [*range(10), 12, 13, 14]
    rows = [Row(index=i, line=i + 2, cells=(str(i), "n", ",".join(u)), urls=u)
            for i, u in zip(indexes, urls, strict=True)]
    request = Request(id=rid, total=sum(len(u) for u in urls))
    await storage.create_request(request, rows)
    expected = [
        Item(id=item_id(rid, seq), request_id=rid, row=row, position=position, url=url,
             updated_at=request.created_at)
        for seq, row, position, url in item_rows(rows)
    ]
    assert await storage.list_items(rid, limit=100) == expected
    assert await storage.list_rows(rid) == rows
    for item in expected:
        assert await storage.get_item(item.id) == item


@pytest.mark.parametrize(
    "strings",
    [(), ("",), ("1", "Café ☕", 'say "hi", twice', "line\nbreak\t\x00", "\\", "\ud800"),
     ("https://a.example/1.jpg", "https://a.example/2.jpg?x=1&y=\u2028")],
)
def test_row_cells_encode_as_json_dumps_does(strings: tuple[str, ...]) -> None:
    """The rows table keeps json.dumps's format (old files, old readers)."""
    assert sqlite_module._dumps(strings) == json.dumps(list(strings))


async def test_old_item_indexes_are_replaced(db: Path) -> None:
    """A file made by an earlier version loses its three full item indexes."""
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE items (id TEXT PRIMARY KEY, request_id TEXT NOT NULL, "
            "seq INTEGER NOT NULL, row INTEGER NOT NULL, position INTEGER NOT NULL, "
            "url TEXT NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL, "
            "lease_until REAL, output_key TEXT, content_type TEXT, bytes_in INTEGER, "
            "bytes_out INTEGER, width INTEGER, height INTEGER, error_code TEXT, "
            "error_message TEXT, updated_at REAL NOT NULL)"
        )
        conn.execute("CREATE INDEX items_status_lease ON items (status, lease_until)")
        conn.execute("CREATE INDEX items_status_updated ON items (status, updated_at)")
        conn.execute("CREATE INDEX items_request_seq ON items (request_id, seq)")
        conn.execute(
            "INSERT INTO items (id, request_id, seq, row, position, url, status, attempts, "
            "updated_at) VALUES ('old.0', 'old', 0, 0, 0, 'https://x/', 'PENDING', 0, 1.0)"
        )
    storage = SqliteStorage(db)
    await storage.open()
    try:
        assert await stale_items(storage, now=now(), pending_before=2.0, limit=10) == ["old.0"]
    finally:
        await storage.close()
    with sqlite3.connect(db) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM items WHERE status = 'PROCESSING' "
            "AND lease_until < 1"
        ).fetchall()
    assert {"items_leased", "items_pending"} <= names
    assert not {"items_status_lease", "items_status_updated", "items_request_seq"} & names
    assert "items_leased" in str(plan)


async def test_bulk_insert(storage: SqliteStorage, db: Path) -> None:
    """100k items go in one transaction, quickly, and page back in order."""
    rid = new_id()
    rows = [
        Row(index=i, line=i + 2, cells=(str(i), f"p{i}", "u"), urls=(f"https://x/{i}/a",
                                                                    f"https://x/{i}/b"))
        for i in range(50_000)
    ]
    request = Request(id=rid, total=2 * len(rows))
    items = [
        Item(id=item_id(rid, 2 * r.index + p), request_id=rid, row=r.index, position=p, url=u,
             updated_at=request.created_at)
        for r in rows
        for p, u in enumerate(r.urls)
    ]
    start = time.perf_counter()
    await storage.create_request(request, rows)
    assert time.perf_counter() - start < 15  # about 1 s on a 2-core machine
    tail = await storage.list_items(rid, offset=99_990, limit=50)
    assert tail == items[99_990:]
    assert await storage.list_rows(rid, offset=49_999) == rows[49_999:]
    queue = SqliteQueue(db)
    await queue.open()
    try:
        await queue.enqueue(ItemIds(rid, len(items)))  # as Engine.submit does
        assert await queue.depth() == 100_000
        claims = await queue.claim(consumer="w", max_items=64, lease_seconds=60, wait=0)
        assert [c.item_id for c in claims] == [i.id for i in items[:64]]
    finally:
        await queue.close()


# -- concurrency across threads and processes ----------------------------------


def _finish_everything(path: str, request_id: str, total: int, seed: int) -> int:
    """Start and finish every item of a request in a random order; count wins."""

    async def run() -> int:
        storage = SqliteStorage(path)
        await storage.open()
        wins = 0
        order = list(range(total))
        random.Random(seed).shuffle(order)
        try:
            for seq in order:
                await start_item(storage, item_id(request_id, seq), lease_seconds=60)
                if await finish_item(storage, item_id(request_id, seq), _result(seq)) is not None:
                    wins += 1
        finally:
            await storage.close()
        return wins

    return anyio.run(run)


def _process_main(
    path: str, request_id: str, total: int, seed: int, barrier: threading.Barrier,
    results: multiprocessing.Queue[int],
) -> None:
    barrier.wait()
    results.put(_finish_everything(path, request_id, total, seed))


async def _check_finished_once(storage: SqliteStorage, request: Request, wins: list[int]) -> None:
    assert sum(wins) == 1
    stored = await storage.get_request(request.id)
    assert stored is not None
    failed = sum(1 for seq in range(request.total) if seq % 5 == 0)
    assert (stored.done, stored.failed) == (request.total - failed, failed)
    assert stored.status is RequestStatus.COMPLETED
    items = await storage.list_items(request.id, limit=request.total)
    assert all(i.status.finished for i in items)
    assert sum(1 for i in items if i.status is ItemStatus.FAILED) == failed
    assert len(await claimable_events(storage, request.id)) == 1


async def test_processes_finish_exactly_once(storage: SqliteStorage, db: Path) -> None:
    """Three processes race over every item of one request on one file."""
    request, rows, items = sample_request(rows=60, urls_per_row=2)
    await storage.create_request(request, rows)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    results: multiprocessing.Queue[int] = ctx.Queue()
    procs = [
        ctx.Process(
            target=_process_main,
            args=(str(db), request.id, len(items), seed, barrier, results),
        )
        for seed in range(3)
    ]
    for proc in procs:
        proc.start()
    try:
        wins = [await anyio.to_thread.run_sync(results.get, True, 60) for _ in procs]
    finally:
        for proc in procs:
            proc.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    await _check_finished_once(storage, request, wins)


async def test_threads_finish_exactly_once(storage: SqliteStorage, db: Path) -> None:
    """Four threads, each with its own event loop and connections, race too."""
    request, rows, items = sample_request(rows=50, urls_per_row=2)
    await storage.create_request(request, rows)
    wins: list[int] = []
    threads = [
        threading.Thread(
            target=lambda seed=seed: wins.append(
                _finish_everything(str(db), request.id, len(items), seed)
            )
        )
        for seed in range(4)
    ]
    for thread in threads:
        thread.start()

    def join() -> None:
        for thread in threads:
            thread.join(60)

    await anyio.to_thread.run_sync(join)
    assert len(wins) == 4
    await _check_finished_once(storage, request, wins)


async def test_queue_instances_share_the_table(db: Path) -> None:
    """A claim waiting in one instance sees what another instance enqueues."""
    waiting, feeder = SqliteQueue(db), SqliteQueue(db)
    await waiting.open()
    await feeder.open()
    got = []
    try:
        async with anyio.create_task_group() as tg:

            async def consume() -> None:
                got.extend(
                    await waiting.claim(consumer="w", max_items=5, lease_seconds=30, wait=5)
                )

            tg.start_soon(consume)
            await anyio.sleep(0.1)
            start = anyio.current_time()
            await feeder.enqueue(["x"])
        assert anyio.current_time() - start < 1.5  # one poll interval, not *wait*
        assert [c.item_id for c in got] == ["x"]
    finally:
        await waiting.close()
        await feeder.close()


# -- locks and broken files ----------------------------------------------------


def _hold_lock(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN EXCLUSIVE")
    return conn


async def test_writes_wait_for_a_lock(storage: SqliteStorage, db: Path) -> None:
    request, rows, items = sample_request(rows=1, urls_per_row=1)
    await storage.create_request(request, rows)
    holder = _hold_lock(db)
    timer = threading.Timer(0.4, holder.commit)
    timer.start()
    start = time.perf_counter()
    try:
        finished = await finish_item(storage, items[0].id, _result(1))
    finally:
        timer.join()
        holder.close()
    assert time.perf_counter() - start >= 0.3
    assert finished is not None


async def test_lock_held_too_long_is_a_storage_error(db: Path) -> None:
    storage = SqliteStorage(db, busy_timeout=0.2)
    await storage.open()
    request, rows, items = sample_request(rows=1, urls_per_row=1)
    await storage.create_request(request, rows)
    holder = _hold_lock(db)
    try:
        start = time.perf_counter()
        with pytest.raises(StorageError, match="locked"):
            await start_item(storage, items[0].id, lease_seconds=30)
        assert time.perf_counter() - start < 5
        # Reads go on under WAL while a writer holds the lock.
        assert await storage.get_request(request.id) == request
    finally:
        holder.rollback()
        holder.close()
    assert await start_item(storage, items[0].id, lease_seconds=30) is not None
    await storage.close()


async def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database, not even close" * 100)
    with pytest.raises(StorageError, match="not a database"):
        await SqliteStorage(path).open()


async def test_unusable_paths(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError):
        await SqliteStorage(tmp_path / "file" / "db.sqlite").open()
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StorageError):
        await SqliteQueue(tmp_path / "dir.db").open()


async def test_point_reads_run_inline_and_fall_back_when_busy(tmp_path: Path) -> None:
    """get_request/get_item read on the loop; a busy database falls back to a thread."""
    storage = SqliteStorage(tmp_path / "inline.db")
    await storage.open()
    try:
        request, rows, items = sample_request(1, 1)
        await storage.create_request(request, rows)
        # Another process-like connection holds the write lock: WAL readers go on.
        other = sqlite3.connect(tmp_path / "inline.db", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            started = time.monotonic()
            found = await storage.get_request(request.id)
            assert found is not None and found.id == request.id
            assert time.monotonic() - started < 1.0
        finally:
            other.execute("ROLLBACK")
            other.close()

        class Busy:
            in_transaction = False

            def execute(self, *args: object) -> None:
                raise sqlite3.OperationalError("database is locked")

        storage._db._inline = Busy()  # type: ignore[assignment]
        assert (await storage.get_item(items[0].id)) == items[0]  # via the thread pool
    finally:
        storage._db._inline = None
        await storage.close()


async def test_short_writes_run_inline_and_fall_back_when_locked(tmp_path: Path) -> None:
    """Leasing/finishing write on the loop; another process's lock sends them to a thread."""
    path = tmp_path / "inline-writes.db"
    storage = SqliteStorage(path)
    queue = SqliteQueue(path)
    await storage.open()
    await queue.open()
    try:
        request, rows, items = sample_request(rows=1, urls_per_row=3)
        await storage.create_request(request, rows)
        await queue.enqueue([i.id for i in items])
        claims = await queue.claim(consumer="w", max_items=3, lease_seconds=30, wait=0)
        started = await start_items(storage, [c.item_id for c in claims], lease_seconds=30)
        assert len(started) == 3
        assert storage._db._inline_writer is not None  # the inline path was taken
        assert queue._db._inline_writer is not None
        # Another process holds the write lock for 0.3 s: the write neither
        # fails nor holds the event loop; it waits in a thread.
        holder = _hold_lock(path)
        timer = threading.Timer(0.3, holder.commit)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await anyio.sleep(0.01)
                ticks += 1

        timer.start()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(tick)
                finished = await finish_items(storage,
                    [(i.id, _result(n)) for n, i in enumerate(started)]
                )
                tg.cancel_scope.cancel()
        finally:
            timer.join()
            holder.close()
        assert [r.id for r in finished] == [request.id]
        assert ticks >= 10  # the loop kept running while the write waited
        await queue.ack_many(claims)
        assert await queue.depth() == 0
    finally:
        await queue.close()
        await storage.close()


async def test_inline_writes_checkpoint_the_wal_in_a_thread(tmp_path: Path) -> None:
    """The inline writer never checkpoints itself; a passive checkpoint runs in a thread."""
    path = tmp_path / "checkpoint.db"
    storage = SqliteStorage(path)
    await storage.open()
    db = storage._db
    threads: list[str] = []
    real = db._checkpoint

    def checkpoint() -> None:
        threads.append(threading.current_thread().name)
        real()

    db._checkpoint = checkpoint  # type: ignore[method-assign]
    try:
        request, rows, items = sample_request(rows=50, urls_per_row=5)
        await storage.create_request(request, rows)
        for item in items:  # 250 short writes
            await start_item(storage, item.id, lease_seconds=30)
        assert db._inline_writer is not None
        assert db._inline_writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        for _ in range(200):
            if threads and not db._checkpointing:
                break
            await anyio.sleep(0.01)
        assert len(threads) == 1
        assert threads[0] != threading.current_thread().name
    finally:
        await storage.close()


async def test_waiting_consumer_wakes_when_another_process_enqueues(db: Path) -> None:
    """A claim waiting on an empty queue sees another instance's enqueue through the WAL.

    The two instances share nothing but the file (like two processes);
    polling is slowed to 30 s, so only the WAL watch can wake the consumer
    before the claim's 20 s wait runs out.
    """
    waiting, writer = SqliteQueue(db), SqliteQueue(db)
    waiting.poll_min = waiting.poll_max = 30.0
    await waiting.open()
    await writer.open()
    try:
        assert await waiting.claim(consumer="w", max_items=1, lease_seconds=30, wait=0) == []
        got: list[str] = []

        async def consume() -> None:
            claims = await waiting.claim(consumer="w", max_items=5, lease_seconds=30, wait=20)
            got.extend(c.item_id for c in claims)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await anyio.sleep(0.1)  # the consumer is waiting now
                await writer.enqueue(["r.0", "r.1"])
        assert got == ["r.0", "r.1"]
    finally:
        await writer.close()
        await waiting.close()
