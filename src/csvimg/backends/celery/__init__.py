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

The package has two halves. `csvimg.backends.celery.queue` publishes:
URLs, `CeleryQueue` and the plugin hook, which every csvimg process loads
(it does not import `csvimg.engine`). `csvimg.backends.celery.worker` runs
the tasks: `make_app`, the task and each worker process's engine; it is
imported on first use of one of its names here, or of ``app``. Importing
this package does no I/O and connects no Celery signal (`make_app` does).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from celery import Celery

from csvimg._util import lazy_exports
from csvimg.backends.celery.queue import (
    _QUEUE_NAME,  # noqa: F401  (old private name)
    _REDIS_OPTIONS,  # noqa: F401  (old private name)
    DEFAULT_QUEUE,
    SCHEMES,
    TASK_NAME,
    CeleryQueue,
    CeleryURL,
    csvimg_register_backends,
    parse_celery_url,
)

if TYPE_CHECKING:
    from csvimg.backends.celery.worker import item_wait, make_app

__all__ = [
    "DEFAULT_QUEUE",
    "SCHEMES",
    "TASK_NAME",
    "CeleryQueue",
    "CeleryURL",
    "app",
    "csvimg_register_backends",
    "item_wait",
    "make_app",
    "parse_celery_url",
]

_WORKER = "csvimg.backends.celery.worker"

# Names of the worker half (it imports csvimg.engine): loaded on first use.
_lazy = lazy_exports(
    globals(),
    {
        name: _WORKER
        for name in (
            "app_from_env",
            "item_wait",
            "make_app",
            "log",
            "_WorkerRuntime",
            "_RUNTIMES",
            "_close_runtimes",
            "_forget_runtimes",
            "_MAX_RETRIES",
            "_MAX_BACKOFF",
            "_MIN_WAIT",
            "_MAX_WAIT",
        )
    },
)

app: Celery
"""The Celery app of ``celery -A csvimg.backends.celery worker``, built from
``CSVIMG_*`` variables on first access (see `__getattr__`)."""

_app: Celery | None = None
_app_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    """Build ``app`` (what ``celery -A csvimg.backends.celery`` runs) on first access.

    Built by `csvimg.backends.celery.worker.app_from_env` from
    ``Settings.from_env()``: ``CSVIMG_QUEUE`` names the broker and queue,
    ``CSVIMG_STORAGE`` / ``CSVIMG_BLOBS`` where results go. Lazy, because
    every csvimg process imports this package to register the URL schemes,
    and only Celery workers need the app. The worker half's other names
    (`make_app`, `item_wait`...) are imported on first access too.
    """
    global _app
    if name != "app":
        return _lazy(name)
    with _app_lock:
        if _app is None:
            from csvimg.backends.celery.worker import app_from_env

            _app = app_from_env()
        return _app
