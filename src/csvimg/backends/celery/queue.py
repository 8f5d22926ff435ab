"""The publishing side of the Celery queue: URLs, `CeleryQueue`, the plugin hook.

Everything a csvimg process needs to *send* items to Celery workers, and
nothing of the workers' side: this module does not import `csvimg.engine`
(the task, its engine and Celery's worker signals live in
`csvimg.backends.celery.worker`). See `csvimg.backends.celery` for the URL
forms and the delivery guarantees.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import anyio.to_thread
import attrs
from celery import Celery
from kombu.exceptions import KombuError

from csvimg._errors import ConfigError, StorageError
from csvimg._util import mask_password
from csvimg.backends import Claim
from csvimg.hooks import BackendRegistry, hookimpl
from csvimg.settings import Settings

__all__ = [
    "DEFAULT_QUEUE",
    "SCHEMES",
    "TASK_NAME",
    "CeleryQueue",
    "CeleryURL",
    "csvimg_register_backends",
    "parse_celery_url",
]

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


# -- the Celery app's configuration ---------------------------------------------


def _new_app(parsed: CeleryURL) -> Celery:
    """A Celery app configured for *parsed*'s broker and queue, with no task.

    `CeleryQueue` publishes with it (tasks are sent by name, so the
    publisher needs no task of its own); `make_app` adds the
    ``csvimg.process_item`` task to the same configuration for workers.
    """
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
    return app


# -- the queue ----------------------------------------------------------------


class CeleryQueue:
    """Item ids as Celery tasks on a broker; see `csvimg.backends.celery`.

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
                self._app = _new_app(self.parsed)
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


# -- plugin ---------------------------------------------------------------------


@hookimpl
def csvimg_register_backends(registry: BackendRegistry) -> None:
    """Serve the Celery queue URLs (``celery+amqp://``, ``celery+redis://``...)."""
    for scheme in SCHEMES:
        registry.add_queue(scheme, CeleryQueue.from_url)
