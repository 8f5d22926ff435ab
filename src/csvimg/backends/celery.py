r"""Celery queue (``celery+amqp://``, ``celery+redis://``): each item is a Celery task.

The seed's engine: item ids travel as Celery tasks named
``csvimg.process_item`` on a real broker (RabbitMQ or Redis), and Celery
workers run them. The URL is the broker URL with a ``celery+`` prefix; the
query string picks the Celery queue and, on Redis, a few transport options::

    celery+amqp://guest:guest@127.0.0.1:5672//              queue "csvimg"
    celery+amqp://guest:guest@rabbit:5672/vhost?queue=shop1  queue "shop1"
    celery+redis://127.0.0.1:6379/0?visibility_timeout=600  Redis broker
    celery+rediss://... celery+pyamqp://... celery+amqps://...

Other query parameters stay in the broker URL for kombu (``heartbeat``,
``ssl_cert_reqs``...).

Storage stays where it is (SQLite on one host, Redis storage across hosts):
the broker only carries item ids. Workers are started with Celery's own
command, configured by the same ``CSVIMG_*`` variables as ``csvimg serve``::

    CSVIMG_STORAGE=redis://db:6379/0 CSVIMG_BLOBS=file:///shared/images \
    CSVIMG_QUEUE='celery+amqp://guest:guest@rabbit:5672//' \
        celery -A csvimg.backends.celery worker --loglevel=info

How it fits the `Queue` protocol: the queue is *pushed* to Celery workers,
so it hands out no claims. `CeleryQueue.claim` only waits and returns
``[]``; on a Celery queue, `Engine.run_worker` (``csvimg serve`` with
workers, ``csvimg worker``) therefore only runs the sweeper, which
re-enqueues items that fell out of the queue, and the outbox delivery loop
(webhooks). Run one of them next to the Celery workers.

Delivery guarantees: tasks are acknowledged late (after `Engine.process_item`
returned) and rejected back to the queue when their worker process dies
(``task_acks_late``, ``task_reject_on_worker_lost``), so a killed worker's
tasks are delivered again: by RabbitMQ as soon as the worker's connection
drops, by Redis once the ``visibility_timeout`` has passed. (kombu's Redis
transport pops a message before it records the copy that comes back, so a
Redis worker killed in that instant loses one message; its item stays
PENDING and the sweeper re-enqueues it after 15 minutes.) Items are
idempotent in storage, so a second delivery never counts twice. A second
delivery that finds its item still leased by a worker that died waits for
the lease to end (a retry with a countdown) and then takes the item over.

Storage failures: the task does not raise, because Celery acknowledges a
failed task even with late acks and the message would be gone. It retries
itself (``task.retry`` with a back-off of 1, 2, 4... up to 60 s), which
publishes a fresh copy before this one is acknowledged; after 100 retries
it gives up and leaves the item to the sweeper.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import anyio.to_thread
import attrs
from anyio.from_thread import BlockingPortal, start_blocking_portal
from celery import Celery, signals
from kombu.exceptions import KombuError

from csvimg._errors import ConfigError, StorageError
from csvimg._util import mask_password
from csvimg.backends import Claim
from csvimg.engine import Engine
from csvimg.hooks import BackendRegistry, hookimpl
from csvimg.jobs import Item, now
from csvimg.settings import Settings

__all__ = [
    "DEFAULT_QUEUE",
    "SCHEMES",
    "TASK_NAME",
    "CeleryQueue",
    "CeleryURL",
    "app",
    "item_wait",
    "make_app",
    "parse_celery_url",
]

log = logging.getLogger("csvimg.celery")

T = TypeVar("T")

TASK_NAME: Final = "csvimg.process_item"
"""The Celery task that processes one item; its only argument is the item id."""

DEFAULT_QUEUE: Final = "csvimg"
"""The Celery queue used when the URL has no ``queue`` query parameter."""

SCHEMES: Final[Mapping[str, str]] = {
    "celery+amqp": "amqp",
    "celery+amqps": "amqps",
    "celery+pyamqp": "pyamqp",
    "celery+redis": "redis",
    "celery+rediss": "rediss",
}
"""URL schemes this module serves, mapped to the broker URL scheme they stand for."""

# Redis transport options a URL may set (the Redis broker has no real acks:
# unacknowledged messages come back after the visibility timeout, and the
# restore sweep's pace decides how soon after). Value: the type to parse.
_REDIS_OPTIONS: Final[Mapping[str, Callable[[str], float | int]]] = {
    "visibility_timeout": float,
    "unacked_restore_interval": float,
    "unacked_restore_throttle": int,
}

# RabbitMQ allows 255 bytes; the character set keeps names safe in Redis
# keys, logs and command lines alike.
_QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")

# Retries of a task whose storage failed: back off 1, 2, 4 ... up to 60 s.
# Past the limit the task gives up and the sweeper of `Engine.run_worker`
# re-enqueues the item once its lease has run out.
_MAX_RETRIES: Final = 100
_MAX_BACKOFF: Final = 60.0

# How long a second delivery waits between looks at an item another worker
# holds: the lease's remaining time, within these bounds.
_MIN_WAIT: Final = 0.5
_MAX_WAIT: Final = 30.0


# -- URLs ---------------------------------------------------------------------


@attrs.frozen
class CeleryURL:
    """A parsed Celery queue URL."""

    broker_url: str
    """The broker URL kombu connects to (the URL without ``celery+`` and our options)."""
    queue: str = DEFAULT_QUEUE
    """The Celery queue the tasks go to (``-Q`` of the workers)."""
    transport_options: Mapping[str, float | int] = attrs.field(factory=dict)
    """Broker transport options given in the query string (Redis only)."""

    @property
    def redacted(self) -> str:
        """The broker URL with its password masked, for logs and errors."""
        return mask_password(self.broker_url)


def parse_celery_url(url: str) -> CeleryURL:
    """Split a ``celery+<broker>://...`` URL into broker URL, queue and options.

    Raises `ConfigError` for another scheme, a bad queue name or a bad
    option value.
    """
    scheme, sep, rest = url.partition("://")
    broker_scheme = SCHEMES.get(scheme.lower())
    if not sep or broker_scheme is None:
        raise ConfigError(
            f"not a Celery queue URL: {url.split('@')[-1]!r}; "
            f"use one of {', '.join(s + '://' for s in SCHEMES)}"
        )
    parts = urlsplit(f"{broker_scheme}://{rest}")
    queue = DEFAULT_QUEUE
    options: dict[str, float | int] = {}
    kept: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "queue":
            if not _QUEUE_NAME.fullmatch(value):
                raise ConfigError(
                    f"Celery queue name {value!r} must be 1-200 letters, digits or ._:- "
                    "and start with a letter or digit"
                )
            queue = value
        elif key in _REDIS_OPTIONS:
            if not broker_scheme.startswith("redis"):
                raise ConfigError(f"{key} applies to Redis brokers only (in {scheme}://)")
            try:
                parsed = _REDIS_OPTIONS[key](value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, not {value!r}") from None
            if parsed <= 0:
                raise ConfigError(f"{key} must be positive, not {value!r}")
            options[key] = parsed
        else:
            kept.append((key, value))
    broker_url = urlunsplit(parts._replace(query=urlencode(kept)))
    return CeleryURL(broker_url=broker_url, queue=queue, transport_options=options)


# -- the Celery app -----------------------------------------------------------


def make_app(settings: Settings, *, url: str | None = None) -> Celery:
    """Build the Celery app of csvimg: broker, queue and the ``csvimg.process_item`` task.

    The broker and queue come from *url* (default:
    ``settings.effective_queue_url``), which must be a Celery queue URL.
    The task runs `Engine.process_item` on an engine built from *settings*,
    one per worker process (see `_WorkerRuntime`).
    """
    parsed = parse_celery_url(url or settings.effective_queue_url)
    app = Celery("csvimg", set_as_current=False)
    app.conf.update(
        broker_url=parsed.broker_url,
        broker_transport_options=dict(parsed.transport_options),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5.0,
        task_default_queue=parsed.queue,
        task_default_exchange=parsed.queue,
        task_default_routing_key=parsed.queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # Acknowledge after the item is stored, and give a task back when
        # its worker process dies: a killed worker loses nothing.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One task per pool process at a time: prefetched tasks would sit
        # behind a slow download while another process idles.
        worker_prefetch_multiplier=1,
        # On a lost broker connection, let running items finish (their
        # result is stored; the redelivered copies then find them done)
        # rather than killing them mid-write. Set explicitly: Celery warns
        # that its default changes in 6.0.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Publishing fails fast when the broker is down: the caller gets a
        # StorageError instead of a hung upload.
        task_publish_retry_policy={
            "max_retries": 3,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
    )
    runtime = _WorkerRuntime(settings)

    def process_item(task: Any, item_id: str) -> None:
        """Process one csvimg item (fetch, compress, store, count)."""
        runtime.run(task, item_id)

    # Called, not used as a decorator: celery is untyped, and an untyped
    # decorator would make the function untyped for mypy. Not shared: a
    # shared task is added to every app created later, so a second app
    # (another queue URL, a test) would run the first app's engine.
    app.task(
        name=TASK_NAME, bind=True, shared=False, ignore_result=True, max_retries=_MAX_RETRIES
    )(process_item)
    return app


def item_wait(item: Item | None, at: float) -> float | None:
    """Seconds to wait before looking at *item* again, or None when it needs no task.

    `Engine.process_item` drops an item another worker holds. Over a Celery
    queue the holder may have died (its tasks came back at once, its lease
    has not ended yet): rather than lose the item until the sweeper finds
    it, the task looks again when the lease ends and takes it over then.
    """
    if item is None or item.status.finished:
        return None
    lease_left = (item.lease_until or at) - at
    return min(_MAX_WAIT, max(_MIN_WAIT, lease_left + 0.25))


class _WorkerRuntime:
    """The engine and event loop of one worker process, opened on the first task.

    A prefork pool forks its processes from the main one, and neither an
    event loop thread nor open connections survive a fork: everything is
    built lazily in the process that runs tasks, remembered with its pid,
    and built again when a fork changed the pid. The event loop lives in a
    blocking portal (a thread) for the process's lifetime, so connection
    pools and HTTP keep-alive are reused across tasks; `close` (on Celery's
    shutdown signals) closes the engine, then the loop.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._portal_cm: Any = None
        self._portal: BlockingPortal | None = None
        self._engine: Engine | None = None
        _RUNTIMES.add(self)

    def _ensure(self) -> tuple[Engine, BlockingPortal]:
        with self._lock:
            if self._pid != os.getpid():
                self._forget()
            if self._engine is None or self._portal is None:
                cm = start_blocking_portal(name="csvimg-celery-loop")
                portal = cm.__enter__()
                engine = Engine(self.settings)
                try:
                    portal.call(engine.open)
                except BaseException:
                    cm.__exit__(None, None, None)
                    raise
                self._pid, self._portal_cm, self._portal, self._engine = (
                    os.getpid(), cm, portal, engine,
                )
                log.info("csvimg engine open in worker process %d", self._pid)
            return self._engine, self._portal

    def _forget(self) -> None:
        # Inherited from the parent across a fork: the loop thread does not
        # exist here, so there is nothing to close, only to drop.
        self._pid = self._portal_cm = self._portal = self._engine = None

    def run(self, task: Any, item_id: str) -> None:
        """Process one item; retry the task when storage failed or the item is held."""
        try:
            engine, portal = self._ensure()
            finished = portal.call(engine.process_item, item_id)
            item = portal.call(engine.storage.get_item, item_id) if finished else None
        except StorageError as exc:
            # Raising would make Celery acknowledge a failed task (acks_late
            # acks failures too): the message would be gone. A retry
            # publishes a fresh copy with a countdown, then acks this one.
            retries = int(task.request.retries)
            countdown = min(_MAX_BACKOFF, 2.0**retries)
            log.error("item %s: storage failed, retrying in %.0f s: %s", item_id, countdown, exc)
            raise task.retry(exc=exc, countdown=countdown) from exc
        wait = 1.0 if not finished else item_wait(item, now())
        if wait is None:
            return
        if int(task.request.retries) >= _MAX_RETRIES:
            log.warning("item %s still held by another worker; leaving it to the sweeper", item_id)
            return
        log.info("item %s is held by another worker; looking again in %.1f s", item_id, wait)
        raise task.retry(countdown=wait)

    def close(self) -> None:
        """Close the engine and stop the event loop (a no-op when never opened here)."""
        with self._lock:
            if self._pid != os.getpid() or self._portal is None:
                self._forget()
                return
            portal, cm, engine = self._portal, self._portal_cm, self._engine
            self._forget()
        try:
            if engine is not None:
                portal.call(engine.close)
        except Exception:
            log.exception("closing the csvimg engine failed")
        finally:
            cm.__exit__(None, None, None)
        log.info("csvimg engine closed in worker process %d", os.getpid())


_RUNTIMES: weakref.WeakSet[_WorkerRuntime] = weakref.WeakSet()


def _close_runtimes(**_: Any) -> None:
    for runtime in list(_RUNTIMES):
        runtime.close()


def _forget_runtimes(**_: Any) -> None:
    for runtime in list(_RUNTIMES):
        with runtime._lock:
            runtime._forget()


# A prefork pool process sends worker_process_init after the fork and
# worker_process_shutdown before it exits; the solo and threads pools run
# tasks in the main process, which sends worker_shutdown. The loop thread is
# not a daemon: without these, an interpreter exit would wait for it.
signals.worker_process_init.connect(_forget_runtimes, weak=False, dispatch_uid="csvimg-init")
signals.worker_process_shutdown.connect(_close_runtimes, weak=False, dispatch_uid="csvimg-pexit")
signals.worker_shutdown.connect(_close_runtimes, weak=False, dispatch_uid="csvimg-exit")


# -- the queue ----------------------------------------------------------------


class CeleryQueue:
    """Item ids as Celery tasks on a broker; see the module docstring.

    `enqueue` publishes one ``csvimg.process_item`` task per id; Celery
    workers consume them. `claim` hands out nothing (it waits *wait*
    seconds and returns ``[]``), so `ack`, `release` and `extend` have no
    claim to act on and raise `ConfigError`. `depth` counts the messages
    waiting in the broker queue (not the ones workers hold).
    """

    def __init__(self, url: str, settings: Settings | None = None) -> None:
        self.url = url
        self.parsed = parse_celery_url(url)
        self.settings = settings or Settings()
        self._app: Celery | None = None
        self._app_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> CeleryQueue:
        """Build from ``celery+amqp://...`` or ``celery+redis://...`` (see `parse_celery_url`)."""
        return cls(url, settings)

    @property
    def queue_name(self) -> str:
        """The Celery queue the tasks go to."""
        return self.parsed.queue

    @property
    def app(self) -> Celery:
        """The Celery app publishing the tasks, built on first use."""
        with self._app_lock:
            if self._app is None:
                self._app = make_app(self.settings, url=self.url)
            return self._app

    async def _call(self, what: str, fn: Callable[[], T]) -> T:
        def guarded() -> T:
            try:
                return fn()
            except (OSError, KombuError) as exc:
                raise StorageError(f"Celery broker {self.parsed.redacted}: {what}: {exc}") from exc
            except Exception as exc:
                # py-amqp and redis-py raise their own error trees, which
                # kombu lists per transport: those are broker failures too.
                errors = self._broker_errors()
                if isinstance(exc, errors):
                    raise StorageError(
                        f"Celery broker {self.parsed.redacted}: {what}: {exc}"
                    ) from exc
                raise

        return await anyio.to_thread.run_sync(guarded)

    def _broker_errors(self) -> tuple[type[BaseException], ...]:
        conn = self.app.connection_for_write()  # not connected: just the transport's classes
        return (*conn.connection_errors, *conn.channel_errors)

    async def open(self) -> None:
        """Nothing to do: the app is built and the broker contacted on first use.

        Every engine opens its queue, Celery workers' engines included,
        which never publish: they should not build a second app.
        """

    async def close(self) -> None:
        """Close the app's pooled broker connections."""
        app = self._app
        if app is not None:
            self._app = None
            await anyio.to_thread.run_sync(app.close)

    async def ping(self) -> None:
        """Connect to the broker once; `StorageError` when it does not answer."""

        def connect() -> None:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(
                    max_retries=1, interval_start=0, interval_step=0.2, interval_max=0.2,
                    timeout=5,
                )

        await self._call("ping", connect)

    async def enqueue(self, item_ids: Sequence[str]) -> None:
        """Publish one ``csvimg.process_item`` task per id, all over one connection.

        The queue is declared (durable) with the first message; messages are
        persistent. Raises `StorageError` when the broker fails; ids
        published before the failure stay queued (delivering one twice is
        harmless), and the sweeper re-enqueues the rest later.
        """
        ids = list(item_ids)
        if not ids:
            return

        def publish() -> None:
            app = self.app
            with app.producer_or_acquire() as producer:
                for item_id in ids:
                    app.send_task(
                        TASK_NAME, args=(item_id,), queue=self.queue_name,
                        producer=producer, add_to_parent=False,
                    )

        await self._call(f"publishing {len(ids)} tasks", publish)

    async def claim(
        self, *, consumer: str, max_items: int, lease_seconds: float, wait: float
    ) -> list[Claim]:
        """Wait *wait* seconds and return ``[]``: Celery workers take the items."""
        await anyio.sleep(wait)
        return []

    def _no_claims(self) -> ConfigError:
        return ConfigError(
            "a Celery queue hands out no claims: its items run as Celery tasks "
            "(celery -A csvimg.backends.celery worker)"
        )

    async def release_many(self, claims: Sequence[Claim], *, delay: float = 0.0) -> None:
        """Raise `ConfigError` (none given: nothing to do): there are no claims."""
        if claims:
            raise self._no_claims()

    async def ack_many(self, claims: Sequence[Claim]) -> None:
        """Raise `ConfigError` (none given: nothing to do): there are no claims."""
        if claims:
            raise self._no_claims()

    async def extend_many(self, claims: Sequence[Claim], *, lease_seconds: float) -> None:
        """Raise `ConfigError` (none given: nothing to do): there are no claims."""
        if claims:
            raise self._no_claims()

    def _queue_op(
        self, op: Callable[[Any], T], missing: T, *, check: bool = True
    ) -> Callable[[], T]:
        """Run *op(channel)* on a fresh channel; *missing* when *check* finds no queue.

        (The Redis transport also says "no queue" for a declared queue
        whose list is empty.)
        """

        def run() -> T:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, timeout=5)
                # A passive declare answers "not found" by closing the
                # channel (AMQP), hence a channel of our own.
                channel = conn.channel()
                try:
                    if check:
                        try:
                            channel.queue_declare(queue=self.queue_name, passive=True)
                        except conn.channel_errors:
                            return missing
                    return op(channel)
                finally:
                    channel.close()

        return run

    async def depth(self) -> int:
        """Messages waiting in the broker queue (0 when it does not exist yet).

        AMQP: the ``message_count`` of a passive ``queue.declare``; Redis:
        the length of the queue's lists. Tasks workers hold are not counted.
        """
        op = self._queue_op(
            lambda ch: int(ch.queue_declare(queue=self.queue_name, passive=True)[1]), 0
        )
        return await self._call("depth", op)

    async def purge(self) -> int:
        """Drop every waiting message of the queue; return how many (for tests and ops)."""
        op = self._queue_op(lambda ch: int(ch.queue_purge(self.queue_name) or 0), 0)
        return await self._call("purge", op)

    async def delete(self) -> None:
        """Delete the broker queue and its messages (for tests and ops)."""

        def delete(channel: Any) -> None:
            # Declared through this channel first: the Redis transport only
            # deletes the bindings its channel knows of.
            queue = self.app.amqp.queues[self.queue_name].bind(channel)
            queue.declare()
            queue.delete()

        await self._call("delete", self._queue_op(delete, None, check=False))


# -- plugin and module-level app ------------------------------------------------


@hookimpl
def csvimg_register_backends(registry: BackendRegistry) -> None:
    """Serve the Celery queue URLs (``celery+amqp://``, ``celery+redis://``...)."""
    for scheme in SCHEMES:
        registry.add_queue(scheme, CeleryQueue.from_url)


app: Celery
"""The Celery app of ``celery -A csvimg.backends.celery worker``, built from
``CSVIMG_*`` variables on first access (see `__getattr__`)."""

_app: Celery | None = None
_app_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    """Build ``app`` (what ``celery -A csvimg.backends.celery`` runs) on first access.

    Built from ``Settings.from_env()``: ``CSVIMG_QUEUE`` names the broker
    and queue, ``CSVIMG_STORAGE`` / ``CSVIMG_BLOBS`` where results go.
    Lazy, because every csvimg process imports this module to register the
    URL schemes, and only Celery workers need the app.
    """
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _app_lock:
        if _app is None:
            settings = Settings.from_env()
            if settings.effective_queue_url.partition("://")[0].lower() not in SCHEMES:
                raise ConfigError(
                    "CSVIMG_QUEUE must be a Celery queue URL for Celery workers, e.g. "
                    "celery+amqp://guest:guest@127.0.0.1:5672// (see docs/celery.md)"
                )
            # Build (not open) the backends once here, in the worker's main
            # process: a bad URL stops `celery worker` at start-up with its
            # message, instead of failing (and acknowledging) every task.
            Engine(settings)
            _app = make_app(settings)
        return _app
