"""The Celery queue on real brokers (RabbitMQ and Redis) with real Celery workers.

The queue contract of `csvimg.testing` does not fit a queue that pushes its
items to Celery workers (it hands out no claims), so this module tests what
the Celery queue promises instead: URLs, publishing, depth, failures as
`StorageError`, and end to end runs with ``celery -A csvimg.backends.celery
worker`` subprocesses, one of them killed with ``kill -9`` mid-run.

Each test uses its own Celery queue (``?queue=test-<uuid>``), deleted at the
end, so leftovers of one run never reach another. Storage is a SQLite file
shared by the test and the worker processes; blobs a folder.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import anyio
import pytest
from celery import signals
from celery.exceptions import Retry

import csvimg.backends.celery as celery_backend
from csvimg._errors import ConfigError, StorageError
from csvimg.backends import Claim
from csvimg.backends.celery import (
    DEFAULT_QUEUE,
    SCHEMES,
    TASK_NAME,
    CeleryQueue,
    item_wait,
    make_app,
    parse_celery_url,
)
from csvimg.engine import OUTPUT_COLUMN, Engine
from csvimg.fetch import FetchPolicy, parse_allow
from csvimg.jobs import Item, ItemStatus, Request, RequestStatus, now
from csvimg.plugins import Plugins
from csvimg.settings import Settings
from csvimg.testing import stale_items, start_item
from images import photo_jpeg
from servers import ImageHost, closed_port
from services import redis_url, require_service
from test_imports import imports_of

AMQP_ENV = "CSVIMG_AMQP_URL"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
PUBLIC = "http://public.test"

# No worker of these tests may outlive them, even if pytest itself is killed:
# every worker runs under `timeout -s KILL`.
WORKER_LIFETIME = 150


def amqp_url() -> str:
    """``CSVIMG_AMQP_URL`` (default RabbitMQ on 127.0.0.1:5672) once it answers."""
    url = os.environ.get(AMQP_ENV) or DEFAULT_AMQP_URL
    parts = urlsplit(url)
    require_service(
        "RabbitMQ",
        parts.hostname or "127.0.0.1",
        parts.port or 5672,
        f"start RabbitMQ (e.g. `rabbitmq-server`) or set {AMQP_ENV}=amqp://user:pw@host:port//",
    )
    return url


def broker_url(kind: str) -> str:
    """The broker URL of *kind* (``amqp`` or ``redis``); skips (or fails) when it is down."""
    return amqp_url() if kind == "amqp" else redis_url()


BROKERS = [
    pytest.param("amqp", marks=pytest.mark.rabbitmq, id="rabbitmq"),
    pytest.param("redis", marks=pytest.mark.redis, id="redis"),
]


def celery_url(kind: str, *, queue: str | None = None) -> str:
    """A ``celery+...`` URL on a fresh queue of its own."""
    name = queue or f"test-{uuid.uuid4().hex[:12]}"
    url = f"celery+{broker_url(kind)}?queue={name}"
    if kind == "redis":
        # Redis has no real acks: a dead worker's tasks come back once the
        # visibility timeout has passed; keep that (and the sweep) short.
        url += "&visibility_timeout=4&unacked_restore_interval=1&unacked_restore_throttle=1"
    return url


@contextlib.asynccontextmanager
async def fresh_queue(url: str) -> AsyncIterator[CeleryQueue]:
    """An opened `CeleryQueue` whose broker queue is deleted afterwards."""
    queue = CeleryQueue(url, Settings())
    await queue.open()
    try:
        yield queue
    finally:
        with anyio.CancelScope(shield=True):
            try:
                await queue.delete()
            finally:
                await queue.close()


# -- URLs and plugin -----------------------------------------------------------


def test_parse_amqp_url_defaults_to_the_csvimg_queue() -> None:
    parsed = parse_celery_url("celery+amqp://guest:secret@rabbit:5672//")
    assert parsed.broker_url == "amqp://guest:secret@rabbit:5672//"
    assert parsed.queue == DEFAULT_QUEUE == "csvimg"
    assert parsed.transport_options == {}
    assert "secret" not in parsed.redacted and "rabbit:5672" in parsed.redacted


def test_parse_url_queue_and_redis_options() -> None:
    parsed = parse_celery_url(
        "celery+redis://:pw@127.0.0.1:6379/0?queue=shop1.images&visibility_timeout=600"
        "&unacked_restore_throttle=1&socket_timeout=5"
    )
    assert parsed.broker_url == "redis://:pw@127.0.0.1:6379/0?socket_timeout=5"
    assert parsed.queue == "shop1.images"
    assert parsed.transport_options == {"visibility_timeout": 600.0, "unacked_restore_throttle": 1}
    for scheme, broker in SCHEMES.items():
        assert parse_celery_url(f"{scheme}://h/?queue=q").broker_url == f"{broker}://h/"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("amqp://guest:guest@127.0.0.1:5672//", "not a Celery queue URL"),
        ("celery+kafka://broker:9092", "not a Celery queue URL"),
        ("celery+amqp://h//?queue=", "queue name"),
        ("celery+amqp://h//?queue=-x", "queue name"),
        ("celery+amqp://h//?queue=a%20b", "queue name"),
        ("celery+amqp://h//?visibility_timeout=5", "Redis brokers only"),
        ("celery+redis://h/0?visibility_timeout=soon", "must be a number"),
        ("celery+redis://h/0?visibility_timeout=0", "must be positive"),
    ],
)
def test_parse_url_rejects(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_celery_url(url)


def test_bad_scheme_error_hides_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        parse_celery_url("amqp://guest:topsecret@rabbit//")
    assert "topsecret" not in str(info.value)


def test_plugins_serve_every_celery_scheme() -> None:
    plugins = Plugins(load_entrypoints=False)
    for scheme in ("celery+amqp", "celery+pyamqp", "celery+redis", "celery+rediss"):
        queue = plugins.queue(f"{scheme}://h/?queue=q1", Settings())
        assert isinstance(queue, CeleryQueue)
        assert queue.queue_name == "q1"


def test_make_app_configuration() -> None:
    settings = Settings(queue_url="celery+amqp://guest:guest@h:5672//?queue=imgs")
    app = make_app(settings)
    conf = app.conf
    assert conf.broker_url == "amqp://guest:guest@h:5672//"
    assert conf.task_default_queue == "imgs"
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert conf.broker_connection_retry_on_startup is True
    task = app.tasks[TASK_NAME]
    assert task.acks_late and task.reject_on_worker_lost
    with pytest.raises(ConfigError):
        make_app(Settings())  # memory:// is no Celery queue


def test_each_app_runs_its_own_engine() -> None:
    first = make_app(Settings(storage_url="sqlite:///one.db", queue_url="celery+redis://h/0"))
    second = make_app(Settings(storage_url="sqlite:///two.db", queue_url="celery+redis://h/0"))
    assert first.tasks[TASK_NAME].run is not second.tasks[TASK_NAME].run


def test_module_app_is_built_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(celery_backend, "_app", None)
    monkeypatch.setenv("CSVIMG_QUEUE", "celery+redis://127.0.0.1:6379/3?queue=from-env")
    app = celery_backend.app
    assert app.conf.task_default_queue == "from-env"
    assert celery_backend.app is app  # built once
    monkeypatch.setattr(celery_backend, "_app", None)
    monkeypatch.setenv("CSVIMG_QUEUE", "sqlite:///x.db")
    with pytest.raises(ConfigError, match="CSVIMG_QUEUE"):
        _ = celery_backend.app
    monkeypatch.setenv("CSVIMG_QUEUE", "celery+redis://127.0.0.1:6379/3")
    monkeypatch.setenv("CSVIMG_BLOBS", "s3://bucket/images")
    with pytest.raises(ConfigError, match="s3"):  # refused at worker start-up
        _ = celery_backend.app
    with pytest.raises(AttributeError):
        _ = celery_backend.no_such_thing


_SIGNALS_PROBE = """
import json, sys
from celery import signals
names = ("worker_process_init", "worker_process_shutdown", "worker_shutdown")
def counts():
    return {n: len(getattr(signals, n).receivers) for n in names}
import csvimg  # imports csvimg.engine itself (csvimg.Engine)
before = counts()
loaded = set(sys.modules)
import csvimg.backends.celery as celery_backend
imported = counts()
new = sorted(set(sys.modules) - loaded)
from csvimg.settings import Settings
celery_backend.make_app(Settings(queue_url="celery+redis://127.0.0.1:6379/0"))
made = counts()
celery_backend.make_app(Settings(queue_url="celery+redis://127.0.0.1:6379/0"))
print(json.dumps({"before": before, "imported": imported, "made": made, "again": counts(),
                  "new": new}))
"""


def test_import_connects_no_signals_and_loads_no_engine() -> None:
    # A fresh interpreter: this one has imported everything already.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", _SIGNALS_PROBE], env=env, capture_output=True, text=True,
        timeout=60, check=True,
    ).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert "csvimg.backends.celery.queue" in seen["new"]
    # The worker half (the one module of the package importing the engine)
    # loads on first use only. `import csvimg` loads csvimg.engine itself,
    # so "not imported" is checked on the import graph below.
    assert "csvimg.backends.celery.worker" not in seen["new"]
    assert "csvimg.engine" not in seen["new"]
    assert seen["imported"] == seen["before"]
    for name, count in seen["before"].items():
        assert seen["made"][name] == count + 1, name  # connected by make_app
    assert seen["again"] == seen["made"]  # once, however many apps


def test_queue_side_never_imports_the_engine() -> None:
    # Every import counts, lazy ones included (see tests/test_imports.py).
    seen: set[str] = set()
    todo = ["csvimg.backends.celery.queue"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imports_of(module))
    assert "csvimg.engine" not in seen
    assert "csvimg.backends.celery.worker" not in seen
    assert "csvimg.engine" in imports_of("csvimg.backends.celery.worker")


def _item(status: ItemStatus, lease_until: float | None = None) -> Item:
    return Item(id="r.0", request_id="r", row=0, position=0, url="http://x/a.jpg",
                status=status, lease_until=lease_until)


def test_item_wait_waits_out_the_lease_of_another_worker() -> None:
    assert item_wait(None, 100.0) is None
    assert item_wait(_item(ItemStatus.DONE), 100.0) is None
    assert item_wait(_item(ItemStatus.FAILED), 100.0) is None
    assert item_wait(_item(ItemStatus.PROCESSING, lease_until=103.0), 100.0) == 3.25
    assert item_wait(_item(ItemStatus.PROCESSING, lease_until=99.0), 100.0) == 0.5
    assert item_wait(_item(ItemStatus.PROCESSING, lease_until=1000.0), 100.0) == 30.0
    assert item_wait(_item(ItemStatus.PENDING), 100.0) == 0.5


# -- the task, run in this process ----------------------------------------------------


@pytest.fixture
def task_settings(tmp_path: Path, host: ImageHost) -> Settings:
    """Settings of a worker whose broker is never contacted (the task is called directly)."""
    return Settings(
        storage_url=f"sqlite:///{tmp_path}/csvimg.db",
        queue_url=f"celery+amqp://guest:guest@127.0.0.1:{closed_port()}//",
        blobs_url=f"file://{tmp_path}/images",
        fetch=FetchPolicy(allow=parse_allow(host.allow)),
        lease_seconds=5,
    )


@contextlib.asynccontextmanager
async def submitted(settings: Settings, *urls: str) -> AsyncIterator[tuple[Engine, Request]]:
    """An engine on *settings*' storage (memory queue) and a request of *urls*."""
    async with Engine(settings.evolve(queue_url="memory://")) as engine:
        rows = [[str(n), f"P{n}", url] for n, url in enumerate(urls)]
        yield engine, await engine.submit(_csv(rows))


def _close_worker_engines() -> None:
    # What Celery sends when a pool process exits.
    signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)


@pytest.mark.anyio
async def test_task_processes_an_item_on_a_reused_engine(
    task_settings: Settings, host: ImageHost
) -> None:
    host.add("/a.jpg", photo_jpeg(320, 240), content_type="image/jpeg")
    task = make_app(task_settings).tasks[TASK_NAME]
    async with submitted(task_settings, host.url("/a.jpg"), host.url("/a.jpg?2")) as (engine, req):
        try:
            for seq in range(2):
                await anyio.to_thread.run_sync(task, f"{req.id}.{seq}")
            final = await engine.get_request(req.id)
            assert (final.status, final.done) == (RequestStatus.COMPLETED, 2)
            await anyio.to_thread.run_sync(task, f"{req.id}.0")  # a second delivery: no-op
            assert (await engine.get_request(req.id)).done == 2
            assert host.hits["/a.jpg"] == 2
            assert host.connections == 1  # one engine (and HTTP pool) for every task
        finally:
            await anyio.to_thread.run_sync(_close_worker_engines)


@pytest.mark.anyio
async def test_task_retries_while_another_worker_holds_the_item(
    task_settings: Settings, host: ImageHost
) -> None:
    host.add("/a.jpg", photo_jpeg(64, 48), content_type="image/jpeg")
    task = make_app(task_settings).tasks[TASK_NAME]
    async with submitted(task_settings, host.url("/a.jpg")) as (engine, req):
        item_id = f"{req.id}.0"
        assert await start_item(engine.storage, item_id, lease_seconds=5) is not None
        try:
            # Called directly, Celery raises Retry instead of publishing it.
            with pytest.raises(Retry):
                await anyio.to_thread.run_sync(task, item_id)
        finally:
            await anyio.to_thread.run_sync(_close_worker_engines)
        item = await engine.storage.get_item(item_id)
        assert item is not None and item.status is ItemStatus.PROCESSING
        assert host.hits["/a.jpg"] == 0


@pytest.mark.anyio
async def test_task_storage_failure_is_retried_not_acked(
    tmp_path: Path, task_settings: Settings
) -> None:
    (tmp_path / "not-a-dir").write_text("x")
    broken = task_settings.evolve(storage_url=f"sqlite:///{tmp_path}/not-a-dir/csvimg.db")
    task = make_app(broken).tasks[TASK_NAME]
    try:
        # Called directly, Celery's retry re-raises the error it was given.
        with pytest.raises(StorageError):
            await anyio.to_thread.run_sync(task, "some-request.0")
    finally:
        await anyio.to_thread.run_sync(_close_worker_engines)


# -- the queue on real brokers -----------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("kind", BROKERS)
async def test_enqueue_depth_purge(kind: str) -> None:
    async with fresh_queue(celery_url(kind)) as queue:
        await queue.ping()
        assert await queue.depth() == 0  # not declared yet
        await queue.enqueue([])
        await queue.enqueue(["r.0", "r.1", "r.1"])
        await _wait_depth(queue, 3)
        assert await queue.purge() == 3
        assert await queue.depth() == 0


@pytest.mark.anyio
@pytest.mark.parametrize("kind", BROKERS)
async def test_enqueue_10k_ids_is_quick(kind: str) -> None:
    ids = [f"req.{n}" for n in range(10_000)]
    async with fresh_queue(celery_url(kind)) as queue:
        start = time.monotonic()
        await queue.enqueue(ids)
        elapsed = time.monotonic() - start
        await _wait_depth(queue, len(ids))
    assert elapsed < 15, f"10k ids took {elapsed:.1f} s"


@pytest.mark.anyio
@pytest.mark.rabbitmq
async def test_message_is_a_csvimg_task() -> None:
    async with fresh_queue(celery_url("amqp")) as queue:
        await queue.enqueue(["req.7"])
        await _wait_depth(queue, 1)

        def fetch() -> Any:
            with queue.app.connection_for_write() as conn:
                return conn.default_channel.basic_get(queue.queue_name, no_ack=True)

        message = await anyio.to_thread.run_sync(fetch)
    assert message.properties["application_headers"]["task"] == TASK_NAME
    assert message.properties["delivery_mode"] == 2  # persistent
    assert message.properties["content_type"] == "application/json"
    args, kwargs, _ = json.loads(message.body)
    assert args == ["req.7"] and kwargs == {}


@pytest.mark.anyio
async def test_claim_hands_out_nothing() -> None:
    queue = CeleryQueue("celery+amqp://guest:guest@127.0.0.1:1//", Settings())
    start = anyio.current_time()
    assert await queue.claim(consumer="w", max_items=5, lease_seconds=30, wait=0.2) == []
    assert anyio.current_time() - start >= 0.15
    claim = Claim(item_id="r.0", token="t")
    for call in (queue.ack_many([claim]), queue.release_many([claim]),
                 queue.extend_many([claim], lease_seconds=1)):
        with pytest.raises(ConfigError, match="no claims"):
            await call
    await queue.ack_many([])  # nothing to do: no error
    await queue.extend_many([], lease_seconds=1)


@pytest.mark.anyio
@pytest.mark.parametrize("scheme", ["amqp", "redis"])
async def test_broker_down_is_a_storage_error(scheme: str) -> None:
    port = closed_port()
    url = (f"celery+amqp://guest:guest@127.0.0.1:{port}//" if scheme == "amqp"
           else f"celery+redis://127.0.0.1:{port}/0")
    queue = CeleryQueue(url, Settings())
    await queue.open()
    try:
        with anyio.fail_after(20):
            with pytest.raises(StorageError, match=str(port)):
                await queue.ping()
            with pytest.raises(StorageError):
                await queue.enqueue(["r.0"])
            with pytest.raises(StorageError):
                await queue.depth()
    finally:
        await queue.close()


@pytest.mark.anyio
@pytest.mark.rabbitmq
async def test_engine_ready_reports_the_broker() -> None:
    settings = Settings(storage_url="memory://", queue_url=celery_url("amqp"))
    async with Engine(settings) as engine:
        assert await engine.ready() == {"storage": "ok", "queue": "ok"}
    down = Settings(queue_url=f"celery+amqp://guest:guest@127.0.0.1:{closed_port()}//")
    async with Engine(down) as engine:
        assert (await engine.ready())["queue"].startswith("error:")


async def _wait_depth(queue: CeleryQueue, expected: int, timeout: float = 10) -> None:
    # A broker counts published messages a moment later (no publisher confirms).
    with anyio.fail_after(timeout):
        while (depth := await queue.depth()) != expected:
            assert depth < expected
            await anyio.sleep(0.05)


# -- real Celery workers -------------------------------------------------------------


class CeleryWorker:
    """``celery -A csvimg.backends.celery worker`` as a subprocess in its own process group.

    Runs under ``timeout -s KILL`` so it cannot outlive the test run; `kill`
    is ``kill -9`` of the whole worker (main process and pool processes);
    leaving the context kills whatever is left.
    """

    _count = 0

    def __init__(
        self, log_dir: Path, env: Mapping[str, str], queue: str, *, concurrency: int = 2
    ) -> None:
        CeleryWorker._count += 1
        n = CeleryWorker._count
        self.log_path = log_dir / f"celery-{n}.log"
        self.pidfile = log_dir / f"celery-{n}.pid"
        argv = [
            "timeout", "-s", "KILL", str(WORKER_LIFETIME),
            sys.executable, "-m", "celery", "-A", "csvimg.backends.celery", "worker",
            "--pool=prefork", f"--concurrency={concurrency}", "-Q", queue,
            "--without-heartbeat", "--without-gossip", "--without-mingle",
            "--loglevel=INFO", "-n", f"w{n}-{uuid.uuid4().hex[:6]}@%h",
            f"--pidfile={self.pidfile}",
        ]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        """What the worker wrote so far (the tail)."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-8000:]

    def wait_ready(self, timeout: float = 30) -> Self:
        """Block until Celery logs that the worker is ready to consume."""
        deadline = time.monotonic() + timeout
        while " ready." not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"celery not ready after {timeout} s:\n{self.log()}")
            time.sleep(0.05)
        return self

    @property
    def main_pid(self) -> int:
        """The pid of Celery's main process (the one holding the broker connection)."""
        return int(self.pidfile.read_text().strip())

    def pids(self) -> list[int]:
        """Every live process of the worker's group."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid and fields[0] != "Z":  # pgrp, not a zombie
                found.append(int(entry.name))
        return found

    def kill(self) -> None:
        """``kill -9`` the main process, then the pool processes; wait until all are gone."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.main_pid, signal.SIGKILL)
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        deadline = time.monotonic() + 10
        while self.pids():
            assert time.monotonic() < deadline, f"worker processes left: {self.pids()}"
            time.sleep(0.02)

    def stop(self, timeout: float = 20) -> int:
        """Warm shutdown (SIGTERM to the main process); return the exit code."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.main_pid, signal.SIGTERM)
        return self.proc.wait(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def host() -> Iterator[ImageHost]:
    with ImageHost() as server:
        yield server


def _settings(tmp_path: Path, queue_url: str) -> Settings:
    return Settings(
        storage_url=f"sqlite:///{tmp_path}/csvimg.db",
        queue_url=queue_url,
        blobs_url=f"file://{tmp_path}/images",
        public_url=PUBLIC,
    )


def _worker_env(settings: Settings, host: ImageHost, **extra: str) -> dict[str, str]:
    assert settings.queue_url is not None
    return {
        "CSVIMG_STORAGE": settings.storage_url,
        "CSVIMG_QUEUE": settings.queue_url,
        "CSVIMG_BLOBS": settings.blobs_url,
        "CSVIMG_FETCH_ALLOW": host.allow,
        "CSVIMG_CODEC_THREADS": "1",
        **extra,
    }


def _csv(rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    writer.writerows(rows)
    return buf.getvalue().encode()


async def _wait(engine: Engine, request_id: str, worker: CeleryWorker, timeout: float) -> Request:
    try:
        return await engine.wait(request_id, timeout=timeout, poll=0.1)
    except TimeoutError:
        request = await engine.get_request(request_id)
        raise AssertionError(f"not finished: {request}\n{worker.log()}") from None


@pytest.mark.anyio
@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", BROKERS)
async def test_celery_worker_processes_a_request(
    kind: str, tmp_path: Path, host: ImageHost
) -> None:
    for name, size in (("a", (320, 240)), ("b", (240, 320)), ("c", (200, 200))):
        host.add(f"/{name}.jpg", photo_jpeg(*size), content_type="image/jpeg")
    rows = [
        ["1", "Shirt", f"{host.url('/a.jpg')},{host.url('/b.jpg')}"],
        ["2", "Gone", host.url("/missing.jpg")],
        ["3", "Hat", host.url("/c.jpg")],
    ]
    settings = _settings(tmp_path, celery_url(kind))
    async with fresh_queue(settings.effective_queue_url) as queue, Engine(settings) as engine:
        request = await engine.submit(_csv(rows))
        assert await queue.depth() == 4  # nobody consumes yet
        with CeleryWorker(tmp_path, _worker_env(settings, host), queue.queue_name) as worker:
            final = await _wait(engine, request.id, worker, timeout=30)
            if kind == "redis":
                # Warm shutdown: each pool process closes its engine, and the
                # worker exits 0. Checked on one broker only: on RabbitMQ,
                # Celery's loop notices SIGTERM up to ~5 s late.
                assert worker.stop() == 0, worker.log()
                log = worker.log()
                assert log.count("csvimg engine closed in worker process") == log.count(
                    "csvimg engine open in worker process"
                )
        assert "csvimg engine open in worker process" in worker.log()
        assert (final.status, final.total, final.done, final.failed) == (
            RequestStatus.COMPLETED, 4, 3, 1,
        )
        items = await engine.items(request.id)
        assert [i.status for i in items] == [ItemStatus.DONE, ItemStatus.DONE,
                                             ItemStatus.FAILED, ItemStatus.DONE]
        assert items[2].error_code == "http-404" and items[2].output_key is None
        assert all(i.attempts == 1 for i in items)
        table = list(csv.reader(io.StringIO((await engine.output_csv_bytes(request.id)).decode())))
        urls = [f"{PUBLIC}/api/v1/images/{request.id}/{seq}.jpg" for seq in range(4)]
        assert table[0] == ["S. No.", "Product Name", "Input Image Urls", OUTPUT_COLUMN]
        assert [r[:3] for r in table[1:]] == rows
        assert [r[3] for r in table[1:]] == [f"{urls[0]},{urls[1]}", "", urls[3]]
        for seq in (0, 1, 3):
            blob = tmp_path / "images" / request.id / f"{seq}.jpg"
            assert blob.read_bytes()[:3] == b"\xff\xd8\xff"
        assert await queue.depth() == 0
    assert host.hits["/a.jpg"] == host.hits["/b.jpg"] == host.hits["/c.jpg"] == 1


KILL_CASES = [
    pytest.param("amqp", 300, marks=pytest.mark.rabbitmq, id="rabbitmq-300"),
    pytest.param("redis", 100, marks=pytest.mark.redis, id="redis-100"),
]


async def _kill_mid_item(engine: Engine, request: Request, worker: CeleryWorker) -> set[str]:
    """``kill -9`` *worker* once a quarter is done and items are in flight; return those.

    Items still PROCESSING after the kill are exactly the ones its pool
    processes were working on: nothing of the worker is left to finish them.
    """
    with anyio.fail_after(60):
        while True:
            assert worker.proc.poll() is None, worker.log()
            current = await engine.get_request(request.id)
            if current.done >= request.total // 4:
                items = await engine.storage.list_items(request.id, limit=request.total)
                if any(i.status is ItemStatus.PROCESSING for i in items):
                    break
            await anyio.sleep(0.02)
    worker.kill()
    items = await engine.storage.list_items(request.id, limit=request.total)
    return {i.id for i in items if i.status is ItemStatus.PROCESSING}


async def _finish_after_kill(
    engine: Engine, request: Request, worker: CeleryWorker, queue: CeleryQueue, kind: str
) -> Request:
    """Wait for the request to finish; on Redis, run the sweeper's rescue when it stalls.

    kombu's Redis transport pops a message (BRPOP) before it records the
    unacknowledged copy that ``visibility_timeout`` brings back: a worker
    killed in between loses that message. csvimg's sweeper re-enqueues such
    items (PENDING, never started) once they have waited 15 minutes; here
    the same rescue runs as soon as the run has stalled with an empty queue.
    RabbitMQ loses nothing: there the request must finish on its own.
    """
    if kind == "amqp":
        return await _wait(engine, request.id, worker, timeout=60)
    last, still_since = -1, anyio.current_time()
    with anyio.fail_after(60):
        while True:
            current = await engine.get_request(request.id)
            if current.status.finished:
                return current
            if current.done != last:
                last, still_since = current.done, anyio.current_time()
            elif anyio.current_time() - still_since > 8 and await queue.depth() == 0:
                break  # visibility timeout (4 s) and restore sweeps (1 s) are past
            await anyio.sleep(0.1)
    items = await engine.storage.list_items(request.id, limit=request.total)
    lost = {i.id for i in items if not i.status.finished}
    assert all(i.status is ItemStatus.PENDING and i.attempts == 0
               for i in items if i.id in lost), worker.log()
    assert len(lost) <= 2 * 4, lost  # at most what the dead worker had prefetched
    at = now()
    stale = await stale_items(engine.storage, now=at, pending_before=at, limit=request.total)
    assert set(stale) == lost
    await engine.queue.enqueue(stale)
    return await _wait(engine, request.id, worker, timeout=30)


@pytest.mark.anyio
@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("kind", "total"), KILL_CASES)
async def test_kill_9_a_celery_worker_mid_run_completes_exactly_once(
    kind: str, total: int, tmp_path: Path, host: ImageHost
) -> None:
    concurrency = 4
    body = photo_jpeg(160, 120)
    paths = [f"/slow/{n}.jpg" for n in range(total)]
    for path in paths:
        # Slow responses, so the run lasts long enough to be cut in the middle.
        host.add(path, body, content_type="image/jpeg", delay=0.12)
    rows = [[str(n), f"P{n}", host.url(path)] for n, path in enumerate(paths)]
    settings = _settings(tmp_path, celery_url(kind))
    # A short lease: the tasks of the killed worker come back at once (AMQP)
    # and wait for the dead holder's lease to end before taking items over.
    env = _worker_env(settings, host, CSVIMG_LEASE_SECONDS="2")
    async with fresh_queue(settings.effective_queue_url) as queue, Engine(settings) as engine:
        request = await engine.submit(_csv(rows))
        with CeleryWorker(tmp_path, env, queue.queue_name, concurrency=concurrency) as first:
            in_flight = await _kill_mid_item(engine, request, first)
        at_kill = await engine.get_request(request.id)
        assert 0 < at_kill.done < total, at_kill
        assert 1 <= len(in_flight) <= concurrency, in_flight

        with CeleryWorker(tmp_path, env, queue.queue_name, concurrency=concurrency) as second:
            final = await _finish_after_kill(engine, request, second, queue, kind)

        assert (final.status, final.total, final.done, final.failed) == (
            RequestStatus.COMPLETED, total, total, 0,
        )
        items = await engine.items(request.id, limit=total)
        assert [i.status for i in items] == [ItemStatus.DONE] * total
        keys = [i.output_key for i in items]
        assert keys == [f"{request.id}/{seq}.jpg" for seq in range(total)]
        assert len(list((tmp_path / "images" / request.id).glob("*.jpg"))) == total
        output = (await engine.output_csv_bytes(request.id)).decode()
        table = list(csv.reader(io.StringIO(output)))
        assert [r[3] for r in table[1:]] == [f"{PUBLIC}/api/v1/images/{k}" for k in keys]
        # Exactly the items in flight at the kill were started a second time,
        # by the second worker once their lease had ended; every other item
        # once. Each attempt downloaded its image at most once.
        assert {i.id: i.attempts for i in items} == {
            i.id: 2 if i.id in in_flight else 1 for i in items
        }
        hits = [host.hits[p] for p in paths]
        assert all(1 <= h <= i.attempts for h, i in zip(hits, items, strict=True)), hits
        assert await queue.depth() == 0
