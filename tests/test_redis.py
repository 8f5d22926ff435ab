"""Redis storage and queue: the contract suite plus what only a real server shows.

Every test runs against the Redis at ``CSVIMG_REDIS_URL`` (default
``redis://127.0.0.1:6379/15``) under a key prefix of its own, removed
afterwards; without Redis the tests skip (or fail under
``CSVIMG_REQUIRE_SERVICES=1``, see ``tests/services.py``). The restart test
runs a ``redis-server`` of its own on a free port.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import anyio.to_thread
import pytest
import redis
import redis.asyncio as aioredis

# The contract's asserts live in an installed module: have pytest rewrite
# them so failures show values.
pytest.register_assert_rewrite("csvimg.testing")

from csvimg._errors import ConfigError, StorageError  # noqa: E402
from csvimg.backends import Queue, Storage  # noqa: E402
from csvimg.backends.redis import RedisQueue, RedisStorage  # noqa: E402
from csvimg.jobs import ItemResult, ItemStatus, RequestStatus, Row, now  # noqa: E402
from csvimg.settings import Settings  # noqa: E402
from csvimg.testing import (  # noqa: E402  # noqa: E402
    FAR_FUTURE,
    EngineSmokeTests,
    QueueContract,
    StorageContract,
    claimable_events,
    finish_item,
    sample_request,
    stale_items,
    start_item,
)
from services import missing, redis_url, require_program  # noqa: E402

pytestmark = pytest.mark.redis


# -- helpers ------------------------------------------------------------------


def with_prefix(url: str, prefix: str) -> str:
    """Return *url* with its ``prefix`` query parameter set to *prefix*."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "prefix"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("prefix", prefix)])))


def fresh_prefix() -> str:
    """A key prefix no other test (or test run) uses."""
    return f"csvimg-test-{uuid.uuid4().hex[:12]}"


async def prefix_keys(url: str, prefix: str) -> list[str]:
    """Every key under *prefix* on the server of *url*."""
    async with aioredis.Redis.from_url(url.split("?", 1)[0], decode_responses=True) as client:
        return [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]


async def wipe(url: str, prefix: str) -> None:
    """Delete every key under *prefix*."""
    keys = await prefix_keys(url, prefix)
    if keys:
        async with aioredis.Redis.from_url(url.split("?", 1)[0], decode_responses=True) as client:
            for start in range(0, len(keys), 1000):
                await client.unlink(*keys[start : start + 1000])


@pytest.fixture
def server_url() -> str:
    """The shared test Redis (skips or fails when it does not answer)."""
    return redis_url()


@pytest.fixture
async def storage_url(server_url: str) -> AsyncIterator[str]:
    """A URL with a prefix of its own; its keys are removed afterwards."""
    prefix = fresh_prefix()
    yield with_prefix(server_url, prefix)
    await wipe(server_url, prefix)


@pytest.fixture
async def redis_storage(storage_url: str) -> AsyncIterator[RedisStorage]:
    """An opened storage under a fresh prefix."""
    backend = RedisStorage(storage_url)
    await backend.open()
    yield backend
    await backend.close()


# -- the contract -------------------------------------------------------------


class TestRedisStorageContract(StorageContract):
    url = ""

    async def reopened(self, storage: Storage) -> Storage:
        other = RedisStorage(self.url)
        await other.open()
        return other

    @pytest.fixture
    async def storage(self, storage_url: str) -> AsyncIterator[Storage]:
        self.url = storage_url
        backend = RedisStorage(storage_url)
        await backend.open()
        yield backend
        await backend.close()


class TestRedisQueueContract(QueueContract):
    @pytest.fixture
    async def queue(self, storage_url: str) -> AsyncIterator[Queue]:
        backend = RedisQueue(storage_url)
        await backend.open()
        yield backend
        await backend.close()


class TestRedisEngine(EngineSmokeTests):
    @pytest.fixture
    def engine_settings(self, storage_url: str) -> Settings:
        return Settings(storage_url=storage_url, blobs_url="memory://")


# -- URLs, plugin, errors (no server needed) ---------------------------------


class TestUrls:
    def test_prefix_and_client_url(self) -> None:
        storage = RedisStorage("redis://:secret@db.example:6380/3?prefix=shop1&socket_timeout=2")
        assert storage.prefix == "shop1"
        assert storage._conn.client_url == "redis://:secret@db.example:6380/3?socket_timeout=2"
        assert "secret" not in storage._conn.where
        assert RedisQueue("rediss://db.example/0").prefix == "csvimg"

    def test_unix_socket(self) -> None:
        queue = RedisQueue("redis+unix:///run/redis.sock?db=2&prefix=p")
        assert queue._conn.client_url == "unix:///run/redis.sock?db=2"
        assert queue.stream == "p:queue"

    @pytest.mark.parametrize("url", ["redis://h/0?prefix=", "redis://h/0?prefix=a*b",
                                     "memory://", "redis://h/0?prefix=a%20b"])
    def test_bad_urls(self, url: str) -> None:
        with pytest.raises(ConfigError):
            RedisStorage(url)

    def test_registered_by_scheme(self) -> None:
        from csvimg.plugins import Plugins
        from csvimg.settings import Settings

        plugins = Plugins(load_entrypoints=False)
        for scheme in ("redis", "rediss", "redis+unix"):
            assert plugins.registry.storage[scheme] == RedisStorage.from_url
            assert plugins.registry.queue[scheme] == RedisQueue.from_url
        built = plugins.storage("redis://127.0.0.1:6379/0?prefix=x", Settings())
        assert isinstance(built, RedisStorage)
        assert built.prefix == "x"

    @pytest.mark.anyio
    async def test_unreachable_server_is_a_storage_error(self) -> None:
        with socket.socket() as sock:  # a port nothing listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        for backend in (RedisStorage(f"redis://127.0.0.1:{port}/0"),
                        RedisQueue(f"redis://127.0.0.1:{port}/0")):
            with pytest.raises(StorageError, match="unreachable"):
                await backend.open()
            await backend.close()

    @pytest.mark.anyio
    async def test_closed_backend_is_a_storage_error(self) -> None:
        with pytest.raises(StorageError, match="not open"):
            await RedisStorage().get_request("x")


# -- exactly once across processes --------------------------------------------


def _finish_everything(url: str, item_ids: Sequence[str], barrier: Barrier,
                       out: Connection) -> None:
    """Child process: finish every item (in its own order); report wins."""

    async def run() -> int:
        storage = RedisStorage(url)
        await storage.open()
        wins = 0
        order = list(item_ids)
        random.shuffle(order)
        try:
            await anyio.to_thread.run_sync(barrier.wait)
            for iid in order:
                seq = int(iid.rsplit(".", 1)[1])
                await start_item(storage, iid, lease_seconds=30)
                result = (ItemResult.failure("timeout", "slow") if seq % 5 == 0
                          else ItemResult(output_key=f"out/{seq}.jpg"))
                if await finish_item(storage, iid, result) is not None:
                    wins += 1
        finally:
            await storage.close()
        return wins

    out.send(asyncio.run(run()))
    out.close()


@pytest.mark.anyio
async def test_exactly_one_of_four_processes_sees_the_request_finish(
    storage_url: str, redis_storage: RedisStorage
) -> None:
    """4 OS processes finish all 240 items at once: counts exact, one winner, one event."""
    request, rows, items = sample_request(rows=80, urls_per_row=3)
    await redis_storage.create_request(request, rows)
    ids = [i.id for i in items]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    pipes = [ctx.Pipe(duplex=False) for _ in range(4)]
    procs = [
        ctx.Process(target=_finish_everything, args=(storage_url, ids, barrier, send))
        for _, send in pipes
    ]
    for proc in procs:
        proc.start()

    def collect() -> list[int]:
        wins = [recv.recv() if recv.poll(60) else -1 for recv, _ in pipes]
        for proc in procs:
            proc.join(10)
        return wins

    wins = await anyio.to_thread.run_sync(collect)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert sorted(wins) == [0, 0, 0, 1]
    failed = sum(1 for seq in range(len(ids)) if seq % 5 == 0)
    stored = await redis_storage.get_request(request.id)
    assert stored is not None
    assert (stored.status, stored.done, stored.failed) == (
        RequestStatus.COMPLETED, len(ids) - failed, failed,
    )
    items_now = await redis_storage.list_items(request.id)
    assert sum(i.status is ItemStatus.DONE for i in items_now) == len(ids) - failed
    assert len(await claimable_events(redis_storage, request.id)) == 1


# -- a consumer that dies -----------------------------------------------------


def _claim_and_die(url: str, lease: float, out: Connection) -> None:
    """Child process: claim everything, report what, then die without acking."""

    async def run() -> list[str]:
        queue = RedisQueue(url)
        await queue.open()
        claims = await queue.claim(consumer="doomed", max_items=100, lease_seconds=lease, wait=5)
        return [c.item_id for c in claims]

    out.send(asyncio.run(run()))
    os._exit(3)  # no ack, no close: the process is simply gone


@pytest.mark.anyio
async def test_items_of_a_dead_consumer_are_reclaimed_after_the_lease(storage_url: str) -> None:
    """A process claims and dies; another consumer gets its ids once the lease ends."""
    lease = 2.0
    queue = RedisQueue(storage_url)
    await queue.open()
    try:
        ids = [f"item-{n}" for n in range(6)]
        await queue.enqueue(ids)
        ctx = multiprocessing.get_context("spawn")
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_claim_and_die, args=(storage_url, lease, send))
        proc.start()
        claimed: list[str] = await anyio.to_thread.run_sync(
            lambda: recv.recv() if recv.poll(30) else []
        )
        claimed_at = time.monotonic()
        await anyio.to_thread.run_sync(proc.join, 10)
        assert proc.exitcode == 3
        assert sorted(claimed) == sorted(ids)
        # Still leased to the dead consumer: nothing to take yet.
        assert await queue.claim(consumer="survivor", max_items=10, lease_seconds=30,
                                 wait=0) == []
        again = await queue.claim(consumer="survivor", max_items=10, lease_seconds=30, wait=10)
        assert time.monotonic() - claimed_at >= lease - 0.1
        assert sorted(c.item_id for c in again) == sorted(ids)
        assert all(c.deliveries == 2 for c in again)
        for claim in again:
            await queue.ack_many([claim])
        assert await queue.depth() == 0
    finally:
        await queue.close()


# -- prefixes -----------------------------------------------------------------


@pytest.mark.anyio
async def test_prefixes_do_not_see_each_other(server_url: str) -> None:
    """Two deployments on one server share nothing."""
    prefixes = [fresh_prefix(), fresh_prefix()]
    urls = [with_prefix(server_url, p) for p in prefixes]
    stores = [RedisStorage(u) for u in urls]
    queues = [RedisQueue(u) for u in urls]
    backends: list[RedisStorage | RedisQueue] = [*stores, *queues]
    try:
        for backend in backends:
            await backend.open()
        a, b = stores
        request, rows, items = sample_request(rows=1, urls_per_row=1, owner="alice")
        await a.create_request(request, rows)
        assert await b.get_request(request.id) is None
        assert await b.get_item(items[0].id) is None
        assert await b.list_requests() == []
        assert await b.list_items(request.id) == []
        assert await finish_item(b, items[0].id, ItemResult(output_key="x")) is None
        assert await stale_items(b, now=FAR_FUTURE, pending_before=FAR_FUTURE, limit=10) == []
        assert await finish_item(a, items[0].id, ItemResult(output_key="x")) is not None
        assert await claimable_events(b) == []
        assert len(await claimable_events(a)) == 1
        # The same request id may exist in both, independently.
        await b.create_request(request, rows)
        assert (await b.get_request(request.id)) == request

        qa, qb = queues
        await qa.enqueue(["only-a"])
        assert await qb.depth() == 0
        assert await qb.claim(consumer="w", max_items=5, lease_seconds=30, wait=0) == []
        [claim] = await qa.claim(consumer="w", max_items=5, lease_seconds=30, wait=0)
        assert claim.item_id == "only-a"
        for prefix in prefixes:
            keys = await prefix_keys(server_url, prefix)
            assert keys
            assert all(k.startswith(f"{prefix}:") for k in keys)
    finally:
        for backend in backends:
            await backend.close()
        for prefix in prefixes:
            await wipe(server_url, prefix)


# -- create_request is all or nothing -----------------------------------------


class _Exploding(Sequence[Row]):
    """Rows that page out whole but raise when read one by one past *after*.

    The row pages are written first (slices), then the items are made from
    the rows one at a time: so this fails half-way through the items.
    """

    def __init__(self, rows: Sequence[Row], after: int) -> None:
        self._rows = list(rows)
        self._after = after

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: Any) -> Any:
        if not isinstance(index, slice) and index > self._after:
            raise RuntimeError("boom while reading rows")
        return self._rows[index]


@pytest.mark.anyio
async def test_failed_create_leaves_nothing(storage_url: str, redis_storage: RedisStorage
                                            ) -> None:
    """A create that fails after some chunks were written leaves no trace."""
    request, rows, items = sample_request(rows=6000, urls_per_row=2)
    with pytest.raises(RuntimeError, match="boom"):
        await redis_storage.create_request(request, _Exploding(rows, after=5000))
    assert await redis_storage.get_request(request.id) is None
    assert await redis_storage.get_item(items[0].id) is None
    assert await redis_storage.list_items(request.id) == []
    assert await redis_storage.list_rows(request.id) == []
    assert await prefix_keys(storage_url, redis_storage.prefix) == []
    # The id is free again.
    await redis_storage.create_request(request, rows)
    assert await redis_storage.get_request(request.id) == request
    assert len(await redis_storage.list_items(request.id, offset=11_990)) == 10


@pytest.mark.anyio
async def test_half_written_request_is_invisible_then_swept(redis_storage: RedisStorage) -> None:
    """A writer dies mid-way: nothing shows, and the sweeper removes its leftovers."""
    request, rows, items = sample_request(rows=3, urls_per_row=2, created_at=now() - 3600)
    storage = redis_storage
    marker = f"{storage.prefix}:staging:{request.id}"
    reserve_keys = [storage._k_req(request.id), marker]
    assert await storage._script("reserve", reserve_keys, [600, "token"])
    await storage._stage(request, rows, marker)  # ... and the writer dies here

    assert await storage.get_request(request.id) is None
    assert await storage.list_requests() == []
    assert await storage.get_item(items[0].id) is None
    assert await storage.list_items(request.id) == []
    assert await storage.list_rows(request.id) == []
    assert await start_item(storage, items[0].id, lease_seconds=30) is None
    assert await finish_item(storage, items[0].id, ItemResult(output_key="x")) is None
    # Being written (marker alive): neither handed out nor removed.
    assert await stale_items(storage, now=now(), pending_before=FAR_FUTURE, limit=10) == []
    assert await storage._r.exists(storage._k_item(items[0].id))
    # A second writer of the same id is refused while the first holds it.
    with pytest.raises(StorageError, match="exists already"):
        await storage.create_request(request, rows)

    await storage._r.delete(marker)  # what expiry does to an abandoned write
    assert await stale_items(storage, now=now(), pending_before=FAR_FUTURE, limit=10) == []
    assert await prefix_keys_of(storage) == []


@pytest.mark.anyio
async def test_replayed_calls_answer_like_the_first(redis_storage: RedisStorage) -> None:
    """redis-py resends a command after a broken connection even if it ran.

    The scripts recognise their own replay: the caller that finished the
    request still gets it, a lease is still its own, no row or item twice.
    """
    storage = redis_storage
    request, rows, items = sample_request(rows=2, urls_per_row=1)
    marker = f"{storage.prefix}:staging:{request.id}"
    reserve_keys = [storage._k_req(request.id), marker]
    assert await storage._script("reserve", reserve_keys, [600, "t1"])
    assert await storage._script("reserve", reserve_keys, [600, "t1"])  # replay
    assert not await storage._script("reserve", reserve_keys, [600, "t2"])  # another writer
    await storage._stage(request, rows, marker)
    await storage._stage(request, rows, marker)  # every chunk replayed
    keys = [storage._k_req(request.id), storage._k_requests, marker]
    fields = [v for pair in storage._request_fields(request).items() for v in pair]
    args = [repr(request.created_at), request.id, *fields]
    assert await storage._script("commit", keys, args)
    assert await storage._script("commit", keys, args)  # replay
    assert await storage.list_rows(request.id) == rows
    assert await storage.list_items(request.id) == items

    first = await storage._start(items[0].id, 30, "s1")
    assert first is not None
    assert await storage._start(items[0].id, 30, "s1") == first  # replay
    assert await storage._start(items[0].id, 30, "s2") is None  # someone else
    assert await storage._finish(items[0].id, ItemResult(output_key="a"), "msg_1") is None
    assert await storage._finish(items[0].id, ItemResult(output_key="a"), "msg_1") is None
    last = await storage._finish(items[1].id, ItemResult(output_key="b"), "msg_2")
    assert last is not None
    assert last.status is RequestStatus.COMPLETED
    assert await storage._finish(items[1].id, ItemResult(output_key="b"), "msg_2") == last
    assert await storage._finish(items[1].id, ItemResult(output_key="b"), "msg_3") is None
    assert [e.id for e in await claimable_events(storage, request.id)] == ["msg_2"]


async def prefix_keys_of(storage: RedisStorage) -> list[str]:
    """Keys under the storage's prefix, from its own connection."""
    return [k async for k in storage._r.scan_iter(match=f"{storage.prefix}:*")]


@pytest.mark.anyio
async def test_concurrent_creates_of_one_id(redis_storage: RedisStorage) -> None:
    """Two writers race for one id: one wins, the other gets StorageError."""
    request, rows, _ = sample_request(rows=3000, urls_per_row=2)
    outcomes: list[str] = []

    async def create() -> None:
        try:
            await redis_storage.create_request(request, rows)
            outcomes.append("ok")
        except StorageError:
            outcomes.append("refused")

    async with anyio.create_task_group() as tg:
        tg.start_soon(create)
        tg.start_soon(create)
    assert sorted(outcomes) == ["ok", "refused"]
    assert await redis_storage.get_request(request.id) == request
    assert len(await redis_storage.list_items(request.id, offset=5990)) == 10


# -- a Redis restart -----------------------------------------------------------


class OwnRedis:
    """A redis-server of the test's own, with an append-only file in *folder*."""

    def __init__(self, folder: Path) -> None:
        self.binary = require_program(
            "redis-server", "install Redis (e.g. `apt-get install redis-server`)"
        )
        self.folder = folder
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                "--dir", str(self.folder), "--logfile", str(self.folder / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:  # includes BusyLoadingError
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        missing(f"redis-server did not start on port {self.port}",
                                f"see {self.folder / 'redis.log'}")
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.mark.anyio
async def test_backends_survive_a_redis_restart(own_redis: OwnRedis) -> None:
    """Kill -9 the server, start it again: the same clients carry on by themselves."""
    storage, queue = RedisStorage(own_redis.url), RedisQueue(own_redis.url)
    await storage.open()
    await queue.open()
    try:
        request, rows, items = sample_request(rows=2, urls_per_row=2)
        await storage.create_request(request, rows)
        await queue.enqueue([i.id for i in items])
        assert await start_item(storage, items[0].id, lease_seconds=30) is not None

        await anyio.to_thread.run_sync(own_redis.kill)
        with pytest.raises(StorageError, match="unreachable"):
            await storage.get_request(request.id)
        with pytest.raises(StorageError):
            await queue.claim(consumer="w", max_items=10, lease_seconds=30, wait=0)

        await anyio.to_thread.run_sync(own_redis.start)
        stored = await storage.get_request(request.id)
        assert stored is not None
        assert stored.status is RequestStatus.PROCESSING
        claims = await queue.claim(consumer="w", max_items=10, lease_seconds=30, wait=1)
        assert sorted(c.item_id for c in claims) == sorted(i.id for i in items)
        finished = None
        for claim in claims:
            await start_item(storage, claim.item_id, lease_seconds=30)
            finished = await finish_item(storage, claim.item_id, ItemResult(output_key="o"))
            await queue.ack_many([claim])
        assert finished is not None
        assert finished.status is RequestStatus.COMPLETED
        assert await queue.depth() == 0
        assert len(await claimable_events(storage, request.id)) == 1
    finally:
        await storage.close()
        await queue.close()
